"""luna.runner.run_rule: what a rule's log file holds when its app fails (the file Snakemake and SLURM users read)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from luna.app import StageApp
from luna.evaluation import EvaluateApp
from luna.runner import run_rule


class Exploding(StageApp):
    """An app whose run hits an unexpected exception (a bug, an unwrapped torch or HDF5 error)."""

    prog = "luna-demo"
    errors = (ValueError,)

    def add_arguments(self, parser):
        parser.add_argument("--bad-arg", action="store_true")

    def __init__(self, argv):
        super().__init__(argv)
        if self.args.bad_arg:
            raise ValueError("--bad-arg: refused while checking the arguments")

    def run(self):
        raise RuntimeError("boom inside the app")


@pytest.fixture(autouse=True)
def _restore_root_handlers():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[len(handlers):]:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_an_unexpected_exception_leaves_its_traceback_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "demo.log"
    with pytest.raises(RuntimeError, match="boom inside the app"):
        run_rule(Exploding, [], log)
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and text.rstrip().endswith("RuntimeError: boom inside the app")


def test_an_argument_error_is_one_line_in_the_log_and_fails_the_job(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with pytest.raises(SystemExit) as info:
        run_rule(Exploding, ["--bad-arg"], log)
    assert str(info.value.code) == ("Exploding failed (exit 2): luna-demo: error: --bad-arg: refused while checking "
                                    "the arguments")
    assert "Traceback" not in log.read_text()


def test_an_argparse_error_is_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "evaluate.log"
    with pytest.raises(SystemExit) as info:
        run_rule(EvaluateApp, ["--bootstrap", "many"], log)
    assert "failed (exit 2)" in str(info.value.code) and "argument --bootstrap: invalid int value: 'many'" in \
        str(info.value.code)
    assert "luna-evaluate: error: argument --bootstrap: invalid int value: 'many' (see luna-evaluate --help)" in \
        log.read_text()
    assert "usage:" not in log.read_text()  # one line, not argparse's usage block above it
