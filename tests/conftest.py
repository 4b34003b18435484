"""Shared fixtures: paths to the repo, the real-CT fixtures and the venv's tools."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
LIDC_DIR = FIXTURES / "lidc"
LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
LIDC_MHD = LIDC_DIR / f"{LIDC_UID}.mhd"
LUNA16_ANNOTATIONS = FIXTURES / "luna16-csv" / "annotations.csv"
BIN = Path(sys.executable).parent


def symlinked_outputs(folder: Path, targets: Path, names: Sequence[str], text: str) -> None:
    """Each of ``names`` in ``folder`` a symlink to a file holding ``text`` in ``targets`` (both folders created):
    outputs that a run must write through."""
    folder.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    for name in names:
        (targets / name).write_text(text)
        (folder / name).symlink_to(targets / name)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def lidc_mhd() -> Path:
    return LIDC_MHD


@pytest.fixture()
def env_with_bin() -> dict[str, str]:
    """Environment whose PATH starts with the interpreter's bin (snakemake, torchrun, console scripts)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@contextlib.contextmanager
def _lock_held_elsewhere(path: Path) -> Iterator[None]:
    """luna.io.lock_path(path) held by another process (a POSIX record lock is per process) while inside."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom luna.io import lock_path\n"
                               "held = lock_path(sys.argv[1], 'busy')\nprint('held', flush=True)\ntime.sleep(120)\n",
                               str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture()
def lock_held_elsewhere() -> Callable[[Path], contextlib.AbstractContextManager[None]]:
    """A run in progress, as another process holding a luna lock file: ``with lock_held_elsewhere(path): ...``."""
    return _lock_held_elsewhere

