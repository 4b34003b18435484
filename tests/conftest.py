"""Shared fixtures: paths to the repo, the real-CT fixtures and the venv's tools."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
LIDC_DIR = FIXTURES / "lidc"
LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
LIDC_MHD = LIDC_DIR / f"{LIDC_UID}.mhd"
LUNA16_ANNOTATIONS = FIXTURES / "luna16-csv" / "annotations.csv"
BIN = Path(sys.executable).parent


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
