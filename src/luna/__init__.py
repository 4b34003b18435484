"""luna: a reproducible, cacheable LUNA16 nodule-candidate classification pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("luna")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
