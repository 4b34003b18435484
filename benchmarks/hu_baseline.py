"""Honest baseline for docs/results.md: how well does the candidate's centre-voxel HU alone rank nodules?

Reads the crop stores and splits.tsv of a finished run and prints (and writes as markdown) the ROC AUC of
the centre voxel's Hounsfield value (and of the mean HU of the central 3x3x3 voxels) as a score on the test
folds that run evaluated (results/validation/metrics.tsv), beside the CNN's pooled test AUC. A task this
baseline solves would not test the CNN: the synthetic default keeps them below AUC 0.90 (centre voxel) and 0.95 (3x3x3 mean).

    python benchmarks/hu_baseline.py [--results results] [--out hu_baseline.md]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from luna.app import RawDefaultsHelpFormatter
from luna.io import atomic_path
from luna.metrics import auc_score
from luna.splits import read_splits_tsv
from luna.store import CropStore


def centre_scores(store: CropStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre-voxel HU and 3x3x3 mean HU around the candidate's voxel inside each crop."""
    local = store.center_irc[rows] - store.crop_start_irc[rows]
    crops = store.crops(rows).astype(np.float32)
    idx = np.arange(len(rows))
    centre = crops[idx, local[:, 0], local[:, 1], local[:, 2]]
    shape = np.array(store.crop_shape)
    mean3 = np.empty(len(rows), dtype=np.float32)
    for k, (i, r, c) in enumerate(local):
        lo = np.maximum([i - 1, r - 1, c - 1], 0)
        hi = np.minimum([i + 2, r + 2, c + 2], shape)
        mean3[k] = crops[k, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].mean()
    return centre, mean3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--results", default="results", help="a finished run's results/ folder")
    parser.add_argument("--out", default="hu_baseline.md",
                        help="markdown table to write (benchmarks/results/hu_baseline.md gathers several runs' "
                        "tables and notes by hand: copy the new table there, do not overwrite it)")
    a = parser.parse_args()
    results = Path(a.results)
    out = Path(a.out).resolve()
    if out.suffix != ".md" or results.resolve() in out.parents:
        parser.error(f"--out {a.out}: a markdown file (.md) outside --results {a.results}, whose files it reads")
    splits = read_splits_tsv(results / "splits.tsv")
    metrics = pd.read_csv(results / "validation" / "metrics.tsv", sep="\t", dtype={"fold": str})
    folds = [int(f) for f in metrics["fold"] if f != "all"]
    val = set(splits.loc[splits["fold"].isin(folds), "series_uid"])
    labels, centre, mean3 = [], [], []
    for path in sorted((results / "crops").glob("*.h5")):
        store = CropStore(path)
        rows = np.flatnonzero(store.table["series_uid"].isin(val).to_numpy())
        c, m = centre_scores(store, rows)
        labels.append(store.table["is_nodule"].to_numpy()[rows])
        centre.append(c)
        mean3.append(m)
    y = np.concatenate(labels)
    rows_md = [
        ("centre voxel HU", auc_score(y, np.concatenate(centre))),
        ("mean HU of the central 3x3x3 voxels", auc_score(y, np.concatenate(mean3))),
    ]
    pooled = metrics[metrics["fold"] == "all"].iloc[0]
    rows_md.append((f"LunaModel (results/validation/metrics.tsv, pooled row; CPM {float(pooled['cpm']):.4f})",
                    float(pooled["auc"])))
    lines = [
        f"# Centre-HU baseline vs. the CNN ({datetime.date.today()})",
        "",
        f"Test folds {', '.join(map(str, folds))} of `{results}`: {len(y)} candidates, {int((y == 1).sum())} positive, "
        f"in {len(val)} scans.",
        "",
        "| score | ROC AUC on the test folds |",
        "|---|---:|",
        *[f"| {name} | {auc:.4f} |" for name, auc in rows_md],
    ]
    text = "\n".join(lines) + "\n"
    with atomic_path(a.out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
