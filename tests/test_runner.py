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


def test_the_gpus_a_job_was_granted_become_its_device(tmp_path) -> None:
    """All asked for: nothing to add; none (--resources gpu=0, a CPU-only cluster's gpu: 0): on the CPU, also where
    CUDA is visible; fewer but some: the job fails in one line (torchrun would start more processes than devices)."""
    from luna.runner import granted_gpus_argv

    from types import SimpleNamespace as Resources

    log = tmp_path / "train.log"
    assert granted_gpus_argv(1, Resources(gpu=1), log) == granted_gpus_argv(2, Resources(gpu=3), log) == []
    assert granted_gpus_argv(1, Resources(gpu=0, gres="gpu:a100:1"), log) == granted_gpus_argv(1, Resources(), log) == []
    assert granted_gpus_argv(1, Resources(gpu=0), log) == granted_gpus_argv(2, Resources(gpu=0), log) == ["--device",
                                                                                                          "cpu"]
    assert not log.exists()
    with pytest.raises(SystemExit) as exc:
        granted_gpus_argv(2, Resources(gpu=1), log)
    message = ("train.gpus = 2, but this job was granted gpu=1: give it 2 GPUs (--resources gpu=2 or more; on a "
               "cluster the rule's gpu resource), or set train.gpus: 1")
    assert str(exc.value.code) == f"LunaTrainingApp failed (exit 2): luna-train: error: {message}"
    assert log.read_text().splitlines()[-1] == f"luna-train: error: {message}"
    from luna.runner import gpus_granted

    # a SLURM profile's gres names the GPUs where gpu is 0 (the plugin then sends --gres, not --gpus)
    assert [gpus_granted(1), gpus_granted(0), gpus_granted(0, "gpu:a100:2"), gpus_granted(0, "gpu"),
            gpus_granted(0, "tmpfs:10G"), gpus_granted(2, "gpu:1")] == [1, 0, 2, 1, 0, 2]
