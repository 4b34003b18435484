"""Loading a training role's crops into memory, through luna-train's own path (``ResidentBatches.load``: 1,024
crops at a time via ``CropDataset.crops_int16`` and ``luna.store.read_crops`` into one int16 tensor): with
``CropStore.crops`` as it reads (one HDF5 ``read_direct`` per run of consecutive rows: a scan's crops are
consecutive rows of its subset's store, and a role takes whole scans) against one ``read_direct`` per crop, as
it read until 2026-12-01.

Interleaved rounds in one process over the same stores (in the page cache after the first round), each into a
fresh tensor as in luna-train: glibc tuned as luna-train tunes it, then ``malloc_trim(0)`` before every round
so that no round reuses the previous round's pages; the minor page faults of each round are counted. Both reads
must give identical tensors (checked). The read alone, into memory touched beforehand, was 0.51 s against
1.69 s (this benchmark's first version, 2026-12-01, fold 0's training role of 9,613 crops).

    python benchmarks/resident_load.py --crops results/crops/subset*.h5 --splits results/splits.tsv \\
        --out benchmarks/results/resident_load.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from luna.app import DefaultsHelpFormatter
from luna.cpu_speed import tune_allocator
from luna.data import CropDataset, ResidentBatches
from luna.io import atomic_path
from luna.splits import read_fold_roles
from luna.store import CropStore


def per_crop(self: CropStore, indices) -> np.ndarray:
    """``CropStore.crops`` as it read until 2026-12-01: one read_direct per crop, in file order."""
    idx = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(idx), *self.crop_shape), dtype=np.int16)
    ds = self._handle()["crops"]
    for k in np.argsort(idx, kind="stable"):
        ds.read_direct(out, np.s_[int(idx[k])], np.s_[int(k)])
    return out


def load(ds: CropDataset, runs: bool) -> tuple[float, int, torch.Tensor]:
    """luna-train's resident load of every crop of ``ds`` into fresh memory: seconds, minor page faults, tensor."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # give freed pages back: this round faults its tensor in, as luna-train does
    with mock.patch.object(CropStore, "crops", CropStore.crops if runs else per_crop):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        crops = ResidentBatches.load(ds, "cpu")
        took = time.perf_counter() - t0
        return took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, crops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--crops", nargs="+", required=True, help="crop stores (results/crops/subset*.h5)")
    p.add_argument("--splits", required=True, help="splits.tsv")
    p.add_argument("--test-fold", type=int, default=0)
    p.add_argument("--selection-fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each read")
    p.add_argument("--out", required=True, type=Path, help="markdown table to write")
    a = p.parse_args(argv)
    tune_allocator()  # as luna-train does on the CPU
    roles = read_fold_roles(a.splits, a.test_fold, a.selection_fraction)
    ds = CropDataset(a.crops, roles, "train", int16=True)
    seconds: dict[str, list[float]] = {"per crop": [], "per run": []}
    faults: dict[str, list[int]] = {name: [] for name in seconds}
    reference = None
    for _ in range(a.rounds):
        for name in seconds:
            took, n_faults, crops = load(ds, runs=name == "per run")
            seconds[name].append(took)
            faults[name].append(n_faults)
            if reference is None:
                reference = crops
            elif not torch.equal(crops, reference):
                raise SystemExit(f"{name}: crops differ from the first read")
            del crops
    n_runs = sum(int(((np.diff(ds.rows.loc[ds.rows["store"] == s, "row"].to_numpy()) != 1).sum()) + 1)
                 for s in ds.rows["store"].unique())
    lines = ["# Loading the training crops into memory (benchmarks/resident_load.py)", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"test fold {a.test_fold}'s training role: {len(ds)} crops "
             f"({reference.numel() * 2 / 2**30:.2f} GiB int16) from "
             f"{len(a.crops)} stores, {n_runs} runs of consecutive rows; {a.rounds} interleaved rounds, stores in "
             "the page cache, fresh memory each round (malloc_trim before it; luna-train's ResidentBatches.load). "
             "Identical tensors from both reads.", "",
             "| read | median s | min-max s | crops/s (median) | minor page faults per round (median) |",
             "|---|---:|---:|---:|---:|"]
    for name, values in seconds.items():
        median = float(np.median(values))
        lines.append(f"| {name} | {median:.2f} | {min(values):.2f}-{max(values):.2f} | {len(ds) / median:,.0f} | "
                     f"{int(np.median(faults[name])):,} |")
    print("\n".join(lines))
    with atomic_path(a.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
