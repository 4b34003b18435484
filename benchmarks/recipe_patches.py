"""Recipe changes tried on development data by patching one function (or one config value) for the run: does a
change lift the dev-test CPM? (``clean-last`` did: luna-train's ``--augment-flip-only-epochs``, 1 in
config/config.yaml since; its patch stays to reproduce the table.)

The patches (``--patch``), each fixed before any run:

* ``size-weighted`` (small nodules drawn more often as positives). On the development models, detection depends
  on nodule size: at 1 false positive per dev-test scan, nodules up to 5 mm are found about half the time, 5-7
  mm three times in four, larger ones more than nine in ten. The book's balanced order cycles the positive
  candidates uniformly; here the positive list is expanded before it is shuffled and cycled, each positive
  candidate ``w`` times: 3 up to 5 mm, 2 above 5 and up to 7 mm, 1 above (``luna.data.balanced_indices``
  replaced).
* ``depth-scale`` (slice-thickness augmentation). Small nodules in scans with slices thicker than 1.3 mm are
  found less often than in thin-slice scans (the table's last two columns): the crop is the
  book's, in voxels, so a nodule's depth extent in voxels depends on the scan's slice spacing. Here each
  training sample's affine also scales the depth axis by ``exp(u ln 1.6)``, ``u`` uniform in [-1, 1) (0.625x to
  1.6x, on top of the book's per-axis +-20%), so thin-slice nodules are also seen as thick-slice ones and the
  other way round (``luna.data.random_affine`` wrapped).
* ``clean-last`` (the last epoch on nearly clean crops). Every training crop is resampled through a random
  affine (trilinear: it blurs even at a small angle) and gets 25 HU of noise, while the selection and test crops
  are the raw voxels; the training loss ends above the selection loss. Here the last epoch keeps the random
  flips (voxel centres map onto voxel centres: the voxels mirrored, to 0.005 HU) and drops the offset, scale,
  rotation and noise, so the model's last ~234 steps see crops as they are predicted (the ``augment_config``
  luna.training calls each epoch wrapped; epochs 1 to 7 are the baseline's, step for step).
* ``clean-last-2``: the same for the last two epochs (7 and 8), measured after ``clean-last`` was taken. Its rule,
  written before its runs: two flip-only epochs only if the mean flip2z dev-test CPM over seeds 0 and 1 rises by
  at least 0.01 against the same seeds' ``clean-last`` runs (``cleanlast-s{seed}``) and neither seed loses. Run on
  2026-12-03 (2 Zen 4 cores, float32), its ``cleanlast-s{seed}`` runs trained afresh on the same box first, each by
  ``epoch_budget.train`` inside ``PATCHES["clean-last"]()``, which is what ``--patch clean-last`` does (that
  command would also score its plain baselines, which need ``epoch_budget.py --amp off`` runs): mean flip2z dev-test
  CPM 0.839 -> 0.840 (+0.003, -0.001), not taken (quality.md, "nineteenth"). Its first attempt (2026-12-02)
  ran through a wrapper the new option bypassed (epoch 7 stayed augmented) and was discarded. Since 2026-12-03
  (later) this command trains missing ``cleanlast-s{seed}`` baselines itself, with the ``clean-last`` patch, so it
  reproduces its table from an empty ``--work`` folder.

* ``last-epoch-lr`` (the last epoch at 0.3 times the learning rate). The recipe trains at a constant 0.001 after
  its warm-up and lets the EMA of the weights (decay 0.99) do the averaging; a cosine schedule over the whole run
  lost (quality.md, fourth: it lowers the rate from the first epochs on, while the model still underfits). Here
  only the last epoch, the flip-only one since ``clean-last`` was taken, runs at 0.0003, so the model's last ~234
  steps settle on crops as they are predicted (``scheduled_lr`` wrapped; epochs 1 to 7 are the baseline's, step
  for step). Rule, written on 2026-12-03 before its runs: taken (as a luna-train option, on in the default) only
  if the mean flip2z dev-test CPM over seeds 0 and 1 rises by at least 0.01 against the same seeds'
  ``cleanlast-s{seed}`` runs on the same machine and neither seed loses. The factor, 0.3, was fixed before
  the runs and is not tuned. Run on 2026-12-03 (2 Zen 4 cores, float32): mean flip2z dev-test CPM 0.839 -> 0.820
  (-0.011, -0.026), not taken (quality.md, "twentieth").

* ``selection-0.05`` (half the selection set). With ``keep: last`` the selection set chooses only the threshold,
  and halving it from 0.2 to 0.1 was the largest recipe gain measured (quality.md, fourth: +0.024 and +0.024
  dev-test CPM with flip2, 11 scans back in training), and the twentieth section's lower losses came with a
  lower dev-test CPM: more training scans, not more fitting, may be what the model lacks. Here
  ``split.selection_fraction`` is 0.05: about 8 of the development data's 120 non-test scans select instead of
  17, the threshold (``fp_per_scan:2.5``) rests on ~700 negatives instead of ~1,500. Rule, written on 2026-12-03
  before its runs: taken (config/config.yaml) only if the mean flip2z dev-test CPM over seeds 0 and 1 rises by
  at least 0.01 against the same seeds' ``cleanlast-s{seed}`` runs, neither seed loses, and the operating point
  (recall >= 0.8 at precision >= 0.3 at each model's own threshold) is met in no fewer of the 30-scan dev-test
  blocks than the baseline's in total. Run on 2026-12-03 (2 Zen 4 cores, float32): 7 selection scans instead of
  17, mean flip2z dev-test CPM 0.839 -> 0.807 (-0.038, -0.024), blocks met 8 of 10 either way: not taken
  (quality.md, "twenty-first").

* ``clip-20`` (gradient-norm clipping at 20 instead of 5). The recipe clips at 5 because the book's init gives
  first gradients of norm ~200 (quality.md, ninth); the norms recorded in a 3-epoch run of the recipe on the
  development data (seed 0, 2026-12-03) show the clip acting far beyond that: median 12.9 in epoch 1 (88% of
  steps clipped), then 5.1 and 5.5 in epochs 2 and 3 (52% and 59% clipped; 90th percentile 8.0 and 8.4, largest
  17.1 and 20.4). Adam normalises the step size, so what a clip at 5 does after the first epoch is to scale down
  the batches with the largest gradients, those with the most misclassified crops, relative to the rest. Here
  the clip is 20: it still bounds the first epoch's steps (the 200 warm-up steps are unchanged) and leaves the
  later ones nearly alone. Rule, written on 2026-12-03 before its runs: taken (``train.clip_grad_norm: 20``)
  only if the mean flip2z dev-test CPM over seeds 0 and 1 rises by at least 0.01 against the same seeds'
  ``cleanlast-s{seed}`` runs, neither seed loses, and the operating point is met in no fewer 30-scan dev-test
  blocks in total. The value 20 was fixed before the runs and is not tuned. The run records every step's norm
  (``grad_norms.npy`` in the run folder; a per-epoch table in the output).
  Run on 2026-12-03 (2 Zen 4 cores, float32): seed 0's dev-test CPM fell 0.835 -> 0.809 with flip2z (0.784 ->
  0.779 without views), and its training loss was higher from epoch 2 on (0.503 against 0.459 after epoch 2): not
  taken, seed 1 not run (the rule needs both seeds to gain; quality.md, "twenty-second"). The clip at 5 acted on
  42-69% of the steps of epochs 2 to 8 in that run.
* ``clip-2.5`` (gradient-norm clipping at 2.5 instead of 5), tried because ``clip-20`` lost with a slower fall of
  the training loss: if clipping the larger gradients is what speeds the first epochs, a tighter clip may speed
  them more (at 2.5 nearly every step is clipped after the first epoch: Adam on gradients of one norm). Rule,
  written on 2026-12-03 before its runs, as for ``clip-20``; seed 1 is run only if seed 0 gains. The value 2.5
  was fixed before the runs (half the recipe's, as 20 was four times it) and is not tuned.
  Run on 2026-12-03 (2 Zen 4 cores, float32): seed 0's dev-test CPM 0.835 -> 0.824 with flip2z (0.784 -> 0.794
  without views): not taken, seed 1 not run (quality.md, "twenty-second").
* ``warmup-50`` (a learning-rate warm-up of 50 steps instead of 200). A longer one (500) lost dev-test CPM -0.017
  (quality.md, tenth), about what its slower start would cost a run that is still learning at its end; the clip at
  5, which scales down 88-98% of the first epoch's steps (``clip-20``'s and ``clip-2.5``'s norms), already bounds
  what the first gradients (norm ~200) do. Here the warm-up is 50 steps, so 150 more steps run at the full rate.
  Rule, written on 2026-12-03 before its runs, as for ``clip-20``; seed 1 is run only if seed 0 gains. The value
  50 was fixed before the runs and is not tuned.
  Run on 2026-12-03 (2 Zen 4 cores, float32): seed 0's dev-test CPM 0.835 -> 0.808 with flip2z (0.784 -> 0.782
  without views), though its training loss fell faster (0.796 after epoch 1 against 0.976): not taken, seed 1
  not run (quality.md, "twenty-third").
* ``last-epoch-1to2`` (the last epoch at one positive per two negatives). On the default run's test fold the
  sensitivity is lowest at the fewest false positives (0.50-0.69 at 1/8 per scan, against 0.88-0.95 at 8): what
  costs CPM is a few negatives scored above nodules, and the negatives they are (nodule-sized vessel
  cross-sections, quality.md, third) are seen ~1.6 times each in 30,000 balanced samples. Here the last epoch, the
  flip-only one, draws two negatives per positive (``train.balanced_schedule: [[8, 2]]``: 2,500 negatives and
  1,250 positives instead of 1,875 each), so the model ends on more negatives as they are predicted; epochs 1 to 7
  are the recipe's step for step. A whole run at 1:3-then-1:8 lost (-0.06, the ground-glass nodules starve), two
  positives per negative lost too (-0.079): this changes only the last epoch. Rule, written on 2026-12-03 before
  its runs, as for ``clip-20``; seed 1 is run only if seed 0 gains. The ratio 2 and the one epoch were fixed
  before the runs and are not tuned.
  Run on 2026-12-03 (2 Zen 4 cores, float32): seed 0's dev-test CPM 0.835 -> 0.812 with flip2z (0.784 -> 0.773
  without views; epochs 1 to 7 identical to the baseline's): not taken, seed 1 not run (quality.md,
  "twenty-fourth").
* ``epochs-16`` (twice the training samples: 16 epochs of 3,750 instead of 8; a diagnostic, not a candidate). The
  default run's fold-0 CPM stays 0.02-0.03 short of 0.80 on every machine measured, and no recipe change tried
  since the eighteenth section gained beyond the noise of a one-seed screen. The eighth epoch was worth +0.016
  with flip2z (epoch_budget.md): is the recipe short of samples, which 2 AVX2 cores cannot give in 15 minutes,
  or near what this model reaches on this data? Here the recipe runs 16 epochs (60,000 samples, 3,760 steps, the
  last epoch flip-only as in the recipe; ~20 minutes of training on 2 Zen 4 cores). Nothing is taken from it
  (it does not fit the default run's budget); written on 2026-12-03 before its runs: seeds 0 and 1, both
  reported against their ``cleanlast-s{seed}`` runs, whatever they show.
  Run on 2026-12-03 (2 Zen 4 cores, float32; 21 min 50 s and 20 min 48 s of training): dev-test CPM with flip2z
  0.835 -> 0.845 and 0.842 -> 0.870 (mean +0.019; +0.021 and +0.026 without views): the model keeps learning,
  slowly (quality.md, "twenty-fifth").

Everything else is config/config.yaml's recipe (float32, 8 epochs, the same seeds); luna-train runs unchanged
but for the patched function. Decision rule, written before the runs: a patch would become a luna-train option,
on in the default, only if the mean dev-test CPM with the recipe's views (flip2z) over training seeds 0 and 1
rises by at least 0.01 against the same seeds' runs of the plain recipe, and neither seed loses. Baselines:
``epoch_budget.py --amp off`` runs (``budget-s{seed}-e8-amp-off``, the same recipe, code and machine kind), made
before config/config.yaml took ``augment.flip_only_epochs: 1``: a patch trained now also gets that flip-only last
epoch, so ``size-weighted`` and ``depth-scale`` need fresh baselines to be rerun. ``clean-last-2``'s baseline is
the ``clean-last`` runs (``BASELINES``), trained here with the ``clean-last`` patch when missing. Nothing here reads the default run's data.

    python benchmarks/recipe_patches.py --work /tmp/sweep --patch size-weighted --seeds 0 1 \\
        --out benchmarks/results/size_weighted_positives.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch depth-scale --seeds 0 1 \\
        --out benchmarks/results/depth_scale_augmentation.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch clean-last --seeds 0 1 \\
        --out benchmarks/results/clean_last_epoch.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch clean-last-2 --seeds 0 1 \\
        --out benchmarks/results/clean_last_two_epochs.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch last-epoch-lr --seeds 0 1 \\
        --out benchmarks/results/last_epoch_lr.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch selection-0.05 --seeds 0 1 \\
        --out benchmarks/results/selection_fraction_005.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch clip-20 --seeds 0 \\
        --out benchmarks/results/clip_20.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch clip-2.5 --seeds 0 \\
        --out benchmarks/results/clip_2p5.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch warmup-50 --seeds 0 \\
        --out benchmarks/results/warmup_50.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch last-epoch-1to2 --seeds 0 \\
        --out benchmarks/results/last_epoch_1to2.md
    python benchmarks/recipe_patches.py --work /tmp/sweep --patch epochs-16 --seeds 0 1 \\
        --out benchmarks/results/epochs_16.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import luna.data as data_module
from luna.app import DefaultsHelpFormatter
from luna.io import atomic_path

import epoch_budget
import quality_sweep as q
import tta_views

BINS_MM = (0.0, 5.0, 7.0, 10.0, np.inf)
THIN_MM = 1.3  # slice spacing up to which a scan counts as thin-sliced


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
        """luna.data.balanced_indices over the items with each positive repeated by its weight (the negatives,
        then the repeated positives in order: the lists it shuffles are the negatives and the repeated
        positives), mapped back to the items."""
        labels = np.asarray(labels)
        if self.diameter_mm is None or len(self.diameter_mm) != len(labels):
            raise RuntimeError("the training crops' diameters were not recorded")
        positives = np.flatnonzero(labels > 0)
        items = np.concatenate([np.flatnonzero(labels <= 0),
                                np.repeat(positives, weights_of(self.diameter_mm[positives]))])
        return items[self._balanced(labels[items], ratio, n_samples, rng)]


class DepthScale:
    """Wrapper of luna.data.random_affine: every sample's depth axis also scaled by exp(u ln ``factor``)."""

    def __init__(self, factor: float = 1.6) -> None:
        self.log_factor = float(np.log(factor))
        self._affine = data_module.random_affine

    def __enter__(self) -> DepthScale:
        data_module.random_affine = self
        return self

    def __exit__(self, *exc: object) -> None:
        data_module.random_affine = self._affine

    def __call__(self, n: int, config: data_module.AugmentConfig, generator, device="cpu"):  # noqa: ANN001
        theta = self._affine(n, config, generator, device)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32) * 2 - 1
        theta[:, 2, 2] = theta[:, 2, 2] * torch.exp(u * self.log_factor)  # row 2: the depth (index) axis, unrotated
        return theta


class CleanLast:
    """Wrapper of the ``augment_config`` luna.training calls each epoch: in the run's last ``n`` epochs, the
    augmentation is the flips alone (what ``--augment-flip-only-epochs n`` does since it exists; the table of
    2026-12-02 was made by wrapping ``LunaTrainingApp._train_epoch``, which the option's per-epoch call bypasses)."""

    def __init__(self, n: int = 1) -> None:
        import luna.training as training

        self.module = training
        self._config = training.augment_config
        self.n = n

    def __enter__(self) -> CleanLast:
        outer = self

        def config(args, epoch: int | None = None):  # noqa: ANN001, ANN202 - luna.recipe.augment_config's signature
            if epoch is not None and epoch > args.epochs - outer.n:
                return outer._config(args).flips_only()
            return outer._config(args, epoch)

        self.module.augment_config = config
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.augment_config = self._config


class LastEpochLr:
    """Wrapper of the ``scheduled_lr`` luna.training calls each step: the last epoch's steps at ``factor`` times
    the recipe's rate (the recipe's warm-up, then a constant rate, is unchanged before)."""

    def __init__(self, factor: float = 0.3, epochs: int = 8) -> None:
        import luna.training as training

        self.module = training
        self._lr = training.scheduled_lr
        self.factor = factor
        self.epochs = epochs

    def __enter__(self) -> LastEpochLr:
        outer = self

        def lr(rate: float, step: int, warmup_steps: int, schedule: str = "constant", total_steps: int = 0) -> float:
            value = outer._lr(rate, step, warmup_steps, schedule, total_steps)
            if total_steps and step >= total_steps - total_steps // outer.epochs:  # the last epoch's steps
                value *= outer.factor
            return value

        self.module.scheduled_lr = lr
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.scheduled_lr = self._lr


class ConfigValue:
    """One value of config/config.yaml replaced for the run (epoch_budget reads the recipe from there)."""

    def __init__(self, section: str, key: str, value: object) -> None:
        self.section, self.key, self.value = section, key, value
        self._old = q.CONFIG[section][key]

    def __enter__(self) -> ConfigValue:
        q.CONFIG[self.section][self.key] = self.value
        return self

    def __exit__(self, *exc: object) -> None:
        q.CONFIG[self.section][self.key] = self._old


class GradNorms(ConfigValue):
    """``train.clip_grad_norm`` replaced for the run, and every step's gradient norm before clipping (what
    ``torch.nn.utils.clip_grad_norm_`` returns) recorded; :meth:`summary` gives them per epoch."""

    def __init__(self, max_norm: float) -> None:
        super().__init__("train", "clip_grad_norm", max_norm)
        self.norms: list[float] = []
        self._clip = torch.nn.utils.clip_grad_norm_

    def __enter__(self) -> GradNorms:
        outer = self

        def clip(parameters, max_norm, *args, **kwargs):  # noqa: ANN001, ANN202 - torch's own signature
            total = outer._clip(parameters, max_norm, *args, **kwargs)
            outer.norms.append(float(total))
            return total

        torch.nn.utils.clip_grad_norm_ = clip
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.nn.utils.clip_grad_norm_ = self._clip
        super().__exit__(*exc)

    def summary(self, epochs: int) -> list[str]:
        """One line per epoch (the run's steps in ``epochs`` equal parts, as every epoch has the same batches):
        median, 90th percentile and largest norm, and the share of steps above the recipe's clip (what it would
        have scaled down) and above this run's own."""
        lines = []
        for epoch, part in enumerate(np.array_split(np.asarray(self.norms), epochs), start=1):
            lines.append(f"| {epoch} | {len(part)} | {np.median(part):.2f} | {np.percentile(part, 90):.2f} | "
                         f"{part.max():.1f} | {np.mean(part > self._old):.0%} | {np.mean(part > self.value):.0%} |")
        return lines


PATCHES = {"size-weighted": SizeWeighted, "depth-scale": DepthScale, "clean-last": CleanLast,
           "clean-last-2": lambda: CleanLast(2),
           "last-epoch-lr": lambda: LastEpochLr(0.3, int(q.CONFIG["train"]["epochs"])),
           "selection-0.05": lambda: ConfigValue("split", "selection_fraction", 0.05),
           "clip-20": lambda: GradNorms(20.0), "clip-2.5": lambda: GradNorms(2.5),
           "warmup-50": lambda: ConfigValue("train", "lr_warmup_steps", 50),
           "last-epoch-1to2": lambda: ConfigValue("train", "balanced_schedule",
                                                  [[int(q.CONFIG["train"]["epochs"]), 2]]),
           "epochs-16": lambda: ConfigValue("train", "epochs", 16)}
TITLES = {"size-weighted": "Small nodules drawn more often as positives",
          "depth-scale": "Slice-thickness augmentation: the depth axis scaled 0.625x to 1.6x",
          "clean-last": "The last epoch on nearly clean crops: flips only",
          "clean-last-2": "The last two epochs on nearly clean crops: flips only",
          "last-epoch-lr": "The last (flip-only) epoch at 0.3 times the learning rate",
          "selection-0.05": "Half the selection set: selection_fraction 0.05 (its scans train)",
          "clip-20": "Gradient-norm clipping at 20 instead of 5: the first epoch's large gradients only",
          "clip-2.5": "Gradient-norm clipping at 2.5 instead of 5",
          "warmup-50": "A 50-step learning-rate warm-up instead of 200",
          "last-epoch-1to2": "The last (flip-only) epoch at one positive per two negatives",
          "epochs-16": "Twice the training samples: 16 epochs instead of 8 (a diagnostic, not a candidate)"}
RUN_PREFIX = {"size-weighted": "sizew", "depth-scale": "depthz", "clean-last": "cleanlast",
              "clean-last-2": "cleanlast2", "last-epoch-lr": "lastlr", "selection-0.05": "sel005",
              "clip-20": "clip20", "clip-2.5": "clip2p5",
              "warmup-50": "warm50", "last-epoch-1to2": "last1to2", "epochs-16": "epochs16"}
# the runs a patch is compared with (table label, run folder for a seed and the epochs): the recipe of the patch's
# date, or for the patches measured after clean-last was taken the clean-last runs their rules name
CLEAN_LAST = ("clean-last", lambda seed, epochs: f"cleanlast-s{seed}")  # the recipe since clean-last was taken
BASELINES = {"clean-last-2": CLEAN_LAST, "last-epoch-lr": CLEAN_LAST, "selection-0.05": CLEAN_LAST,
             "clip-20": CLEAN_LAST, "clip-2.5": CLEAN_LAST,
             "warmup-50": CLEAN_LAST, "last-epoch-1to2": CLEAN_LAST, "epochs-16": CLEAN_LAST}
PLAIN = ("plain", lambda seed, epochs: f"budget-s{seed}-e{epochs}-amp-off")
SETTINGS = {"size-weighted": "each positive candidate 3 times in the cycled positive list up to 5 mm, twice up to 7 mm",
            "depth-scale": "each training sample's depth axis also scaled by exp(u ln 1.6), u uniform in [-1, 1)",
            "clean-last": ("the last epoch's crops flipped at random and nothing else (no offset, scale, rotation, "
                           "noise)"),
            "clean-last-2": "the last two epochs' crops flipped at random and nothing else",
            "last-epoch-lr": "the last epoch's steps (its crops flipped only, as the recipe has it) at lr 0.0003",
            "selection-0.05": ("split.selection_fraction 0.05 instead of 0.1: about half the selection scans train, "
                               "the threshold (fp_per_scan:2.5) rests on the other half"),
            "clip-20": "train.clip_grad_norm 20 instead of 5 (the 200 warm-up steps unchanged)",
            "clip-2.5": "train.clip_grad_norm 2.5 instead of 5 (the 200 warm-up steps unchanged)",
            "warmup-50": "train.lr_warmup_steps 50 instead of 200 (the clip at 5 unchanged)",
            "last-epoch-1to2": "train.balanced_schedule [[8, 2]]: the last epoch draws two negatives per positive",
            "epochs-16": ("train.epochs 16 instead of 8 (60,000 samples; the last epoch flip-only as in the recipe), "
                          "everything else the recipe's")}


def spacing_z_mm(work: Path, seed: int) -> dict[str, float]:
    """Slice spacing of every scan of the synthetic data set of ``seed`` (its .mhd headers)."""
    from luna.ct import read_geometry

    root = work / f"data-{seed}" / "synthetic"
    return {path.stem: float(read_geometry(path)[0].spacing_xyz[2]) for path in sorted(root.glob("subset*/*.mhd"))}


def detection(frame: pd.DataFrame, diameter_mm: np.ndarray, spacing_z: dict[str, float]) -> dict[str, float]:
    """Share of dev-test nodules (series, diameter) whose best candidate scores above the scans'
    1-false-positive-per-scan cut (the n_scans-th highest negative), per size bin, and for the nodules up to 7 mm
    in scans with slices up to 1.3 mm apart and thicker."""
    f = frame.assign(d=diameter_mm)
    negatives = np.sort(f.loc[f["is_nodule"] == 0, "probability"].to_numpy())[::-1]
    cut = negatives[min(len(negatives) - 1, f["series_uid"].nunique() - 1)]
    best = f[f["is_nodule"] == 1].groupby(["series_uid", "d"])["probability"].max().reset_index()
    found = best["probability"].to_numpy() > cut
    out = {}
    for low, high in zip(BINS_MM[:-1], BINS_MM[1:]):
        in_bin = ((best["d"] > low) & (best["d"] <= high)).to_numpy()
        name = f"{low:g}-{high:g} mm" if np.isfinite(high) else f"> {low:g} mm"
        out[name] = float(found[in_bin].mean()) if in_bin.any() else float("nan")
    small = (best["d"] <= 7.0).to_numpy()
    thick = best["series_uid"].map(spacing_z).to_numpy() > THIN_MM
    for name, rows in ((f"<= 7 mm, slices <= {THIN_MM:g} mm", small & ~thick),
                       (f"<= 7 mm, slices > {THIN_MM:g} mm", small & thick)):
        out[name] = float(found[rows].mean()) if rows.any() else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="quality_sweep.py's scratch folder (data, runs)")
    p.add_argument("--patch", required=True, choices=sorted(PATCHES), help="the recipe change (see above)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    q.add_seed_options(p)
    p.add_argument("--out", required=True, type=Path, help="markdown table")
    a = p.parse_args(argv)
    q.check_seeds(a)
    from luna.inference import TTA_FLIPS

    data = q.build_data(a.work, a.dev_seed, 2, q.CONFIG["synthetic"])
    dev = q.devtest_set(a.work, a.devtest_seed)
    diameters = dev.rows["diameter_mm"].to_numpy(dtype=np.float64)
    spacing_z = spacing_z_mm(a.work, a.devtest_seed)
    epochs = int(q.CONFIG["train"]["epochs"])
    recipe_views = q.CONFIG["train"]["tta"]
    baseline, baseline_run = BASELINES.get(a.patch, PLAIN)
    results = []
    norm_lines: dict[int, list[str]] = {}  # seed -> per-epoch gradient-norm rows (GradNorms patches)
    for seed in a.seeds:
        for variant in (baseline, a.patch):
            name = baseline_run(seed, epochs) if variant == baseline else f"{RUN_PREFIX[a.patch]}-s{seed}"
            run = a.work / "runs" / name
            # a patch's run, or a baseline that is itself a patch (trained with it, as --patch BASELINE would
            # train it, when missing): epoch_budget.train skips a run already trained
            patch = a.patch if variant != baseline else (baseline if a.patch in BASELINES else None)
            if patch is not None:
                with PATCHES[patch]() as patched:  # the epochs as the patch left the config (epochs-16 sets them)
                    run_epochs = int(q.CONFIG["train"]["epochs"])
                    epoch_budget.train(data, seed, run_epochs, run, run.with_name(name + "-state"))
                if isinstance(patched, GradNorms):
                    norms_file = run / "grad_norms.npy"
                    if patched.norms:  # this call trained the run: keep its norms for later calls
                        np.save(norms_file, np.asarray(patched.norms))
                    elif norms_file.exists():
                        patched.norms = np.load(norms_file).tolist()
                    if patched.norms:
                        norm_lines[seed] = patched.summary(epochs)
            elif not (run / "0" / "model.pt").exists():
                raise SystemExit(f"{run}: no baseline; run benchmarks/epoch_budget.py --amp off --epochs {epochs}")
            views = tta_views.cached_views(run, dev, TTA_FLIPS[recipe_views])
            threshold = float(torch.load(run / "0" / "model.pt", map_location="cpu", weights_only=True)["threshold"])
            for view_set in ("none", recipe_views):
                frame = dev.frame.copy()
                frame["probability"] = np.mean([views[d] for d in TTA_FLIPS[view_set]], axis=0)
                score = q.devtest_scores(frame, dev.nodules, dev.scans, dev.ignored)
                # the operating point at the model's threshold, chosen with the recipe's views: theirs only
                met = epoch_budget.blocks_met(frame, dev, threshold) if view_set == recipe_views else None
                results.append({"seed": seed, "variant": variant, "views": view_set, **score,
                                "threshold": threshold, "blocks": met, **detection(frame, diameters, spacing_z)})
                r = results[-1]
                print(f"seed {seed} {variant:13s} {view_set:6s} CPM {r['dt_cpm']:.3f} "
                      f"({r['dt_low']:.3f}-{r['dt_high']:.3f}) AUC {r['dt_auc']:.3f}", flush=True)
    write_table(a, results, baseline, norm_lines)
    return 0


def write_table(a: argparse.Namespace, results: list[dict], baseline: str,
                norm_lines: dict[int, list[str]] | None = None) -> None:
    columns = [k for k in results[0] if " mm" in k]
    lines = [f"# {TITLES[a.patch]} (benchmarks/recipe_patches.py --patch {a.patch})", "",
             f"Development data: synthetic seed {a.dev_seed}, fold 0 held out; dev-test: seed {a.devtest_seed}, every "
             f"scan. config/config.yaml's recipe (float32), {q.CONFIG['train']['epochs']} epochs; `{a.patch}`: "
             f"{SETTINGS[a.patch]}. Detected: "
             "share of dev-test nodules whose best candidate beats the 1-false-positive-per-scan cut.", "",
             "| seed | run | views | dev-test CPM (95% CI) | ROC AUC | threshold | 30-scan blocks meeting recall >= 0.8 "
             "at precision >= 0.3 | " + " | ".join(f"detected, {c}" for c in columns) + " |",
             "|---:|---|---|---|---:|---:|---:|" + "---:|" * len(columns)]
    for r in results:
        blocks = r["blocks"] or ""
        lines.append(f"| {r['seed']} | {r['variant']} | {r['views']} | {r['dt_cpm']:.3f} ({r['dt_low']:.3f}-"
                     f"{r['dt_high']:.3f}) | {r['dt_auc']:.3f} | {r['threshold']:.3f} | {blocks} | "
                     + " | ".join(f"{r[c]:.2f}" for c in columns) + " |")
    table = pd.DataFrame(results)
    mean = table.groupby(["views", "variant"], sort=False)["dt_cpm"].mean()
    lines += ["", f"| views | {baseline}, mean CPM | {a.patch}, mean CPM | change |", "|---|---:|---:|---:|"]
    for views in table["views"].unique():
        if (views, a.patch) in mean and (views, baseline) in mean:
            lines.append(f"| {views} | {mean[(views, baseline)]:.3f} | {mean[(views, a.patch)]:.3f} | "
                         f"{mean[(views, a.patch)] - mean[(views, baseline)]:+.3f} |")
    for seed, rows in (norm_lines or {}).items():
        lines += ["", f"Gradient norms before clipping, `{a.patch}` run, seed {seed} (per epoch; the recipe clips at "
                  f"{q.CONFIG['train']['clip_grad_norm']:g}):", "",
                  "| epoch | steps | median | 90th percentile | largest | above the recipe's clip | above this run's |",
                  "|---:|---:|---:|---:|---:|---:|---:|", *rows]
    with atomic_path(a.out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
