"""Loading a training role's crops into memory (what luna-train does before its first epoch on the CPU): one
HDF5 ``read_direct`` per crop, as ``CropStore.crops`` read until 2026-12-01, against one per run of consecutive
rows, as it reads now (a scan's crops are consecutive rows of its subset's store, and a role takes whole scans).

Interleaved rounds in one process over the same stores (in the page cache after the first round); the output
array is allocated once and reused and glibc keeps freed blocks (as in luna-train), so that page faults of
fresh memory do not count. Both must give identical
arrays (checked).

    python benchmarks/resident_load.py --crops results/crops/subset*.h5 --splits results/splits.tsv \\
        --out benchmarks/results/resident_load.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from luna.cpu_speed import tune_allocator
from luna.data import CropDataset
from luna.io import atomic_path
from luna.splits import read_fold_roles
from luna.store import CropStore


def per_crop(store: CropStore, rows: np.ndarray, out: np.ndarray) -> None:
    """The earlier read: one read_direct per crop, in file order."""
    ds = store._handle()["crops"]
    for k in np.argsort(rows, kind="stable"):
        ds.read_direct(out, np.s_[int(rows[k])], np.s_[int(k)])


def load(ds: CropDataset, out: np.ndarray, runs: bool) -> float:
    """Every crop of ``ds`` into ``out`` (store by store); seconds."""
    t0 = time.perf_counter()
    stores = ds.rows["store"].to_numpy()
    rows = ds.rows["row"].to_numpy()
    for position in np.unique(stores):
        where = np.flatnonzero(stores == position)
        if runs:
            out[where] = ds.stores[int(position)].crops(rows[where])
        else:
            part = np.empty((len(where), *ds.crop_shape), dtype=np.int16)
            per_crop(ds.stores[int(position)], rows[where], part)
            out[where] = part
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--crops", nargs="+", required=True, help="crop stores (results/crops/subset*.h5)")
    p.add_argument("--splits", required=True, help="splits.tsv")
    p.add_argument("--test-fold", type=int, default=0)
    p.add_argument("--selection-fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each read")
    p.add_argument("--out", required=True, type=Path, help="markdown table to write")
    a = p.parse_args(argv)
    tune_allocator()  # as luna-train does on the CPU: freed blocks stay on the heap, reused without page faults
    roles = read_fold_roles(a.splits, a.test_fold, a.selection_fraction)
    ds = CropDataset(a.crops, roles, "train", int16=True)
    out = np.zeros((len(ds), *ds.crop_shape), dtype=np.int16)  # touched once: no page faults in the rounds
    seconds: dict[str, list[float]] = {"per crop": [], "per run": []}
    reference = None
    for _ in range(a.rounds):
        for name in seconds:
            out[:] = 0
            seconds[name].append(load(ds, out, runs=name == "per run"))
            if reference is None:
                reference = out.copy()
            elif not np.array_equal(out, reference):
                raise SystemExit(f"{name}: crops differ from the first read")
    n_runs = sum(int(((np.diff(ds.rows.loc[ds.rows["store"] == s, "row"].to_numpy()) != 1).sum()) + 1)
                 for s in ds.rows["store"].unique())
    lines = ["# Loading the training crops into memory (benchmarks/resident_load.py)", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"test fold {a.test_fold}'s training role: {len(ds)} crops ({out.nbytes / 2**30:.2f} GiB int16) from "
             f"{len(a.crops)} stores, {n_runs} runs of consecutive rows; {a.rounds} interleaved rounds, stores in "
             "the page cache, output memory touched before the rounds. Identical arrays from both reads.", "",
             "| read | best s | median s | crops/s (best) |", "|---|---:|---:|---:|"]
    for name, values in seconds.items():
        lines.append(f"| {name} | {min(values):.2f} | {float(np.median(values)):.2f} | {len(ds) / min(values):,.0f} |")
    print("\n".join(lines))
    with atomic_path(a.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
