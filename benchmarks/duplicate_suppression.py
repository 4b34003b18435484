"""Suppressing near-duplicate candidates after prediction: what it would buy on held-out development scans.

LUNA16's FROC counts a nodule once however many candidates hit it, but counts every candidate that hits no
nodule as a false positive. Where two candidates lie a few millimetres apart on the same vessel or wall, both
are false positives when they score high. A post-processing step common in detection systems keeps, in each
scan, the higher-scoring candidate of such a pair and lowers the other's probability (non-maximum
suppression, NMS): fewer false positives per scan at every cut, at the risk of lowering a nodule's candidate
that lies next to a higher-scoring non-nodule one.

This script measures it on models already trained on the development data (``epoch_budget.py`` /
``tta_views.py`` run folders under ``--work/runs``): each run's cached dev-test views (the 150 scans of
synthetic seed 8, nothing trained or chosen on them; views predicted and cached when missing) are averaged as
``--tta`` averages them, then, per scan, candidates are visited from the highest probability down and any
candidate closer than ``radius`` mm to one already kept has its probability multiplied by ``--factor`` (it
drops below every kept candidate of the scan, keeping its order among the suppressed). CPM with and without,
and the difference with a paired scan bootstrap (the same resampled scans for both). Nothing here reads the
default run's data, and no labels are used to suppress.

    python benchmarks/duplicate_suppression.py --work /tmp/sweep --runs budget-s0-e8-amp-off budget-s1-e8-amp-off \\
        --out benchmarks/results/duplicate_suppression.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from luna.app import DefaultsHelpFormatter
from luna.io import atomic_path

import quality_sweep as q
import tta_views

XYZ = ["coord_x", "coord_y", "coord_z"]


def suppress(frame: pd.DataFrame, radius_mm: float, factor: float) -> np.ndarray:
    """Probabilities after greedy per-scan NMS: a candidate within ``radius_mm`` of a higher-scoring kept one
    gets ``probability * factor`` (``frame``: series_uid, coord_x/y/z, probability)."""
    out = frame["probability"].to_numpy(dtype=np.float64).copy()
    for rows in frame.groupby("series_uid", sort=False).indices.values():
        xyz = frame[XYZ].to_numpy(dtype=np.float64)[rows]
        p = out[rows]
        close = ((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1) < radius_mm**2
        kept = np.zeros(rows.size, dtype=bool)
        new = p.copy()
        for i in np.argsort(-p, kind="mergesort"):
            if (close[i] & kept).any():
                new[i] = p[i] * factor
            else:
                kept[i] = True
        out[rows] = new
    return out


def bootstrap_cpms(frame: pd.DataFrame, dev: q.DevtestSet, n_bootstrap: int, seed: int) -> np.ndarray:
    """CPM of each scan-bootstrap sample (luna.froc.froc_bootstrap's draws for ``seed``: the same scans are drawn
    for every frame of the same dev-test set, which makes differences paired)."""
    from luna.froc import froc_bootstrap_samples

    return froc_bootstrap_samples(frame, dev.nodules, dev.scans, dev.ignored, n_bootstrap=n_bootstrap,
                                  seed=seed).mean(axis=1)


def operating_point(selection: pd.DataFrame, policy: str, frame: pd.DataFrame, radius_mm: float | None,
                    factor: float) -> tuple[float, float]:
    """Candidate recall and precision on ``frame`` (dev-test) at the threshold ``policy`` picks on the run's
    selection predictions (``selection_predictions.tsv``: the views of its own selection pass, its train.tta),
    both suppressed at ``radius_mm`` (None: neither)."""
    from luna.metrics import choose_threshold

    p_sel, p_dev = selection["probability"].to_numpy(), frame["probability"].to_numpy()
    if radius_mm is not None:
        p_sel, p_dev = suppress(selection, radius_mm, factor), suppress(frame, radius_mm, factor)
    threshold = choose_threshold(selection["is_nodule"].to_numpy(), p_sel, policy, selection["series_uid"].nunique())
    called, positive = p_dev > threshold, frame["is_nodule"].to_numpy() == 1
    return float((called & positive).sum() / positive.sum()), float((called & positive).sum() / max(1, called.sum()))


def neighbour_shares(frame: pd.DataFrame, radii: list[float]) -> dict[float, float]:
    """Share of candidates with another candidate of the same scan closer than each radius."""
    nearest = []
    for rows in frame.groupby("series_uid", sort=False).indices.values():
        xyz = frame[XYZ].to_numpy(dtype=np.float64)[rows]
        d = np.sqrt(((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        nearest.append(d.min(axis=1))
    near = np.concatenate(nearest)
    return {r: float((near < r).mean()) for r in radii}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="quality_sweep.py's scratch folder (data, runs)")
    p.add_argument("--runs", nargs="+", required=True, help="run folders under WORK/runs (each with 0/model.pt)")
    p.add_argument("--devtest-seed", type=int, default=8, help="synthetic seed of the dev-test data (all scans)")
    p.add_argument("--tta", default="flip2z", help="view set averaged before suppression (luna.inference.TTA_FLIPS)")
    p.add_argument("--radii", nargs="+", type=float, default=[3.0, 5.0, 7.0, 10.0], help="suppression radii, mm")
    p.add_argument("--factor", type=float, default=0.01,
                   help="what a suppressed candidate's probability is multiplied by")
    p.add_argument("--bootstrap", type=int, default=200, help="paired scan-bootstrap samples")
    p.add_argument("--out", required=True, type=Path, help="markdown table")
    args = p.parse_args(argv)
    if args.devtest_seed == q.CONFIG["synthetic"]["seed"]:
        raise SystemExit("--devtest-seed must differ from the default run's synthetic seed")
    views_of = tta_views.view_sets()
    if args.tta not in views_of:
        raise SystemExit(f"--tta {args.tta}: one of {', '.join(views_of)}")
    import torch

    from luna.froc import froc

    dev = q.devtest_set(args.work, args.devtest_seed)
    shares = neighbour_shares(dev.frame, args.radii)
    rows = []
    for run in args.runs:
        views = tta_views.cached_views(args.work / "runs" / run, dev, views_of[args.tta])
        frame = dev.frame.copy()
        frame["probability"] = np.mean([views[v] for v in views_of[args.tta]], axis=0)
        base = bootstrap_cpms(frame, dev, args.bootstrap, 0)
        folder = args.work / "runs" / run / "0"
        policy = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)["threshold_policy"]
        selection = pd.read_csv(folder / "selection_predictions.tsv", sep="\t")
        row = {"run": run, "base": froc(frame, dev.nodules, dev.scans, dev.ignored).cpm,
               "op": {None: operating_point(selection, policy, frame, None, args.factor)}}
        for r in args.radii:
            suppressed = frame.copy()
            suppressed["probability"] = suppress(frame, r, args.factor)
            delta = bootstrap_cpms(suppressed, dev, args.bootstrap, 0) - base
            row[r] = (froc(suppressed, dev.nodules, dev.scans, dev.ignored).cpm, *np.percentile(delta, [2.5, 97.5]))
            row["op"][r] = operating_point(selection, policy, frame, r, args.factor)
        rows.append(row)
        print(run, f"{row['base']:.3f}", *(f"r{r:g}: {row[r][0]:.3f}" for r in args.radii), flush=True)
    write_table(args, rows, shares)
    return 0


def write_table(args: argparse.Namespace, rows: list[dict], shares: dict[float, float]) -> None:
    radii = args.radii
    lines = ["# Suppressing near-duplicate candidates (benchmarks/duplicate_suppression.py)", "",
             f"Dev-test data: synthetic seed {args.devtest_seed}, every scan; views `{args.tta}` averaged, then "
             f"per-scan greedy suppression (probability x {args.factor:g} within the radius of a higher-scoring kept "
             "candidate). "
             f"CPM change with its 95% paired scan-bootstrap interval ({args.bootstrap} samples).", "",
             "Candidates with another candidate closer than the radius: "
             + ", ".join(f"{r:g} mm {shares[r]:.1%}" for r in radii) + ".", "",
             "| run | CPM | " + " | ".join(f"{r:g} mm: CPM (change, 95% CI)" for r in radii) + " |",
             "|---|---:|" + "---|" * len(radii)]
    for row in rows:
        cells = [f"{row[r][0]:.3f} ({row[r][0] - row['base']:+.3f}, {row[r][1]:+.3f} to {row[r][2]:+.3f})"
                 for r in radii]
        lines.append(f"| {row['run']} | {row['base']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| mean over runs | " + f"{np.mean([r['base'] for r in rows]):.3f} | "
              + " | ".join(f"{np.mean([row[r][0] for row in rows]):.3f} "
                           f"({np.mean([row[r][0] - row['base'] for row in rows]):+.3f})" for r in radii) + " |"]
    lines += ["", "Operating point: candidate recall / precision on the dev-test candidates at the threshold the run's "
              "policy picks on its selection set (both suppressed alike, the threshold re-chosen):", "",
              "| run | none | " + " | ".join(f"{r:g} mm" for r in radii) + " |", "|---|---|" + "---|" * len(radii)]
    for row in rows:
        lines.append(f"| {row['run']} | " + " | ".join(f"{row['op'][r][0]:.3f} / {row['op'][r][1]:.3f}"
                                                        for r in [None, *radii]) + " |")
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
