"""Where a result came from: the code version (package version + a hash of the package's sources), git commit,
torch version, device — and conversion of such records to plain types that ``torch.load(weights_only=True)``
reads back.

The source hash covers every ``*.py`` file of the installed ``luna`` package (paths and bytes), so an
uncommitted edit changes it: a training state written by other code is never resumed (docs/design.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=8)
def _digest_of(package_dir: str) -> str:
    root = Path(package_dir)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def source_digest(package_dir: str | os.PathLike | None = None) -> str:
    """sha256 over the relative paths and bytes of every ``.py`` file of the package (default: this one)."""
    return _digest_of(str(Path(package_dir) if package_dir is not None else PACKAGE_DIR))


def code_version() -> dict[str, str]:
    """``{"luna_version": ..., "source_sha256": ...}``: what a resumable state and a model were made by."""
    from luna import __version__

    return {"luna_version": str(__version__), "source_sha256": source_digest(PACKAGE_DIR)}


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the source tree (None outside a repository or without git)."""
    where = Path(cwd) if cwd is not None else PACKAGE_DIR
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def provenance(device: Any, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config (if given), luna version, source hash, git commit, torch version, device."""
    import torch

    return plain({
        "config": dict(config) if config is not None else None,
        **code_version(),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": str(device),
    })


def plain(value: Any) -> Any:
    """Convert to types that ``torch.load(weights_only=True)`` accepts (dict/list/str/int/float/bool/None)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None:
        return None
    for kind in (bool, int, float, str):  # exact builtin types (torch.__version__ is a str subclass)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return plain(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)
