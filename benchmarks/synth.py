"""Benchmark luna.synth: synthetic scans per second at the default size and at full 512x512 size,
and the whole default data set; writes a markdown table to benchmarks/results/synth.md.

Run: .venv/bin/python benchmarks/synth.py [--default-scans 6] [--full-scans 2] [--jobs 2] [--no-dataset]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from luna.app import DefaultsHelpFormatter
from luna.synth import SynthConfig, synthesize

RESULTS = Path(__file__).parent / "results" / "synth.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run(label: str, config: SynthConfig, jobs: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="luna-synth-bench-"))
    try:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        summary = synthesize(tmp / "data", config, jobs=jobs)
        wall = time.perf_counter() - t0
        own_cpu = time.process_time() - cpu0
        children = os.times()
        return {"label": label, "jobs": jobs, "summary": summary, "wall_s": wall, "own_cpu_s": own_cpu,
                "children_cpu_s": children.children_user + children.children_system}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--default-scans", type=int, default=6, help="scans at the default size (one process; 0: no such row)")
    parser.add_argument("--full-scans", type=int, default=2, help="scans at full 512x512 size (one process; 0: no such row)")
    parser.add_argument("--jobs", type=int, default=2, help="processes for the whole default data set")
    parser.add_argument("--no-dataset", action="store_true", help="skip the whole default data set")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    if min(args.default_scans, args.full_scans) < 0:
        parser.error("--default-scans and --full-scans must be >= 0 (0 leaves the row out)")
    runs = []
    if args.default_scans:
        runs.append(_run(f"default size, {args.default_scans} scans",
                         SynthConfig(n_subsets=1, scans_per_subset=args.default_scans), 1))
    if args.full_scans:
        runs.append(_run(f"full size 512x512, {args.full_scans} scans",
                         SynthConfig(n_subsets=1, scans_per_subset=args.full_scans, full_size=True), 1))
    if not args.no_dataset:
        runs.append(_run("SynthConfig()'s data set (3 x 20 scans; the pipeline's default is config/config.yaml's "
                         "5 x 30)", SynthConfig(), args.jobs))
    load_after = os.getloadavg()

    lines = [
        "# luna.synth benchmark",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} cores ({_cpu_model()}), {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}, numpy {np.__version__}",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(a shared machine: wall times grow with other users' load; CPU seconds do not)",
        "",
        "| run | jobs | scans | mean shape (z, y, x) | Mvoxels | MB on disk | wall s | scans/s | CPU s per scan | nodules | candidates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["summary"]
        n = s["n_scans"]
        cpu = r["own_cpu_s"] if r["jobs"] == 1 else r["children_cpu_s"] + r["own_cpu_s"]
        shape = " x ".join(f"{v:.0f}" for v in s["mean_shape_zyx"])
        lines.append(
            f"| {r['label']} | {r['jobs']} | {n} | {shape} | {s['voxels'] / 1e6:.0f} | "
            f"{s['bytes'] / 1e6:.0f} | {r['wall_s']:.1f} | {n / r['wall_s']:.2f} | {cpu / n:.2f} | "
            f"{s['n_nodules']} | {s['n_candidates']} ({s['n_positive_candidates']} positive) |")
    lines += [
        "",
        "CPU s per scan: process time of the generating process(es); with jobs > 1 it includes the workers.",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
