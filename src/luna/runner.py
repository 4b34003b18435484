"""Run a stage app from a Snakemake rule script: config section -> command-line flags, log to the rule's log
file, fail the job on a bad exit."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def spin_openmp_threads() -> None:
    """``OMP_WAIT_POLICY=ACTIVE`` unless already set: OpenMP threads spin between parallel regions instead of
    sleeping. On 2 cores a sleeping thread waits milliseconds for its core whenever anything else runs (45 vs
    1.4 samples/s next to a busy process, ~+3% on a quiet box: benchmarks/results/train_notes.md).

    libgomp reads the variable once, when torch loads it: the train and predict rule scripts call this before
    importing the modules that import torch (set later, it has no effect).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")


def setup_logging(log_path: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Log to stderr, or to a file (a Snakemake ``log:``), once per process."""
    root = logging.getLogger()
    root.setLevel(level)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path, mode="a")
    elif root.handlers:
        return
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)


def config_argv(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A config section as the flags of the stage's CLI, so a new setting is added in the schema and argparse only.

    ``key: value`` -> ``--key value`` (underscores become dashes); ``true``/``false`` -> ``--key``/``--no-key``;
    a list -> ``--key v1 v2 ...`` with an inner list joined by ``:`` (``[[6, 8]]`` -> ``--key 6:8``); a nested
    section -> its keys prefixed with its name (``augment: {noise: 25}`` -> ``--augment-noise 25``), its
    ``enabled`` key -> ``--augment``/``--no-augment``; ``null`` -> nothing.
    """
    argv: list[str] = []
    for key, value in settings.items():
        name = prefix + str(key).replace("_", "-")
        if isinstance(value, Mapping):
            inner = dict(value)
            enabled = inner.pop("enabled", None)
            if enabled is not None:
                argv.append(f"--{name}" if enabled else f"--no-{name}")
            argv += config_argv(inner, prefix=f"{name}-")
        elif isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *(":".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)]
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def run_rule(app_factory: Callable[[list[str]], object], argv: Sequence[str], log_path: str | os.PathLike) -> None:
    """Build ``App(argv)`` and call ``main()`` with stdout/stderr and logging going to ``log_path``.

    A non-zero return or an exception fails the Snakemake job, and the log holds why: an argument error found
    while building the app is one line (as on the command line), an unexpected exception its traceback (printed
    inside the redirect: after it, the traceback would reach Snakemake's or SLURM's output, not the rule's log).
    """
    argv = [str(a) for a in argv]
    setup_logging(log_path)
    logging.getLogger(__name__).info("argv: %s", " ".join(argv))
    errors = getattr(app_factory, "errors", ())
    with open(log_path, "a", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            try:
                app = app_factory(argv)
            except errors as exc:
                print(f"{getattr(app_factory, 'prog', app_factory.__name__)}: error: {exc}", file=sys.stderr)
                code: Any = 2
            else:
                code = app.main()  # type: ignore[attr-defined]
        except SystemExit as exc:  # argparse: its usage and error line are in the log already
            code = exc.code
        except BaseException:
            traceback.print_exc(file=fh)
            raise
    if code not in (None, 0):
        with open(log_path) as fh:
            last = [line for line in fh.read().splitlines() if line.strip()][-1:]
        sys.exit(f"{app_factory.__name__} failed (exit {code}): {last[0] if last else ''}")


def gpus_granted(gpu: int, gres: str | None = None) -> int:
    """The GPUs a job was granted: its ``gpu`` resource, or where that is 0 the GPUs of its SLURM ``gres``
    (``gpu:2``, ``gpu:a100:2``; ``gpu`` alone is one), the profile's way to name a GPU type without ``--gpus``."""
    if gpu > 0 or not gres:
        return max(0, int(gpu))
    total = 0
    for item in str(gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def granted_gpus_argv(gpus: int, resources: Any, log_path: str | os.PathLike) -> list[str]:
    """The stage options for the GPUs Snakemake granted a job that asks for ``gpus`` (its ``resources``: ``gpu``,
    where 0 ``gres``, :func:`gpus_granted`; no ``gpu`` at all: what it asked for): none when it got them all;
    ``--device cpu`` when it got none (``--resources gpu=0``, or ``set-resources: {train: {gpu: 0}}`` on a
    CPU-only cluster: a job granted no GPU must not take one, and its ``gpus`` processes run on the CPU); fewer
    but some fails the job, one line in its log: Snakemake cuts a job's ``gpu`` resource to what it may grant
    and goes on, and torchrun would start ``gpus`` processes on fewer devices (the workflow refuses
    ``--resources gpu=N`` below train.gpus before any job; this is for a cluster's per-job grant)."""
    granted = gpus_granted(int(getattr(resources, "gpu", gpus)), getattr(resources, "gres", None))
    if granted <= 0:
        return ["--device", "cpu"]
    if granted < gpus:
        message = (f"train.gpus = {gpus}, but this job was granted gpu={granted}: give it {gpus} GPUs (--resources "
                   f"gpu={gpus} or more; on a cluster the rule's gpu resource), or set train.gpus: {granted}")
        setup_logging(log_path)
        with open(log_path, "a") as fh:
            print(f"luna-train: error: {message}", file=fh)
        sys.exit(f"LunaTrainingApp failed (exit 2): luna-train: error: {message}")
    return []


def run_rule_torchrun(module: str, argv: Sequence[str], log_path: str | os.PathLike, nproc: int) -> None:
    """Run ``python -m <module> argv`` as ``nproc`` processes under torchrun (one per GPU; gloo processes on a
    machine without CUDA), all output appended to ``log_path``; a failure fails the job with the last log line.

    ``--standalone`` picks a free rendezvous port, so several such jobs can run on one machine at once."""
    import subprocess

    argv = [str(a) for a in argv]
    setup_logging(log_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(nproc)),
           "-m", module, *argv]
    logging.getLogger(__name__).info("torchrun, %d processes: %s", nproc, " ".join(cmd))
    with open(log_path, "a", buffering=1) as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        with open(log_path) as fh:
            errors = [line for line in fh.read().splitlines() if "error:" in line]
        sys.exit(f"{module} under torchrun failed (exit {code}): {errors[-1] if errors else 'see ' + str(log_path)}")


def check_yaml_file(path: str | os.PathLike) -> None:
    """Raise ValueError("<path>, line L, column C: <problem>") when ``path`` exists and is not valid YAML.

    The Snakefile calls it before its ``configfile:`` line: Snakemake's own message for a malformed config
    names neither the file nor the line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None
