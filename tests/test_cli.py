"""Console entry points: every script of pyproject.toml runs its stage through luna.cli, and Ctrl-C while the
stage's modules load is one line and exit status 130 (was a traceback through the imports)."""

from __future__ import annotations

import importlib
import os

import pytest

from luna import cli
from workflow_util import REPO


def test_every_console_script_runs_its_stage_through_the_guard() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(cli.ENTRIES)
    for prog, target in scripts.items():
        assert target == f"luna.cli:{prog.replace('-', '_')}"
        module, function = cli.ENTRIES[prog]
        assert callable(getattr(importlib.import_module(module), function)), prog


def test_ctrl_c_while_the_stage_loads_is_one_line(monkeypatch, capsys) -> None:
    def interrupted(name: str):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.luna_predict()
    assert info.value.code == 130
    assert capsys.readouterr().err == "luna-predict: interrupted\n"


def test_sigterm_is_deferred_also_where_sigint_is_ignored() -> None:
    """A script's background job (``luna-crops ... &``) starts with SIGINT ignored: deferred_sigint then deferred
    nothing, and SIGTERM raised wherever the main thread was (lost in a thread pool's callback)."""
    import signal

    from luna.app import Terminated, deferred_sigint, raise_for, sigterm_unwinds

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigterm_unwinds(), deferred_sigint() as came:
            assert came() == 0
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode: no exception here
            assert came() == signal.SIGTERM
            with pytest.raises(Terminated):
                raise_for(came())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
