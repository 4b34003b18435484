"""Which test-time augmentation views to average, measured on development models (paired: same weights).

Each run folder is one quality_sweep.py run (``<run>/0/model.pt``). Every one of the eight mirror views of a
(N, 1, I, R, C) batch (none, depth, rows, columns and their combinations) is predicted once over every scan of
the dev-test data set (synthetic seed 8, built by quality_sweep.py under ``--work``) and cached in
``<run>/0/tta_views/``; the table then scores the view sets of :data:`luna.inference.TTA_FLIPS` by averaging the
cached probabilities, as
:func:`luna.inference.tta_probabilities` does: dev-test CPM with a 200-resample scan bootstrap, ROC AUC, the
CPM of each 30-scan block (one subset, a test fold's size) and its change against flip2 on the same block.
Nothing here reads the default run's data.

    python benchmarks/tta_views.py --work /tmp/sweep --runs /tmp/sweep/runs/sel10-s0 /tmp/sweep/runs/sel10-s1 \\
        --out benchmarks/results/tta_views.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

import quality_sweep as q
from luna.app import DefaultsHelpFormatter

DIM_NAMES = {2: "depth", 3: "rows", 4: "columns"}


class Mirrored(torch.nn.Module):
    """The model applied to its input mirrored along ``dims``: one TTA view through the plain predict path."""

    def __init__(self, model: torch.nn.Module, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.dims = model, dims

    def forward(self, batch: torch.Tensor):  # noqa: ANN201 (the model's own output tuple)
        return self.model(torch.flip(batch, self.dims) if self.dims else batch)


def view_name(dims: tuple[int, ...]) -> str:
    return "+".join(DIM_NAMES[d] for d in dims) or "none"


def view_sets() -> dict[str, tuple[tuple[int, ...], ...]]:
    """The shipped TTA settings (flip2z, the point mirror, is two views at flip2's cost)."""
    from luna.inference import TTA_FLIPS

    return dict(TTA_FLIPS)


def cached_views(run: Path, dev: q.DevtestSet,
                 views_wanted: tuple[tuple[int, ...], ...] | None = None) -> dict[tuple[int, ...], np.ndarray]:
    """{view dims: probabilities of every dev-test candidate, in ``dev.rows`` order} for ``views_wanted`` (default:
    every mirror view); predicts the views not yet cached."""
    from luna.inference import TTA_FLIPS, predict
    from luna.model import load_model
    from luna.validation import use_channels_last

    rows = dev.rows  # is_nodule comes with the stores' table; no losses are needed here
    cache = run / "0" / "tta_views"
    cache.mkdir(exist_ok=True)
    model, checkpoint = load_model(run / "0" / "model.pt", map_location="cpu")
    channels_last = use_channels_last("auto", checkpoint)
    views = {}
    for dims in views_wanted or TTA_FLIPS["flip8"]:
        path = cache / f"{view_name(dims)}.npy"
        if not path.exists():
            p = predict(Mirrored(model, dims), dev.stores, rows, channels_last=channels_last).probability
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, np.stack([rows["candidate_id"].to_numpy(np.float64), p.astype(np.float64)]))
            os.replace(tmp, path)
        ids, probability = np.load(path)
        if not np.array_equal(ids, rows["candidate_id"].to_numpy(np.float64)):
            raise SystemExit(f"{path}: candidates differ from the dev-test stores; delete {cache} and rerun")
        views[dims] = probability
    return views


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="quality_sweep.py's scratch folder (holds the dev-test data)")
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="quality_sweep.py run folders (<run>/0/)")
    p.add_argument("--devtest-seed", type=int, default=8, help="synthetic seed of the dev-test data (not 16)")
    p.add_argument("--out", required=True, type=Path, help="markdown table to write")
    a = p.parse_args(argv)
    if a.devtest_seed == q.CONFIG["synthetic"]["seed"]:  # what chooses the views must never be the default run's data
        raise SystemExit(f"--devtest-seed {a.devtest_seed} is the default run's seed: choose on other data")
    from luna.froc import froc

    dev = q.devtest_set(Path(a.work), a.devtest_seed)
    table, scans, nodules, ignored, frame = dev.splits, dev.scans, dev.nodules, dev.ignored, dev.frame
    blocks = [table.loc[table["fold"] == f, "series_uid"].tolist() for f in sorted(table["fold"].unique())]
    lines = ["# Test-time augmentation views on development models (benchmarks/tta_views.py)", "",
             f"Dev-test data: synthetic seed {a.devtest_seed}, {len(scans)} scans, {len(blocks)} blocks of "
             f"{len(blocks[0])}; runs: {', '.join(str(r) for r in a.runs)}. Same weights in every row of a run.", ""]
    for run in a.runs:
        views = cached_views(run, dev)
        lines += [f"## {run.name}", "",
                  "| views | n | dev-test CPM (95% CI) | ROC AUC | CPM of each block | change vs flip2, per block |",
                  "|---|---:|---|---:|---|---|"]
        block_cpm = {}
        for name, dims_set in view_sets().items():
            frame["probability"] = np.mean([views[d] for d in dims_set], axis=0)
            score = q.devtest_scores(frame, nodules, scans, ignored)
            block_cpm[name] = np.array([froc(frame, nodules, b, ignored).cpm for b in blocks])
            change = " ".join(f"{x:+.3f}" for x in block_cpm[name] - block_cpm["flip2"]) if "flip2" in block_cpm else ""
            lines.append(f"| {name} | {len(dims_set)} | {score['dt_cpm']:.3f} ({score['dt_low']:.3f}-"
                         f"{score['dt_high']:.3f}) | {score['dt_auc']:.3f} | "
                         f"{' '.join(f'{x:.3f}' for x in block_cpm[name])} | {change} |")
            print(lines[-1], flush=True)
        lines.append("")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
