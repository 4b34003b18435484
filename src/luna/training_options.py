"""luna-train's command line: its options, their types and defaults (the book's method unless asked).

Kept apart from luna.training (the loop) so the options read as one list; docs/design.md has the config keys
that map onto them (luna.runner.config_argv: ``key: value`` -> ``--key value``).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from luna.app import OneLineErrorParser, add_switch, thread_limit
from luna.data import whole_if_integral
from luna.inference import TTA_FLIPS
from luna.metrics import MetricsError, parse_threshold_policy

KEEP_CHOICES = ("f1", "auc", "last")
DESCRIPTION = ("Train the book's LunaModel (nodule vs. not) for one test fold on HDF5 crop stores; writes "
               "OUT/model.pt (the kept epoch, chosen on the selection set only), OUT/history.tsv (train and selection "
               "metrics per epoch) and OUT/selection_predictions.tsv. The test fold's scans are never trained or "
               "chosen on.")


def _whole_number(text: str, what: str) -> int:
    """int(text); argparse would otherwise say "invalid _positive_int value", naming this module's function."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text, "a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _whole_number(text, "a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


SEED_MAX = 2**32 - 1  # the samplers' and augmentation's seeds are 32-bit: a larger one would repeat a smaller one's


def _seed(text: str) -> int:
    value = _whole_number(text, f"a whole number from 0 to {SEED_MAX}")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_MAX} (2^32 - 1), got {value}")
    return value


def _threads(text: str) -> int:
    value = _nonnegative_int(text)
    if value > thread_limit():
        raise argparse.ArgumentTypeError(f"must be <= {thread_limit()} (4 per CPU of this machine), got {value}")
    return value


def _workers(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return _nonnegative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"auto or a whole number >= 0, got {text!r}") from None


def resolve_workers(choice: int | str, device: torch.device, processes: int = 1, cores: int = 0) -> int:
    """Loader worker processes for ``--num-workers`` (``auto``: by device, as measured), per training process.

    On CUDA ``auto`` is the cores but one, at most 8: ``cores`` when given (``--threads``, which the workflow sets
    to its rule's threads per process, so a local run leaves the cores Snakemake gave other jobs to them, as a
    SLURM job's CPU allocation does), otherwise this process's CPUs shared by the ``processes`` of a torchrun job.
    """
    if choice != "auto":
        return int(choice)
    if device.type != "cuda":
        return 0
    if cores > 0:
        return max(0, min(8, cores - 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, (cores - 1) // max(1, processes)))


def _ratio(text: str) -> int | float:
    """Negatives per positive: a number >= 0, whole ones as int (see luna.data.whole_if_integral)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of negatives per positive, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return whole_if_integral(value)


def _epoch_ratio(text: str) -> tuple[int, int | float]:
    try:
        epoch_text, ratio_text = text.split(":")
        epoch = int(epoch_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCH:RATIO (e.g. 7:8), got {text!r}") from None
    if epoch < 1:
        raise argparse.ArgumentTypeError(f"EPOCH must be >= 1, got {text!r}")
    return epoch, _ratio(ratio_text)  # its own error for a bad RATIO


def _threshold_policy(text: str) -> str:
    try:
        parse_threshold_policy(text)
    except MetricsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _unit_interval(text: str) -> float:
    value = _number(text, "a number >= 0 and < 1")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, "a finite number > 0")
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text, "a finite number >= 0")
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """luna-train's parser on its own (what LunaTrainingApp parses with)."""
    parser = OneLineErrorParser(prog="luna-train", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every luna-train option, in groups: inputs and outputs; fold and selection; training; augmentation;
    runtime."""
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--crops", nargs="+", required=True, metavar="H5", help="crop stores (results/crops/*.h5)")
    io.add_argument("--splits", required=True, metavar="TSV", help="splits.tsv: series_uid, subset, fold (luna-split)")
    io.add_argument("--out", required=True, metavar="DIR",
                    help="output folder for model.pt, history.tsv and selection_predictions.tsv")
    io.add_argument("--state", default=None, metavar="DIR",
                    help="resumable state folder (optimizer, sampler, RNG, best model); must lie outside the "
                    "declared outputs. Default: OUT/../.<OUT name>.train_state")
    io.add_argument("--resume", action="store_true",
                    help="continue after the last finished epoch in --state; a state written with other settings, "
                         "inputs or code is not resumed: the run starts at epoch 1 (a warning names what differs) "
                         "and replaces it; "
                         "a finished run extended with more --epochs keeps its old last epoch's selection pass, "
                         "which an uninterrupted longer run has only if that epoch is on --selection-interval")
    io.add_argument("--tb-dir", default=None, metavar="DIR",
                    help="TensorBoard folder (one run = <time>-trn_cls and <time>-val_cls; a resume continues its "
                    "run); 'none' disables. Default: OUT/tensorboard, where a fresh run first removes earlier runs")
    io.add_argument("--config", default=None, metavar="FILE",
                    help="YAML/JSON pipeline config, recorded in model.pt's provenance only")
    io.add_argument("--comment", default="", help="suffix of the TensorBoard run names")

    fo = p.add_argument_group("fold, selection and what is kept")
    fo.add_argument("--test-fold", type=_nonnegative_int, required=True, metavar="N",
                    help="the held-out fold: its scans are never trained on and never choose anything")
    fo.add_argument("--selection-fraction", type=_unit_interval, default=0.2, metavar="F",
                    help="share of the other folds' scans (stable hash of UID and test fold) that form the "
                         "selection set, which alone chooses the kept epoch and the threshold; 0 = none (then "
                         "--keep last and a fixed --threshold)")
    fo.add_argument("--keep", choices=KEEP_CHOICES, default="f1",
                    help="the epoch kept in model.pt: best selection F1 at the operating threshold (the book keeps "
                         "the best F1), best selection AUC, or the last epoch (nothing chosen)")
    fo.add_argument("--threshold", type=_threshold_policy, default="0.5", metavar="POLICY",
                    help="operating threshold recorded in model.pt (a positive is p > threshold): a number (0.5 = the "
                         "book), max_f1 (best F1 on the selection set), recall:R (highest threshold with selection "
                         "recall >= R) or fp_per_scan:F (lowest threshold calling at most F selection negatives "
                         "per scan)")
    fo.add_argument("--tta", choices=tuple(TTA_FLIPS), default="none",
                    help="test-time augmentation of every evaluation (the selection pass here, luna-predict later: "
                         "recorded in model.pt): average the probabilities of the crop and its mirror images: rows "
                         "and columns mirrored together (flip2, half the cost of flip4), all three axes (flip2z, the "
                         "point mirror, at flip2's cost), in-plane (flip4), flip2 also mirrored in depth (flip4z) or "
                         "every mirror (flip8); none = the book")
    fo.add_argument("--selection-interval", type=_positive_int, default=1, metavar="EPOCHS",
                    help="evaluate the selection set every EPOCHS epochs and after the last; only evaluated epochs "
                         "can be kept")

    tr = p.add_argument_group("training")
    tr.add_argument("--epochs", type=_positive_int, default=8, help="number of epochs")
    tr.add_argument("--samples-per-epoch", type=_nonnegative_int, default=4000,
                    help="training samples per epoch (the book: 200000); 0 = as many samples as there are train "
                         "crops (drawn by the sampler: with --balanced, positives repeat and some negatives wait)")
    tr.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (per process under torchrun)")
    tr.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd",
                    help="sgd = the book's SGD with --momentum; adam = Adam (betas 0.9, 0.999; --momentum unused); "
                    "adamw = Adam with --weight-decay decoupled from the gradient")
    tr.add_argument("--weight-decay", type=_nonnegative_float, default=0.0, metavar="WD",
                    help="weight decay of the conv and linear weights (not biases or BatchNorm): an L2 term for sgd "
                    "and adam, decoupled (w -= lr * WD * w) for adamw; 0 = off (the book)")
    tr.add_argument("--lr", type=_positive_float, default=0.001, help="learning rate")
    tr.add_argument("--momentum", type=_unit_interval, default=0.99, help="SGD momentum (< 1)")
    tr.add_argument("--lr-warmup-steps", type=_nonnegative_int, default=0, metavar="STEPS",
                    help="raise the learning rate linearly from lr/STEPS to lr over the first STEPS optimizer "
                         "steps; 0 = off (the book)")
    tr.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                    help="after the warm-up: constant (the book) or cosine (down to 0 at the last step of --epochs)")
    tr.add_argument("--clip-grad-norm", type=_nonnegative_float, default=0.0, metavar="MAX",
                    help="clip the gradient's global L2 norm to MAX before each step; 0 = off (the book)")
    tr.add_argument("--ema-decay", type=_unit_interval, default=0.0, metavar="DECAY",
                    help="validate and keep an exponential moving average of the weights, updated after every "
                    "optimizer step with this decay (e.g. 0.99; torchvision's --model-ema); 0 = off (the book)")
    tr.add_argument("--balanced", type=_ratio, default=1, metavar="RATIO",
                    help="negatives per positive in the training order (the book: 1; 0.5 = two positives per "
                    "negative); 0 = plain shuffling")
    tr.add_argument("--balanced-schedule", type=_epoch_ratio, nargs="*", default=[], metavar="EPOCH:RATIO",
                    help="from EPOCH on, RATIO negatives per positive instead of --balanced (e.g. 7:8: learn on "
                    "many positives first, end nearer the data's prior; each EPOCH once); no pairs = --balanced "
                    "throughout (the book)")
    tr.add_argument("--hard-negatives", type=_unit_interval, default=0.0, metavar="SHARE",
                    help="from epoch 2 on, fill this share of each epoch's negative slots with negatives drawn by "
                    "the training loss they last had (hard-negative mining; balanced orders only); 0 = off (the book)")
    tr.add_argument("--skip-excluded", action=argparse.BooleanOptionalAction, default=False,
                    help="leave out of training the negative candidates on the findings of --annotations-excluded "
                    "(FROC/CPM ignores them; many are small or disputed nodules, which would teach the model "
                    "that such a nodule is not one); the selection set keeps them. Off: train on every candidate "
                    "(the book)")
    tr.add_argument("--annotations-excluded", default=None, metavar="CSV",
                    help="LUNA16's annotations_excluded.csv, the findings --skip-excluded reads")
    tr.add_argument("--seed", type=_seed, default=0, help="seed of init, sampling and augmentation (0 to 2^32 - 1)")

    au = p.add_argument_group("augmentation (training only; the book's Chapter 12)")
    au.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="master switch; --no-augment turns every augmentation off")
    au.add_argument("--augment-flip", action=argparse.BooleanOptionalAction, default=True,
                    help="random flip per axis (p 0.5)")
    au.add_argument("--augment-offset", type=_nonnegative_float, default=0.1,
                    help="random offset per axis up to +-this (normalised grid units); 0 = off")
    au.add_argument("--augment-scale", type=_unit_interval, default=0.2,
                    help="random scale per axis 1 +- this; 0 = off")
    au.add_argument("--augment-rotate", action=argparse.BooleanOptionalAction, default=True,
                    help="random in-plane rotation (0..2pi about the slice axis)")
    au.add_argument("--augment-noise", type=_nonnegative_float, default=25.0,
                    help="std of Gaussian noise added, HU; 0 = off")
    au.add_argument("--augment-flip-only-epochs", type=_nonnegative_int, default=0, metavar="N",
                    help="the last N epochs keep only the flips (no offset, scale, rotation or noise): the model "
                         "ends on crops as they are predicted, neither blurred by resampling nor noised. 0 = the "
                         "book; 1 in config/config.yaml: dev-test CPM +0.021 with flip2z over two seeds "
                         "(benchmarks/results/clean_last_epoch.md)")

    rt = p.add_argument_group("runtime (speed; --amp and --channels-last also move the numbers slightly)")
    rt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto = cuda when available, else cpu")
    add_switch(rt, "--amp", "bf16 autocast of the training steps; auto: on a GPU that runs bf16 natively (not a V100 "
               "or T4) and on a CPU that does (AVX512-BF16 or AMX); evaluation is always float32. Faster, not free: on "
               "an AMX CPU bf16 training scored dev-test CPM 0.04 below float32 at the same samples, and "
               "config/config.yaml trains in float32 (benchmarks/results/quality.md, fourteenth)")
    add_switch(rt, "--channels-last", "channels_last_3d memory format of model and batches; auto: on (measured "
               "faster on the CPU and on CUDA; the results agree to ~1e-5, not bit for bit)")
    rt.add_argument("--num-workers", type=_workers, default="auto",
                    help="DataLoader worker processes; 0 = load in the main process; auto = 0 on the CPU (workers "
                    "only compete with the model for cores) and on CUDA the cores but one, at most 8: --threads - 1 "
                    "when --threads is given (the workflow passes its rule's threads), else this process's CPUs "
                    "shared by the processes of a torchrun job, (cores - 1) // processes (an H100 trains ~3,000 "
                    "samples/s, more than 4 workers deliver: benchmarks/results/gpu_check_h100.txt)")
    rt.add_argument("--threads", type=_threads, default=0,
                    help="torch CPU threads, and the cores --num-workers auto counts on CUDA; 0 = torch's default "
                    "(and this process's CPUs)")
    rt.add_argument("--data-on-device", choices=("auto", "always", "never"), default="auto",
                    help="hold the training (and selection) crops in one int16 tensor on the training device and "
                         "gather batches there, or stream them from the stores through the loader; auto: resident "
                         "when they fit in --device-memory-fraction of the device's free memory (RAM on the CPU). "
                         "Both give the same batches")
    rt.add_argument("--device-memory-fraction", type=_unit_interval, default=0.5, metavar="F",
                    help="share of the device's free memory (RAM on the CPU, split between the processes) the "
                         "resident crops may take under --data-on-device auto")
