"""Re-estimating the BatchNorm statistics of a development model's averaged (EMA) weights: does it change the
dev-test score? (Paired: the same weights in every row; only the five BatchNorm layers' running statistics differ.)

luna-train averages the running statistics together with the weights (``luna.recipe.ema_update``), so the kept
model's statistics are an average over the last ~100 steps of statistics that the *trained* weights produced,
not the ones its own averaged weights produce. Stochastic weight averaging re-estimates them with a forward
pass (torch.optim.swa_utils.update_bn); this measures whether that is worth a step in luna-train. Each row resets
the statistics, runs the averaged weights in training mode (no gradients) over training crops of the development
fold (the run's own training scans: balanced 1:1 with the book's augmentation as in training, balanced 1:1
without augmentation, or the data's own mix without augmentation), and scores the result without TTA on every
scan of the dev-test data set (quality_sweep.py's seed 8), as quality_sweep.py does. Nothing reads the default
run's data.

    python benchmarks/bn_recalibration.py --work /tmp/sweep --runs /tmp/sweep/runs/sel10-s0 \\
        --out benchmarks/results/bn_recalibration.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from luna.app import DefaultsHelpFormatter
from luna.io import atomic_path

import quality_sweep as q

# name -> (negatives per positive, 0 = the data's own mix; augmented as in training)
SOURCES = {"balanced 1:1, augmented (as trained)": (1, True), "balanced 1:1, not augmented": (1, False),
           "the data's own mix, not augmented": (0, False)}


def recalibrated(model: torch.nn.Module, crops: torch.Tensor, labels: np.ndarray, n: int, ratio: int,
                 augmented: bool, seed: int, batch_size: int = 64) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the cumulative mean over ``n`` training crops
    (``crops``: int16 (N, 1, I, R, C), resident) in the sampler's order for ``ratio``."""
    from luna.data import NO_AUGMENTATION, AugmentConfig, EpochSampler, augment_batch

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    sampler = EpochSampler(labels, ratio=ratio, samples_per_epoch=n, seed=seed)
    order = torch.as_tensor(list(sampler), dtype=torch.long)
    generator = torch.Generator()
    generator.manual_seed(seed)
    augment = AugmentConfig() if augmented else NO_AUGMENTATION
    with torch.no_grad():
        for lo in range(0, len(order), batch_size):
            batch = augment_batch(crops.index_select(0, order[lo:lo + batch_size]).float(), augment, generator)
            model(batch.contiguous(memory_format=torch.channels_last_3d))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="quality_sweep.py's scratch folder (holds both data sets)")
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="quality_sweep.py run folders (<run>/0/)")
    q.add_seed_options(p)
    p.add_argument("--crops-per-row", type=int, default=2048, help="training crops each re-estimation runs over")
    p.add_argument("--out", required=True, type=Path, help="markdown table to write")
    a = p.parse_args(argv)
    q.check_seeds(a)
    from luna.cpu_speed import tune_allocator
    from luna.data import CropDataset, ResidentBatches
    from luna.inference import predict
    from luna.model import load_model
    from luna.splits import read_fold_roles
    from luna.validation import open_stores

    tune_allocator()
    train_crops, train_splits, _, _ = q.build_data(Path(a.work), a.dev_seed, 2, q.CONFIG["synthetic"])
    dev = q.devtest_set(Path(a.work), a.devtest_seed)
    scans, frame = dev.scans, dev.frame
    roles = read_fold_roles(train_splits, 0, q.CONFIG["split"]["selection_fraction"])
    train = CropDataset(open_stores(train_crops), roles, "train", int16=True)
    resident = ResidentBatches.load(train, "cpu")
    lines = ["# BatchNorm statistics re-estimated for the averaged weights (benchmarks/bn_recalibration.py)", "",
             f"Development models of {', '.join(r.name for r in a.runs)} (training data: synthetic seed {a.dev_seed}, "
             f"fold 0's {len(train)} training crops, {train.n_pos} positive); each re-estimation over "
             f"{a.crops_per_row} of them; scored without TTA on every scan of the dev-test data set (seed "
             f"{a.devtest_seed}, {len(scans)} scans), 200 bootstrap resamples. CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}.", "",
             "| run | BatchNorm statistics | dev-test CPM (95% CI) | ROC AUC | change | seconds to re-estimate |",
             "|---|---|---|---:|---:|---:|"]
    for run in a.runs:
        model, _ = load_model(run / "0" / "model.pt", map_location="cpu")
        model.to(memory_format=torch.channels_last_3d)
        shipped = None
        for name, source in [("as kept (the EMA's averaged statistics)", None), *SOURCES.items()]:
            started = time.perf_counter()
            m = model if source is None else recalibrated(model, resident, train.labels, a.crops_per_row, *source,
                                                          seed=11)
            seconds = time.perf_counter() - started
            frame["probability"] = predict(m, dev.stores, dev.rows, channels_last=True).probability
            score = q.devtest_scores(frame, dev.nodules, scans, dev.ignored)
            shipped = score["dt_cpm"] if shipped is None else shipped
            lines.append(f"| {run.name} | {name} | {score['dt_cpm']:.3f} ({score['dt_low']:.3f}-{score['dt_high']:.3f}) "
                         f"| {score['dt_auc']:.3f} | {score['dt_cpm'] - shipped:+.3f} | "
                         f"{'' if source is None else f'{seconds:.0f}'} |")
            print(lines[-1], flush=True)
    with atomic_path(a.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
