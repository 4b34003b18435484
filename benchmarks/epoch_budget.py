"""What the default run's last epoch buys, paired on development models: 7 against 8 epochs of 3,750 samples
(``--epochs``: any list, e.g. 8 12 16 for what a faster CPU's spare minutes would buy).

Each training seed trains config/config.yaml's recipe for 7 epochs on the development data (synthetic seed 7,
test fold 0 held out as in quality_sweep.py), then the same run resumes for an 8th epoch: with the constant
learning rate, the per-step EMA warm-up and the per-epoch sampler orders, the first 7 epochs of an 8-epoch run
are exactly the 7-epoch run (luna-train's run fingerprint leaves the epoch count out for that reason). Not so
under ``train.augment.flip_only_epochs`` > 0 (1 in config/config.yaml since 2026-12-02): the flip-only epochs are
each run's last ones, so every length trains afresh (the fingerprint then holds the epoch count; the rows are
then separate trajectories, not one resumed). The tables in benchmarks/results were run before it. Each
model's selection pass after its last epoch chooses its threshold (``fp_per_scan:2.5``), as in the default run.
Both models are scored on the 150 dev-test scans (synthetic seed 8, nothing trained or chosen on them) with
no test-time views, the point mirror (2 views) and flip4z (4 views): CPM with a 200-resample scan bootstrap,
ROC AUC, and in how many of its five 30-scan blocks (a test fold's size) the operating point (recall >= 0.8 at
precision >= 0.3, at the model's threshold) is met. Nothing here reads the default run's data.

    python benchmarks/epoch_budget.py --work /tmp/sweep --seeds 0 1 --out benchmarks/results/epoch_budget.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from luna.app import DefaultsHelpFormatter
from luna.io import atomic_path

import quality_sweep as q
import tta_views
from threshold_policies import meets  # recall and precision of p > threshold against quality_sweep.GOAL

# table row -> luna.inference.TTA_FLIPS setting
VIEW_SETS = {"none": "none", "point mirror": "flip2z", "flip4z": "flip4z"}


def train_argv(data: tuple, seed: int, epochs: int, out: Path, state: Path, amp: str | None = None) -> list[str]:
    """luna-train's options for config/config.yaml's recipe on the development data's fold 0 (``amp``: another
    train.amp than the config's)."""
    from luna.runner import config_argv

    crops, splits, _, _ = data
    train = copy.deepcopy(q.CONFIG["train"])
    train.update(seed=seed, epochs=epochs, **({"amp": amp} if amp else {}))
    train.pop("gpus", None)
    return ["--crops", *crops, "--splits", splits, "--test-fold", "0",
            "--selection-fraction", str(q.CONFIG["split"]["selection_fraction"]), "--out", str(out),
            "--state", str(state), "--resume", "--tb-dir", "none", "--threads", "2", *config_argv(train)]


def train(data: tuple, seed: int, epochs: int, run: Path, state: Path, amp: str | None = None) -> float:
    """luna-train into ``run/0`` (resuming from ``state``); seconds taken."""
    from luna.training import LunaTrainingApp

    if (run / "0" / "model.pt").exists():
        return float("nan")
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = LunaTrainingApp(train_argv(data, seed, epochs, run / "0", state, amp)).main()
    if rc != 0:
        raise SystemExit(f"seed {seed}, {epochs} epochs: luna-train failed (rc {rc}): {err.getvalue().strip()[-500:]}")
    return time.perf_counter() - t0


def blocks_met(frame, dev: q.DevtestSet, threshold: float) -> str:
    """How many of the 30-scan dev-test blocks meet recall >= 0.8 at precision >= 0.3 (candidates at
    ``threshold``), as "K of N"."""
    blocks = sorted(dev.splits["fold"].unique())
    met = 0
    for fold in blocks:
        scans = set(dev.splits.loc[dev.splits["fold"] == fold, "series_uid"])
        met += meets(frame[frame["series_uid"].isin(scans)], threshold)
    return f"{met} of {len(blocks)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="scratch folder: development data and runs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    q.add_seed_options(p)
    p.add_argument("--epochs", nargs="+", type=int, default=None,
                   help="epoch counts, each resumed from the one before (default: the config's epochs - 1 and epochs)")
    p.add_argument("--views", nargs="+", choices=sorted(VIEW_SETS.values()), default=list(VIEW_SETS.values()),
                   help="test-time view sets to score (each flip4z view costs a dev-test prediction pass)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default=None,
                   help="train.amp for every run (default: the config's); runs go to their own folders")
    p.add_argument("--out", required=True, type=Path, help="markdown table to write")
    a = p.parse_args(argv)
    q.check_seeds(a)
    from luna.inference import TTA_FLIPS
    from luna.model import load_model

    data = q.build_data(a.work, a.dev_seed, 2, q.CONFIG["synthetic"])
    dev = q.devtest_set(a.work, a.devtest_seed)
    epochs = int(q.CONFIG["train"]["epochs"])
    counts = sorted(set(a.epochs or [epochs - 1, epochs]))
    if counts[0] < 1:
        raise SystemExit(f"--epochs: {counts[0]} is not a positive number of epochs")
    base = epochs if epochs in counts else counts[-1]
    per_epoch = q.CONFIG["train"]["samples_per_epoch"]
    length = (f"{counts[0]} epochs, then the same run resumed to {', '.join(map(str, counts[1:]))} epochs (paired: one "
              f"trajectory per seed; {per_epoch} samples an epoch)" if len(counts) > 1
              else f"{counts[0]} epochs ({per_epoch} samples an epoch)")
    lines = ["# The last epoch's worth on development models (benchmarks/epoch_budget.py)", "",
             f"Development data: synthetic seed {a.dev_seed}, fold 0 held out; dev-test data: seed {a.devtest_seed}, "
             f"{len(dev.scans)} scans ({len(dev.nodules)} nodules) in five 30-scan blocks. config/config.yaml's "
             f"recipe{f' with amp {a.amp}' if a.amp else ''}; {length}. Threshold: each model's own selection pass. "
             "Blocks: 30-scan dev-test blocks meeting "
             "recall >= 0.8 at precision >= 0.3.", "",
             "| seed | epochs | training s (this call: the epochs it added when resumed) | views | dev-test CPM (95% CI) | ROC AUC | threshold | blocks met |",
             "|---:|---:|---:|---|---|---:|---:|---:|"]
    sets = {name: setting for name, setting in VIEW_SETS.items() if setting in a.views}
    wanted = tuple(dict.fromkeys(d for setting in sets.values() for d in TTA_FLIPS[setting]))  # each view once
    cpm: dict[tuple[int, int, str], float] = {}
    for seed in a.seeds:
        tag = f"-amp-{a.amp}" if a.amp else ""
        state = a.work / "runs" / f"budget-s{seed}{tag}-state"
        for n in counts:
            run = a.work / "runs" / f"budget-s{seed}-e{n}{tag}"
            seconds = train(data, seed, n, run, state, a.amp)
            _, checkpoint = load_model(run / "0" / "model.pt", map_location="cpu")
            threshold = float(checkpoint["threshold"])
            views = tta_views.cached_views(run, dev, wanted)  # every view of the sets scored
            for name, setting in sets.items():
                frame = dev.frame.copy()
                frame["probability"] = np.mean([views[d] for d in TTA_FLIPS[setting]], axis=0)
                score = q.devtest_scores(frame, dev.nodules, dev.scans, dev.ignored)
                cpm[(seed, n, name)] = score["dt_cpm"]
                # the threshold was chosen with the recipe's views (its train.tta): the operating point is theirs
                met = blocks_met(frame, dev, threshold) if setting == q.CONFIG["train"]["tta"] else ""
                lines.append(f"| {seed} | {n} | {seconds:.0f} | {name} | {score['dt_cpm']:.3f} ({score['dt_low']:.3f}-"
                             f"{score['dt_high']:.3f}) | {score['dt_auc']:.3f} | {threshold:.3f} | {met} |")
                print(lines[-1], flush=True)
        shutil.rmtree(state, ignore_errors=True)  # every model is written; the resumable state is spent
    for n in (c for c in counts if c != base):
        lines += ["", f"Change from {base} to {n} epochs, per seed:", ""]
        for name in sets:
            diffs = [cpm[(s, n, name)] - cpm[(s, base, name)] for s in a.seeds]
            lines.append(f"- {name}: {' '.join(f'{d:+.3f}' for d in diffs)} (mean {np.mean(diffs):+.3f})")
    with atomic_path(a.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
