"""Small nodules drawn more often as positives: does it lift the sensitivity where the misses are?

On the development models, detection depends on nodule size: at 1 false positive per dev-test scan, nodules up
to 5 mm are found about half the time, 5-7 mm three times in four, larger ones more than nine in ten
(printed by this script for the baseline runs too). The book's balanced order cycles through the positive
candidates uniformly, so a 4 mm nodule is trained on as often as a 15 mm one. Here the positive list is
expanded before it is shuffled and cycled: each positive candidate appears ``w`` times, ``w`` = 3 up to 5 mm, 2
above 5 and up to 7 mm, 1 above (fixed before any run). The negatives, the 1:1 ratio, the samples per epoch
and everything else are config/config.yaml's recipe; luna-train runs unchanged but for ``luna.data.balanced_indices``,
which this script replaces for the run (the option does not exist in luna-train).

Decision rule, written before the runs: taken (as a luna-train option, on in the default) only if the mean
dev-test CPM with the recipe's views (flip2z) over training seeds 0 and 1 rises by at least 0.01 against the
same seeds' runs of the plain recipe, and neither seed loses. Baselines: ``epoch_budget.py --amp off`` runs
(``budget-s{seed}-e8-amp-off``, the same recipe, code and machine kind). Nothing here reads the default run's data.

    python benchmarks/size_weighted_positives.py --work /tmp/sweep --seeds 0 1 \\
        --out benchmarks/results/size_weighted_positives.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import luna.data as data_module
from luna.app import DefaultsHelpFormatter
from luna.io import atomic_path

import epoch_budget
import quality_sweep as q
import tta_views

BINS_MM = (0.0, 5.0, 7.0, 10.0, np.inf)


def weights_of(diameter_mm: np.ndarray) -> np.ndarray:
    """Copies of each positive in the cycled list: 3 up to 5 mm, 2 up to 7 mm, else 1."""
    d = np.asarray(diameter_mm, dtype=np.float64)
    return np.where(d <= 5.0, 3, np.where(d <= 7.0, 2, 1)).astype(np.int64)


class SizeWeighted:
    """Stand-in for luna.data.balanced_indices: the book's order with the positive list expanded by size."""

    def __init__(self) -> None:
        self.diameter_mm: np.ndarray | None = None
        self._init = data_module.CropDataset.__init__
        self._balanced = data_module.balanced_indices

    def __enter__(self) -> SizeWeighted:
        outer = self

        def init(dataset, *args, **kwargs) -> None:  # noqa: ANN001 - CropDataset's own signature
            outer._init(dataset, *args, **kwargs)
            if dataset.role == "train":
                outer.diameter_mm = dataset.rows["diameter_mm"].to_numpy(dtype=np.float64)

        data_module.CropDataset.__init__ = init
        data_module.balanced_indices = self
        return self

    def __exit__(self, *exc: object) -> None:
        data_module.CropDataset.__init__ = self._init
        data_module.balanced_indices = self._balanced

    def __call__(self, labels: np.ndarray, ratio: float, n_samples: int, rng: np.random.Generator) -> np.ndarray:
        labels = np.asarray(labels)
        if self.diameter_mm is None or len(self.diameter_mm) != len(labels):
            raise RuntimeError("the training crops' diameters were not recorded")
        positives = np.flatnonzero(labels > 0)
        negatives = np.flatnonzero(labels <= 0)
        positives = np.repeat(positives, weights_of(self.diameter_mm[positives]))
        positives = positives[rng.permutation(len(positives))]
        negatives = negatives[rng.permutation(len(negatives))]
        i = np.arange(n_samples, dtype=np.int64)
        pos_ndx = np.floor(i / (ratio + 1.0)).astype(np.int64)
        is_pos = np.diff(pos_ndx, prepend=-1) > 0
        neg_ndx = (i - 1 - pos_ndx) % len(negatives)
        return np.where(is_pos, positives[pos_ndx % len(positives)], negatives[neg_ndx])


def by_size(frame: pd.DataFrame, diameter_mm: np.ndarray) -> dict[str, float]:
    """Share of dev-test nodules (series, diameter) whose best candidate scores above the probability of the
    scans' 1-false-positive-per-scan cut, per size bin."""
    f = frame.assign(d=diameter_mm)
    negatives = np.sort(f.loc[f["is_nodule"] == 0, "probability"].to_numpy())[::-1]
    cut = negatives[min(len(negatives) - 1, f["series_uid"].nunique() - 1)]  # the n_scans-th highest negative
    best = f[f["is_nodule"] == 1].groupby(["series_uid", "d"])["probability"].max().reset_index()
    out = {}
    for low, high in zip(BINS_MM[:-1], BINS_MM[1:]):
        in_bin = best[(best["d"] > low) & (best["d"] <= high)]
        name = f"{low:g}-{high:g} mm" if np.isfinite(high) else f"> {low:g} mm"
        out[name] = float((in_bin["probability"] > cut).mean()) if len(in_bin) else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="quality_sweep.py's scratch folder (data, runs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    q.add_seed_options(p)
    p.add_argument("--out", required=True, type=Path, help="markdown table")
    a = p.parse_args(argv)
    q.check_seeds(a)
    from luna.inference import TTA_FLIPS
    from luna.training import LunaTrainingApp

    data = q.build_data(a.work, a.dev_seed, 2, q.CONFIG["synthetic"])
    dev = q.devtest_set(a.work, a.devtest_seed)
    diameters = dev.rows["diameter_mm"].to_numpy(dtype=np.float64)
    epochs = int(q.CONFIG["train"]["epochs"])
    results = []
    for seed in a.seeds:
        for variant in ("plain", "size-weighted"):
            run = a.work / "runs" / (f"budget-s{seed}-e{epochs}-amp-off" if variant == "plain" else f"sizew-s{seed}")
            seconds = float("nan")
            if not (run / "0" / "model.pt").exists():
                if variant == "plain":
                    raise SystemExit(f"{run}: no baseline; run benchmarks/epoch_budget.py --amp off --epochs {epochs}")
                t0 = time.perf_counter()
                with SizeWeighted(), contextlib.redirect_stderr(io.StringIO()) as err:
                    rc = LunaTrainingApp(epoch_budget.train_argv(data, seed, epochs, run / "0",
                                                                 a.work / "runs" / f"sizew-s{seed}-state")).main()
                if rc != 0:
                    raise SystemExit(f"seed {seed}: luna-train failed (rc {rc}): {err.getvalue().strip()[-500:]}")
                seconds = time.perf_counter() - t0
            recipe_views = q.CONFIG["train"]["tta"]
            views = tta_views.cached_views(run, dev, TTA_FLIPS[recipe_views])
            for name, dims in (("none", TTA_FLIPS["none"]), (recipe_views, TTA_FLIPS[recipe_views])):
                frame = dev.frame.copy()
                frame["probability"] = np.mean([views[d] for d in dims], axis=0)
                score = q.devtest_scores(frame, dev.nodules, dev.scans, dev.ignored)
                results.append({"seed": seed, "variant": variant, "views": name, "seconds": seconds, **score,
                                 **by_size(frame, diameters)})
                r = results[-1]
                print(f"seed {seed} {variant:13s} {name:6s} CPM {r['dt_cpm']:.3f} "
                      f"({r['dt_low']:.3f}-{r['dt_high']:.3f})"
                      f" AUC {r['dt_auc']:.3f}", flush=True)
    write_table(a, results)
    return 0


def write_table(a: argparse.Namespace, results: list[dict]) -> None:
    bins = [k for k in results[0] if k.endswith(" mm")]
    lines = ["# Small nodules drawn more often as positives (benchmarks/size_weighted_positives.py)", "",
             f"Development data: synthetic seed {a.dev_seed}, fold 0 held out; dev-test: seed {a.devtest_seed}, every "
             "scan. config/config.yaml's recipe (float32), 8 epochs; `size-weighted`: each positive candidate 3 times "
             "in the cycled positive list up to 5 mm, twice up to 7 mm. Detected: share of dev-test nodules whose best "
             "candidate beats the 1-false-positive-per-scan cut.", "",
             "| seed | positives | views | dev-test CPM (95% CI) | ROC AUC | "
             + " | ".join(f"detected, {b}" for b in bins)
             + " |", "|---:|---|---|---|---:|" + "---:|" * len(bins)]
    for r in results:
        lines.append(f"| {r['seed']} | {r['variant']} | {r['views']} | {r['dt_cpm']:.3f} ({r['dt_low']:.3f}-"
                     f"{r['dt_high']:.3f}) | {r['dt_auc']:.3f} | " + " | ".join(f"{r[b]:.2f}" for b in bins) + " |")
    table = pd.DataFrame(results)
    mean = table.groupby(["views", "variant"], sort=False)["dt_cpm"].mean()
    lines += ["", "| views | plain, mean CPM | size-weighted, mean CPM | change |", "|---|---:|---:|---:|"]
    for views in table["views"].unique():
        if (views, "size-weighted") in mean and (views, "plain") in mean:
            lines.append(f"| {views} | {mean[(views, 'plain')]:.3f} | {mean[(views, 'size-weighted')]:.3f} | "
                         f"{mean[(views, 'size-weighted')] - mean[(views, 'plain')]:+.3f} |")
    with atomic_path(a.out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
