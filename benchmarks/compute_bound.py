"""How close luna-train's step runs to what the CPU can do in float32: the LunaModel training step's arithmetic
(counted by ``torch.utils.flop_counter``) per second, against a large float32 matrix multiply on the same threads.

Why: the default run's budget is samples (30,000 in ~10 minutes of training on 2 AVX2 cores), and the speed
levers found are in (benchmarks/results/train.md). If the step already runs near the rate a matrix multiply
reaches on these cores, no kernel change can buy the run many more samples; if it runs far below, there is room.

    .venv/bin/python benchmarks/compute_bound.py --rounds 9 --out benchmarks/results/compute_bound.md

Rows, each in a child process per ISA (``native``, and ``avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``, set before torch loads; the child's ``cpu_report`` line shows what took effect):

* ``matmul``: ``torch.mm`` of two 2048 x 2048 float32 matrices, 2 n^3 flops each: the cores' practical fp32
  ceiling (oneDNN/MKL's best kernel on this ISA and thread count).
* ``train step``: what ``LunaTrainingApp._train_epoch`` does per batch on the CPU in float32, minus the data:
  glibc's allocator tuned (:func:`luna.cpu_speed.tune_allocator`), LunaModel in channels_last_3d with
  :func:`luna.cpu_speed.speed_up_training`, forward, cross-entropy, backward,
  gradient clip at 5, Adam; batch 16 (the recipe's), crops of -1000..1000 HU. Flops: convolutions and the linear
  head, forward and backward (BatchNorm, ReLU, pooling and Adam are not counted: a few percent of the work).
* ``forward``: the same model in eval, batch 64, no grad (luna-predict's pass).

Also written: the augmentation's time per sample (:func:`luna.data.augment_batch` on a batch of 16, the recipe's
settings), which the training epoch adds to the step. The four are timed in interleaved rounds (medians of
``--rounds``; the share of the matmul's rate within each round), so that a change of the machine's speed during the
run reaches them alike; nothing else should run on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
MATMUL_N = 2048
CROP = (32, 48, 48)


def _seconds(fn, reps: int) -> float:  # noqa: ANN001 - a callable of no arguments
    """Mean time of ``reps`` calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(rounds: int, threads: int) -> dict:
    """The child's measurements (this process's ISA as the environment set it)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from luna.cpu_speed import cpu_report, speed_up_training, tune_allocator
    from luna.data import AugmentConfig, augment_batch
    from luna.model import LunaModel

    allocator = tune_allocator()  # as luna-train and luna-predict do, before any tensor
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out: dict = {"cpu": cpu_report(), "allocator": allocator, "torch": torch.__version__}

    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)

    batch = 16
    x = (torch.rand(batch, 1, *CROP) * 2000 - 1000).contiguous(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 2, (batch,))

    def flops_of(model: torch.nn.Module, inputs: torch.Tensor, backward: bool) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            logits, _ = model(inputs)
            if backward:
                F.cross_entropy(logits, y[: len(inputs)]).backward()
        model.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())

    plain = LunaModel()
    step_flops = flops_of(plain, x, backward=True)  # the plain model: the fast one routes some convs by hand

    model = LunaModel().to(memory_format=torch.channels_last_3d)
    out["speed_up"] = speed_up_training(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(x)
        F.cross_entropy(logits, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    eval_batch = 64
    xe = (torch.rand(eval_batch, 1, *CROP) * 2000 - 1000).contiguous(memory_format=torch.channels_last_3d)
    forward_flops = flops_of(LunaModel().eval(), xe, backward=False)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(xe)
        model.train()

    crops = (torch.rand(batch, 1, *CROP) * 2000 - 1000).to(torch.int16)
    config = AugmentConfig(flip=True, offset=0.1, scale=0.2, rotate=True, noise_hu=25.0)
    generator = torch.Generator().manual_seed(0)
    work = {"matmul": (lambda: torch.mm(a, b), 5, 2 * MATMUL_N ** 3, None),
            "train step": (step, 8, step_flops, batch),
            "forward": (forward, 3, forward_flops, eval_batch),
            "augment": (lambda: augment_batch(crops, config, generator), 8, None, batch)}
    for fn, *_ in work.values():  # warm-up: oneDNN primitives, allocator, Adam's state
        fn()
        fn()
    # interleaved rounds: a change of the machine's speed during the run reaches every row alike, and each
    # round's share of the matmul's rate is taken within the round
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds):
        for name, (fn, reps, _, _) in work.items():
            times[name].append(_seconds(fn, reps))
    for name, (_, _, flops, samples) in work.items():
        out[name] = {"seconds": statistics.median(times[name]), "flops": flops, "samples": samples}
        if flops:
            out[name]["share"] = statistics.median(
                flops / t / (work["matmul"][2] / m) for t, m in zip(times[name], times["matmul"]))
    return out


def child_env(isa: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ISAS["avx2"]:
        env.pop(key, None)
    env.update(ISAS[isa])
    env.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    return env


def table(results: dict[str, dict], threads: int, rounds: int) -> str:
    from synth import _cpu_model  # benchmarks/synth.py's reading of /proc/cpuinfo

    lines = ["# The training step against the CPU's float32 matrix multiply (benchmarks/compute_bound.py)", "",
             f"{threads} torch threads, medians of {rounds} interleaved rounds, nothing else running. GFLOP/s: counted "
             "flops (convolutions and the linear head) per second; share: of the matmul's rate on the same ISA, "
             "taken within each round (median).", "",
             f"Machine: {_cpu_model()}, {os.cpu_count()} CPUs; torch {next(iter(results.values()))['torch']}; "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}.", ""]
    for isa, r in results.items():
        lines.append(f"- `{isa}`: {r['cpu']}; {r['speed_up']}; {r['allocator']}")
    lines += ["", "| ISA | work | ms per call | GFLOP per call | GFLOP/s | share of matmul | samples/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for isa, r in results.items():
        for name in ("matmul", "train step", "forward"):
            m = r[name]
            rate = m["flops"] / m["seconds"]
            samples = f"{m['samples'] / m['seconds']:.1f}" if m["samples"] else ""
            lines.append(f"| {isa} | {name} | {m['seconds'] * 1e3:.1f} | {m['flops'] / 1e9:.2f} | {rate / 1e9:.1f} | "
                         f"{m['share']:.0%} | {samples} |")
        m = r["augment"]
        lines.append(f"| {isa} | augment (batch 16) | {m['seconds'] * 1e3:.1f} | | | | "
                     f"{m['samples'] / m['seconds']:.1f} |")
    for isa, r in results.items():
        step, aug = r["train step"], r["augment"]
        per_sample = (step["seconds"] + aug["seconds"]) / step["samples"]
        lines.append("")
        at_matmul_s = step["flops"] / (r["matmul"]["flops"] / r["matmul"]["seconds"])
        lines.append(f"`{isa}`: step and augmentation together {1 / per_sample:.1f} samples/s; the step's flops at the "
                     f"matmul's rate would take {at_matmul_s * 1e3:.1f} ms against {step['seconds'] * 1e3:.1f} ms.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", nargs="+", choices=sorted(ISAS), default=["avx2", "native"], help="ISAs to measure")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (the median is reported)")
    p.add_argument("--out", type=Path, help="markdown table (default: print it)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.rounds, a.threads)))
        return 0
    results = {}
    for isa in a.isa:
        proc = subprocess.run([sys.executable, __file__, "--child", "--threads", str(a.threads), "--rounds",
                               str(a.rounds)], env=child_env(isa), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{isa}: the measuring child failed: {proc.stderr.strip()[-500:]}")
        results[isa] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{isa}: {results[isa]['cpu']}", flush=True)
    text = table(results, a.threads, a.rounds)
    if a.out:
        from luna.io import atomic_path

        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
