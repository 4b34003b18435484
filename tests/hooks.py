"""Environments that switch on the test-only hooks of tests/sitehooks/sitecustomize.py in a child process."""

from __future__ import annotations

import os
from pathlib import Path

HOOKS = Path(__file__).resolve().parent / "sitehooks"


def hook_env(base: dict[str, str] | None = None, **hooks: str) -> dict[str, str]:
    """``base`` (default os.environ) with tests/sitehooks first on PYTHONPATH and the given hook variables set,
    e.g. ``hook_env(LUNA_TEST_SLOW_SCAN_S="2")``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOKS), env.get("PYTHONPATH", "")) if p)
    env.update({key: str(value) for key, value in hooks.items()})
    return env


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test sends SIGINT: SIGINT back to its default, so that Python installs its
    KeyboardInterrupt handler even when the test runs in a shell's background job (which starts with SIGINT
    ignored, and Python then leaves it ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
