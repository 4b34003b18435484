"""The training stage: ``LunaTrainingApp(argv).main()`` trains the book's LunaModel for one test fold.

The scans of splits.tsv get one role each (luna.splits.fold_roles): the test fold's scans are never read here
beyond a check that they hold nodules; a stable-hash share of the other folds' scans is the *selection set*,
which alone chooses what is chosen (the epoch kept in model.pt, the operating threshold); the rest is trained
on. Per epoch: a fixed number of (by default balanced, augmented) training samples, then (every
``--selection-interval`` epochs and always after the last) every selection crop through luna.inference's
evaluation path (the same code and float32 precision as luna-predict). For both, the metric row (luna.metrics,
threshold 0.5) is appended to ``history.tsv`` (splits ``train`` and ``selection``), logged, and written to
TensorBoard under the book's tag names with step = training samples seen. ``--keep`` picks the kept epoch
(best selection F1 at the operating threshold, best AUC, or the last); ``--threshold`` the operating point
(fixed, max_f1 or recall:R on the selection set). model.pt records the test fold, the training and selection
series UIDs, the crop shape and the threshold; ``selection_predictions.tsv`` holds the kept epoch's selection
probabilities (docs/design.md has the contracts).

Method: the book's (SGD lr 0.001 momentum 0.99, balanced 1:1, Chapter 12 augmentation) unless asked;
options beside it, each off by default: linear LR warm-up, gradient-norm clipping, Adam, an exponential
moving average of the weights (then the average is what is evaluated and kept) and a balance schedule.

Resumable: after every epoch the full state (model, optimizer, EMA, sampler epoch, RNG, history rows, best
model) is written atomically to ``--state DIR``, a folder outside the declared outputs (Snakemake deletes
those before a job starts). ``--resume`` continues after the last finished epoch. The state is keyed by a
fingerprint of the settings, the inputs and the code version (package version and a hash of its sources),
so a state written with other settings, inputs or code is never resumed. The outputs (model.pt,
history.tsv, selection_predictions.tsv) are written only when the run ends: a killed run leaves nothing at
--out that looks finished, and a resumed run ends with the same files as an uninterrupted one.

Speed without changing the method: channels_last_3d, bf16 autocast for the training steps (CUDA; CPU only
with native bf16), pinned memory and non-blocking copies on CUDA, augmentation batched on the device, HDF5
read a batch at a time. Several processes: DistributedDataParallel under torchrun (gloo on CPU, nccl on
CUDA); each process trains on every world_size-th sample and evaluates a share of the selection set; only
rank 0 writes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from luna.cpu_speed import cpu_report, speed_up_training, tune_allocator
from luna.data import AugmentConfig, CropDataset, DataError, EpochSampler, ResidentBatches, augment_batch, make_loader
from luna.device import DeviceError, resident_decision, resolve_device, use_bf16
from luna.inference import TTA_FLIPS, predict
from luna.io import OutputError, check_writable_dir, copy_file, write_tsv
from luna.metrics import HISTORY_COLUMNS, MetricsError, choose_threshold, format_row, metric_row, parse_threshold_policy
from luna.model import LunaModel, atomic_torch_save, save_checkpoint, unwrap_model
from luna.progress import format_duration, with_progress
from luna.provenance import code_version
from luna.splits import SplitsError, read_fold_roles, scans_with_role
from luna.store import CropStore, StoreError

logger = logging.getLogger(__name__)

STATE_FORMAT = "luna-train-state-v2"
CPU_AMP_AUTO = True
"""``--amp auto`` on CPU: bf16 autocast measured ~1.5x faster than fp32 on this repo's 2-core (AVX512-BF16)
box with the same validation metrics (benchmarks/results/train.md); on CPUs without native bf16 it is
slower, so auto turns it on only where ``torch.backends.mkldnn`` reports bf16 support (see resolve_amp)."""

TB_TAGS = {
    "loss_all": "loss/all", "loss_neg": "loss/neg", "loss_pos": "loss/pos",
    "correct_all": "correct/all", "correct_neg": "correct/neg", "correct_pos": "correct/pos",
    "precision": "pr/precision", "recall": "pr/recall", "f1": "pr/f1_score", "auc": "roc/auc",
}
# settings that change what is trained or kept; a state written under others is not resumed
_FINGERPRINT_ARGS = (
    "test_fold", "selection_fraction", "keep", "threshold", "selection_interval", "tta",
    "batch_size", "optimizer", "lr", "momentum", "balanced", "balanced_schedule", "samples_per_epoch",
    "seed", "lr_warmup_steps", "lr_schedule", "clip_grad_norm", "ema_decay",
    "augment_flip", "augment_offset", "augment_scale", "augment_rotate", "augment_noise", "channels_last",
)
KEEP_CHOICES = ("f1", "auc", "last")
SELECTION_PREDICTION_COLUMNS = ["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z", "is_nodule",
                                "diameter_mm", "probability", "loss"]


class TrainingError(ValueError):
    """Training settings or state that cannot be used; the message names the option, file or value."""


ERRORS = (TrainingError, DataError, SplitsError, StoreError, OutputError, MetricsError, DeviceError)
"""What a bad input or an unwritable output raises: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _workers(text: str) -> int | str:
    return "auto" if text == "auto" else _nonnegative_int(text)


def resolve_workers(choice: int | str, device: torch.device) -> int:
    """Loader worker processes for ``--num-workers`` (``auto``: by device, as measured)."""
    if choice != "auto":
        return int(choice)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def _epoch_ratio(text: str) -> tuple[int, int]:
    try:
        epoch, ratio = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCH:RATIO (e.g. 7:8), got {text!r}") from None
    if epoch < 1 or ratio < 0:
        raise argparse.ArgumentTypeError(f"EPOCH must be >= 1 and RATIO >= 0, got {text!r}")
    return epoch, ratio


def _threshold_policy(text: str) -> str:
    try:
        parse_threshold_policy(text)
    except MetricsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luna-train",
        description="Train the book's LunaModel (nodule vs. not) for one test fold on HDF5 crop stores; writes "
        "OUT/model.pt (the kept epoch, chosen on the selection set only), OUT/history.tsv (train and selection "
        "metrics per epoch) and OUT/selection_predictions.tsv. The test fold's scans are never trained or chosen on.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--crops", nargs="+", required=True, metavar="H5", help="crop stores (results/crops/*.h5)")
    io.add_argument("--splits", required=True, metavar="TSV", help="splits.tsv: series_uid, subset, fold (luna-split)")
    io.add_argument("--out", required=True, metavar="DIR", help="output folder for model.pt and history.tsv")
    io.add_argument("--state", default=None, metavar="DIR",
                    help="resumable state folder (optimizer, sampler, RNG, best model); must lie outside the "
                    "declared outputs. Default: OUT/../.<OUT name>.train_state")
    io.add_argument("--resume", action="store_true",
                    help="continue after the last finished epoch in --state (if its settings and inputs match)")
    io.add_argument("--tb-dir", default=None, metavar="DIR",
                    help="TensorBoard folder (one run = <time>-trn_cls and <time>-val_cls); 'none' disables. "
                    "Default: OUT/tensorboard")
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
                         "book), max_f1 (best F1 on the selection set) or recall:R (highest threshold with selection "
                         "recall >= R)")
    fo.add_argument("--tta", choices=tuple(TTA_FLIPS), default="none",
                    help="test-time augmentation of every evaluation (the selection pass here, luna-predict later: "
                         "recorded in model.pt): average the probabilities of the crop and its mirror images, in-plane "
                         "(flip4) or also in depth (flip8); none = the book")
    fo.add_argument("--selection-interval", type=_positive_int, default=1, metavar="EPOCHS",
                    help="evaluate the selection set every EPOCHS epochs and after the last; only evaluated epochs "
                         "can be kept")

    tr = p.add_argument_group("training")
    tr.add_argument("--epochs", type=_positive_int, default=8, help="number of epochs")
    tr.add_argument("--samples-per-epoch", type=_nonnegative_int, default=4000,
                    help="training samples per epoch (the book: 200000); 0 = one pass over the train crops")
    tr.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (per process under torchrun)")
    tr.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                    help="sgd = the book's SGD with --momentum; adam = Adam (betas 0.9, 0.999; --momentum unused)")
    tr.add_argument("--lr", type=_nonnegative_float, default=0.001, help="learning rate")
    tr.add_argument("--momentum", type=_nonnegative_float, default=0.99, help="SGD momentum")
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
    tr.add_argument("--balanced", type=_nonnegative_int, default=1, metavar="RATIO",
                    help="negatives per positive in the training order (the book: 1); 0 = plain shuffling")
    tr.add_argument("--balanced-schedule", type=_epoch_ratio, nargs="*", default=[], metavar="EPOCH:RATIO",
                    help="from EPOCH on, RATIO negatives per positive instead of --balanced (e.g. 7:8: learn on "
                    "many positives first, end nearer the data's prior); none = --balanced throughout (the book)")
    tr.add_argument("--seed", type=int, default=0, help="seed of init, sampling and augmentation")

    au = p.add_argument_group("augmentation (training only; the book's Chapter 12)")
    au.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="master switch; --no-augment turns every augmentation off")
    au.add_argument("--augment-flip", action=argparse.BooleanOptionalAction, default=True,
                    help="random flip per axis (p 0.5)")
    au.add_argument("--augment-offset", type=_nonnegative_float, default=0.1,
                    help="random offset per axis up to +-this (normalised grid units); 0 = off")
    au.add_argument("--augment-scale", type=_nonnegative_float, default=0.2,
                    help="random scale per axis 1 +- this; 0 = off")
    au.add_argument("--augment-rotate", action=argparse.BooleanOptionalAction, default=True,
                    help="random in-plane rotation (0..2pi about the slice axis)")
    au.add_argument("--augment-noise", type=_nonnegative_float, default=25.0,
                    help="std of Gaussian noise added, HU; 0 = off")

    rt = p.add_argument_group("runtime (speed only)")
    rt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto = cuda when available, else cpu")
    rt.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                    help="bf16 autocast; auto = on for CUDA, and on CPU where it supports bf16 natively")
    rt.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="channels_last_3d memory format for model and batches")
    rt.add_argument("--num-workers", type=_workers, default="auto",
                    help="DataLoader worker processes; 0 = load in the main process; auto = 0 on the CPU (workers "
                    "only compete with the model for cores) and min(8, cores - 1) on CUDA (an H100 trains ~3,000 "
                    "samples/s, more than 4 workers deliver: benchmarks/results/gpu_check_h100.txt)")
    rt.add_argument("--threads", type=_nonnegative_int, default=0,
                    help="torch CPU threads; 0 = torch's default")
    rt.add_argument("--data-on-device", choices=("auto", "always", "never"), default="auto",
                    help="hold the training (and selection) crops in one int16 tensor on the training device and "
                         "gather batches there, or stream them from the stores through the loader; auto: resident "
                         "when they fit in --device-memory-fraction of the device's free memory (RAM on the CPU). "
                         "Both give the same batches")
    rt.add_argument("--device-memory-fraction", type=_unit_interval, default=0.5, metavar="F",
                    help="share of the device's free memory (RAM on the CPU, split between the processes) the "
                         "resident crops may take under --data-on-device auto")
    return p


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (one process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_amp(choice: str, device: torch.device) -> bool:
    """bf16 autocast for training (luna.device's policy, :data:`CPU_AMP_AUTO` on the CPU)."""
    return use_bf16(choice, device, cpu_auto=CPU_AMP_AUTO)


def default_state_dir(out: Path) -> Path:
    """``OUT/../.<OUT name>.train_state``: beside the outputs, never inside them."""
    out = Path(out)
    return out.parent / f".{out.name or 'model'}.train_state"


def _file_identity(path: str) -> list[Any]:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def run_fingerprint(args: argparse.Namespace, amp: bool, device: torch.device, world_size: int) -> str:
    """Hash of everything that changes what is trained: settings, inputs (path, size, mtime), the code version
    (luna's version and a hash of its sources, so an uncommitted edit counts), device kind, AMP, process count.
    Not the number of epochs (a resumed run may go further) unless the learning-rate schedule depends on it, nor
    speed-only settings."""
    splits_digest = hashlib.sha256(Path(args.splits).read_bytes()).hexdigest()
    payload = {
        "code": code_version(),
        "args": {k: getattr(args, k) for k in _FINGERPRINT_ARGS},
        # a cosine schedule's rates depend on the run's length: a run with more epochs is another run
        "epochs": args.epochs if args.lr_schedule != "constant" else None,
        "augment": bool(args.augment),
        "crops": [_file_identity(p) for p in args.crops],
        "splits": splits_digest,
        "amp": amp,
        "device": device.type,
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``.

    A pure function of the global step, so a resumed run continues the schedule exactly."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    return lr * (step + 1) / warmup_steps


def scheduled_lr(lr: float, step: int, warmup_steps: int, schedule: str = "constant", total_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): the linear warm-up, then ``constant`` (the book) or
    ``cosine``: from ``lr`` down to 0 at ``total_steps`` along half a cosine. A pure function of the step (and,
    for cosine, of the run's length), so a resumed run continues the schedule exactly."""
    rate = warmup_lr(lr, step, warmup_steps)
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, max(0.0, (step - warmup_steps) / (total_steps - warmup_steps)))
        rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The book's SGD (lr, momentum) or Adam (lr, torch's default betas)."""
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay for optimizer step ``step`` (0-based): ``decay``, lowered early on as
    ``(1 + step) / (10 + step)`` so the average forgets the random init within the first epoch."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter and floating buffer (batch-norm
    statistics); integer buffers (batch counts) are copied."""
    pairs = list(zip(ema.parameters(), model.parameters())) + list(zip(ema.buffers(), model.buffers()))
    floats = [(e, m) for e, m in pairs if e.is_floating_point()]
    if floats:
        torch._foreach_lerp_([e for e, _ in floats], [m.detach() for _, m in floats], 1.0 - decay)
    for e, m in pairs:
        if not e.is_floating_point():
            e.copy_(m)


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    if not args.augment:
        return AugmentConfig(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)
    return AugmentConfig(flip=args.augment_flip, offset=args.augment_offset, scale=args.augment_scale,
                         rotate=args.augment_rotate, noise_hu=args.augment_noise)


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()}


def _read_config(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    import yaml

    try:
        with open(path) as fh:
            value = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingError(f"{path}: cannot read config ({exc})") from exc
    return value if isinstance(value, dict) else {"value": value}


def _seed_int(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, dtype=np.uint64)[0]
               & 0x7FFFFFFFFFFFFFFF)


def write_history(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """history.tsv from all kept rows, atomically; NaN as ``NaN``."""
    write_tsv(pd.DataFrame(list(rows), columns=HISTORY_COLUMNS), path)


def selection_key(keep: str, epoch: int, row: dict[str, Any]) -> float:
    """What ``--keep`` maximises over the evaluated epochs: F1 at the operating threshold, AUC, or the epoch
    (last). An undefined value (NaN) ranks below every defined one."""
    value = float(epoch) if keep == "last" else float(row[keep])
    return -1.0 if math.isnan(value) else value


# ----------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------

@dataclass
class SelectionPass:
    """One evaluation of the selection set: per-sample values, the chosen threshold and the metric rows."""

    labels: np.ndarray
    probability: np.ndarray
    loss: np.ndarray
    threshold: float
    row: dict[str, Any]            # history row, threshold 0.5
    operating_row: dict[str, Any]  # the same at the chosen threshold


class LunaTrainingApp:
    """``LunaTrainingApp(argv).main()``: parse ``argv`` (``sys.argv[1:]`` when None) and train."""

    def __init__(self, sys_argv: Sequence[str] | None = None) -> None:
        if sys_argv is None:
            sys_argv = sys.argv[1:]
        self.args = build_parser().parse_args([str(a) for a in sys_argv])
        self.time_str = datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
        self.out_dir = Path(self.args.out)
        self.state_dir = Path(self.args.state) if self.args.state else default_state_dir(self.out_dir)
        if self.args.tb_dir is None:
            self.tb_dir: Path | None = self.out_dir / "tensorboard"
        elif str(self.args.tb_dir).lower() in ("", "none"):
            self.tb_dir = None
        else:
            self.tb_dir = Path(self.args.tb_dir)
        self._check_args()
        self.dist = dist_info_from_env()
        self.device = resolve_device(self.args.device, self.dist.local_rank)
        self.trn_writer = None
        self.val_writer = None

    def _check_args(self) -> None:
        args = self.args
        out = self.out_dir.resolve()
        state = self.state_dir.resolve()
        if state == out or out in state.parents:
            raise TrainingError(f"--state {self.state_dir} lies inside --out {self.out_dir}; it must live "
                                "outside the declared outputs")
        for path in [*args.crops, args.splits]:
            if not Path(path).is_file():
                raise TrainingError(f"{path}: no such file")
        if args.selection_fraction == 0 and (args.keep != "last" or parse_threshold_policy(args.threshold)[0] != "fixed"):
            raise TrainingError("--selection-fraction 0 leaves nothing to choose on: use --keep last and a fixed "
                                f"--threshold (got --keep {args.keep} --threshold {args.threshold})")

    # -- setup ------------------------------------------------------------------------------------

    def main(self) -> int:
        """Train; on bad input (or an output that cannot be written) print one line to stderr and return 2."""
        try:
            return self._run_dist()
        except ERRORS as exc:
            print(f"luna-train: error: {exc}", file=sys.stderr)
            return 2

    def _run_dist(self) -> int:
        args = self.args
        if not self.dist.is_main:  # one log for the whole run: other processes report problems only
            logger.setLevel(logging.WARNING)
        logger.info("Starting %s, %s", type(self).__name__, args)
        if self.dist.enabled and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
        try:
            return self._main()
        finally:
            for writer in (self.trn_writer, self.val_writer):
                if writer is not None:
                    writer.close()
            if self.dist.enabled and dist.is_initialized():
                dist.destroy_process_group()

    def _main(self) -> int:
        self.setup()
        return self.run()

    def _check_writable(self) -> None:
        """Every folder this run writes, checked before the first epoch (not after an hour of training)."""
        check_writable_dir(self.out_dir, "--out folder")
        check_writable_dir(self.state_dir, "--state folder")
        if self.tb_dir is not None:
            check_writable_dir(self.tb_dir, "--tb-dir folder")

    def setup(self) -> None:
        """Roles, data, sampler, loader, model, optimizer; restores the state under --resume."""
        args = self.args
        if args.threads:
            torch.set_num_threads(args.threads)
        if self.dist.is_main:
            self._check_writable()
        if self.device.type == "cpu":
            logger.info(tune_allocator())  # before the data and the model: large blocks stay on the heap
        self.use_amp = resolve_amp(args.amp, self.device)
        self.augment = augment_config(args)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        logger.info("device %s, amp %s, channels_last %s, %d process(es); %s", self.device,
                    "bf16" if self.use_amp else "off", args.channels_last, self.dist.world_size, cpu_report())

        self.roles = read_fold_roles(args.splits, args.test_fold, args.selection_fraction)
        stores = [CropStore(p) for p in args.crops]
        # int16 through the loader (half the bytes), float32 on the device
        self.train_ds = CropDataset(stores, self.roles, "train", int16=True)
        self.sel_ds = CropDataset(stores, self.roles, "selection", int16=True)
        test_ds = CropDataset(stores, self.roles, "test", int16=True)
        self._check_roles(test_ds)
        logger.info("test fold %d: %d scans, %d crops (%d positive), held out; train: %d scans, %d crops (%d "
                    "positive); selection: %d scans, %d crops (%d positive)", args.test_fold,
                    len(scans_with_role(self.roles, "test")), len(test_ds), test_ds.n_pos,
                    len(scans_with_role(self.roles, "train")), len(self.train_ds), self.train_ds.n_pos,
                    len(scans_with_role(self.roles, "selection")), len(self.sel_ds), self.sel_ds.n_pos)
        self.crop_shape = self.train_ds.crop_shape

        self.sampler = EpochSampler(self.train_ds.labels, ratio=args.balanced, schedule=args.balanced_schedule,
                                    samples_per_epoch=args.samples_per_epoch, seed=args.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self._make_batches()

        torch.manual_seed(args.seed)
        self.model = LunaModel(crop_shape=self.crop_shape)
        self.model_config = {"in_channels": 1, "conv_channels": 8, "crop_shape": list(self.crop_shape)}
        self.model.to(self.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if self.device.type == "cpu" and not self.use_amp:  # exact rewrites of the fp32 CPU backward, same module
            logger.info(speed_up_training(self.model))
        self.optimizer = make_optimizer(args, self.model)
        # the averaged weights are what is evaluated and kept when --ema-decay is on
        self.ema: torch.nn.Module | None = copy.deepcopy(self.model) if args.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.fingerprint = run_fingerprint(args, self.use_amp, self.device, self.dist.world_size)
        self.config = _read_config(args.config)

        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_key = -math.inf
        self.best_threshold = math.nan
        self.samples_seen = 0
        self.start_epoch = self._restore() + 1

        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)

    def _make_batches(self) -> None:
        """Training batches resident on the device or streamed by the loader (--data-on-device), and the
        selection crops resident with them: the same batches either way."""
        args = self.args
        n_bytes = ResidentBatches.n_bytes(self.train_ds) + ResidentBatches.n_bytes(self.sel_ds)
        resident, why = resident_decision(args.data_on_device, n_bytes, self.device, args.device_memory_fraction,
                                          processes_per_device=self.dist.world_size)
        logger.info("training data: %s", why)
        self.sel_resident: torch.Tensor | None = None
        if resident:
            started = time.perf_counter()
            self.train_batches: Any = ResidentBatches(self.train_ds, self.sampler, args.batch_size, self.device)
            if len(self.sel_ds):
                self.sel_resident = ResidentBatches.load(self.sel_ds, self.device)
            logger.info("loaded %d training and %d selection crops onto %s in %.1f s", len(self.train_ds),
                        len(self.sel_ds), self.device, time.perf_counter() - started)
        else:
            workers = resolve_workers(args.num_workers, self.device)
            self.train_batches = make_loader(self.train_ds, self.sampler, batch_size=args.batch_size,
                                             num_workers=workers, pin_memory=self.device.type == "cuda")

    def _check_roles(self, test_ds: CropDataset) -> None:
        """Clear errors, before any training, for a split that cannot give honest numbers."""
        args, fold = self.args, self.args.test_fold
        if len(self.train_ds) == 0 or self.train_ds.n_pos == 0:
            raise TrainingError(f"{args.splits}: test fold {fold} leaves {len(self.train_ds)} training crops with "
                                f"{self.train_ds.n_pos} nodules in {', '.join(args.crops)}; nothing to learn from")
        if len(test_ds) and test_ds.n_pos == 0:
            raise TrainingError(f"{args.splits}: test fold {fold} has {len(test_ds)} candidates and no nodule among "
                                "them: its metrics would be undefined (use fewer folds or more scans)")
        if args.selection_fraction > 0 and (self.sel_ds.n_pos == 0 or self.sel_ds.n_neg == 0):
            raise TrainingError(f"{args.splits}: the selection set of test fold {fold} (--selection-fraction "
                                f"{args.selection_fraction}) has {self.sel_ds.n_pos} nodule and {self.sel_ds.n_neg} "
                                "other candidates; choosing an epoch or threshold needs both (raise the fraction, "
                                "or use --keep last with a fixed --threshold and --selection-fraction 0)")

    def run(self) -> int:
        """The epochs from the first unfinished one, then the outputs; returns 0."""
        args = self.args
        epoch_times: list[float] = []
        for epoch in range(self.start_epoch, args.epochs + 1):
            started = time.perf_counter()
            ratio = self.sampler.ratio_at(epoch)
            evaluate = self._selects_at(epoch)
            logger.info("Epoch %d of %d, %d/%d training batches/samples per process (%s)%s", epoch, args.epochs,
                        len(self.train_batches), len(self.sampler), f"balanced 1:{ratio}" if ratio else "plain order",
                        f", then {len(self.sel_ds)} selection crops" if evaluate else "")
            trn = self._train_epoch(epoch)
            self.samples_seen += self.sampler.total
            selection = self._select(epoch) if evaluate else None
            self._finish_epoch(epoch, trn, selection)
            epoch_times.append(time.perf_counter() - started)
            remaining = (args.epochs - epoch) * float(np.mean(epoch_times))
            logger.info("Epoch %d took %s; ETA %s for %d more epoch(s)", epoch, format_duration(epoch_times[-1]),
                        format_duration(remaining), args.epochs - epoch)
        if self.dist.is_main:
            self._write_outputs()
            best = next((r for r in self.history if r["epoch"] == self.best_epoch and r["split"] == "selection"),
                        None)
            logger.info("Kept epoch %d (--keep %s), threshold %.4g: %s", self.best_epoch, args.keep,
                        self.best_threshold, format_row(best) if best else "-")
        return 0

    def _selects_at(self, epoch: int) -> bool:
        if self.args.selection_fraction == 0:
            return False
        return epoch % self.args.selection_interval == 0 or epoch == self.args.epochs

    # -- state ------------------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.state_dir / "last.pt"

    @property
    def _best_path(self) -> Path:
        """The kept model so far, named by its epoch: a kill between writing it and writing the state leaves
        the state pointing at the previous (still present) file, never at a newer one."""
        return self.state_dir / f"best_model.e{self.best_epoch}.pt"

    @property
    def _best_selection_path(self) -> Path:
        return self.state_dir / f"best_selection.e{self.best_epoch}.tsv"

    def _remove_stale_best(self) -> None:
        for pattern, keep in (("best_model.e*.pt", self._best_path), ("best_selection.e*.tsv", self._best_selection_path)):
            for path in self.state_dir.glob(pattern):
                if path != keep:
                    path.unlink(missing_ok=True)

    def _restore(self) -> int:
        """Load the state when resuming; returns the last finished epoch (0 for a fresh start)."""
        path = self._state_path
        if not self.args.resume:
            return 0
        if not path.is_file():
            logger.info("--resume: no state in %s, starting at epoch 1", self.state_dir)
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: start afresh, say why
            logger.warning("--resume: cannot read %s (%s); starting at epoch 1", path, exc)
            return 0
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            logger.warning("--resume: %s is not a luna training state of this version; starting at epoch 1", path)
            return 0
        if state.get("fingerprint") != self.fingerprint:
            logger.warning("--resume: state in %s was written with other settings, inputs or code; starting at "
                           "epoch 1", self.state_dir)
            return 0
        if int(state["epoch"]) > self.args.epochs:
            logger.warning("--resume: state in %s has %d finished epochs, more than --epochs %d; starting at "
                           "epoch 1", self.state_dir, int(state["epoch"]), self.args.epochs)
            return 0
        # load_state_dict copies into the existing tensors: model and EMA keep their channels_last layout
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema_state"])
        self.sampler.load_state_dict(state["sampler_state"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.history = [dict(r) for r in state["history"]]
        self.best_epoch = int(state["best_epoch"])
        self.best_key = float(state["best_key"])
        self.best_threshold = float(state["best_threshold"])
        self.samples_seen = int(state["samples_seen"])
        epoch = int(state["epoch"])
        logger.info("Resuming after epoch %d from %s (kept epoch so far %d)", epoch, path, self.best_epoch)
        return epoch

    def _save_state(self, epoch: int) -> None:
        state = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "model_state": unwrap_model(self.model).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "sampler_state": self.sampler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_key": self.best_key,
            "best_threshold": self.best_threshold,
            "samples_seen": self.samples_seen,
        }
        atomic_torch_save(state, self._state_path)

    def _write_outputs(self) -> None:
        """history.tsv, selection_predictions.tsv and model.pt (each atomic), once the run is complete."""
        if self.best_epoch == 0 or not self._best_path.is_file():
            raise TrainingError(f"{self.state_dir}: no kept model after {self.args.epochs} epochs")
        write_history(self.out_dir / "history.tsv", self.history)
        if self._best_selection_path.is_file():
            copy_file(self._best_selection_path, self.out_dir / "selection_predictions.tsv")
        else:
            (self.out_dir / "selection_predictions.tsv").unlink(missing_ok=True)
        copy_file(self._best_path, self.out_dir / "model.pt")  # last: its presence marks a finished run
        logger.info("wrote %s: model.pt (epoch %d), history.tsv, selection_predictions.tsv", self.out_dir,
                    self.best_epoch)

    # -- loops ------------------------------------------------------------------------------------

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated and kept in model.pt: the EMA when on, else the trained ones."""
        return self.ema if self.ema is not None else self.model

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, non_blocking=self.device.type == "cuda")

    def _forward(self, model: torch.nn.Module, crops: torch.Tensor, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.channels_last:
            crops = crops.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            logits, _ = model(crops)
        logits = logits.float()
        return logits, torch.softmax(logits, dim=1)

    def _train_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_seed_int(self.args.seed, 3, epoch, self.dist.rank))
        labels, probs, losses = [], [], []
        first_step = (epoch - 1) * len(self.train_batches)
        for step, (crops, label, _) in enumerate(
                with_progress(self.train_batches, len(self.train_batches), f"E{epoch} Training", log=logger),
                start=first_step):
            crops = augment_batch(self._to_device(crops).float(), self.augment, generator)
            label = self._to_device(label)
            self.optimizer.zero_grad(set_to_none=True)
            logits, probability = self._forward(self.train_model, crops, amp=self.use_amp)
            loss = F.cross_entropy(logits, label, reduction="none")
            loss.mean().backward()
            if self.args.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = scheduled_lr(self.args.lr, step, self.args.lr_warmup_steps, self.args.lr_schedule,
                                           self.args.epochs * len(self.train_batches))
            self.optimizer.step()
            if self.ema is not None:
                ema_update(self.ema, self.model, ema_decay_at(self.args.ema_decay, step))
            labels.append(label.detach())
            probs.append(probability[:, 1].detach())
            losses.append(loss.detach())
        return self._gather(labels, probs, losses)

    def _select(self, epoch: int) -> SelectionPass:
        """Every selection crop through luna.inference.predict (float32, the path luna-predict takes); under
        DDP each process takes every world_size-th row with rank 0's weights and the results are gathered."""
        model = self.eval_model
        if self.dist.enabled:  # every process evaluates with rank 0's batch-norm statistics (the saved ones)
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        rows = self.sel_ds.rows
        share = np.arange(self.dist.rank, len(rows), self.dist.world_size)
        logger.info("E%d Selection: %d crops of %d scans", epoch, len(rows), rows["series_uid"].nunique())
        resident = None
        if self.sel_resident is not None:
            resident = self.sel_resident.index_select(0, torch.as_tensor(share, device=self.device))
        prediction = predict(model, self.sel_ds.stores, rows.iloc[share], self.sel_ds.labels[share],
                             batch_size=self.args.batch_size * 2, device=self.device,
                             channels_last=self.args.channels_last, what="selection crops", resident=resident,
                             tta=self.args.tta)
        probability = np.empty(len(rows), dtype=np.float32)
        loss = np.empty(len(rows), dtype=np.float32)
        if self.dist.enabled:
            parts: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(parts, (share, prediction.probability, prediction.loss))
        else:
            parts = [(share, prediction.probability, prediction.loss)]
        for where, p, l in parts:
            probability[where], loss[where] = p, l
        labels = self.sel_ds.labels
        # metrics from the values as selection_predictions.tsv holds them (float32 -> shortest decimal)
        p64, l64 = probability.astype(np.float64), loss.astype(np.float64)
        threshold = choose_threshold(labels, p64, self.args.threshold)
        row = metric_row(labels, p64, l64, epoch=epoch, split="selection")
        operating = metric_row(labels, p64, l64, epoch=epoch, split="selection", threshold=threshold)
        return SelectionPass(labels, probability, loss, threshold, row, operating)

    def _gather(self, labels: list[torch.Tensor], probs: list[torch.Tensor],
                losses: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-sample values as numpy, concatenated over every process (rank order)."""
        def cat(parts: list[torch.Tensor], dtype: Any) -> np.ndarray:
            return torch.cat(parts).cpu().numpy().astype(dtype) if parts else np.zeros(0, dtype=dtype)

        local = (cat(labels, np.int64), cat(probs, np.float64), cat(losses, np.float64))
        if not self.dist.enabled:
            return local
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, local)
        return tuple(np.concatenate([g[k] for g in gathered]) for k in range(3))  # type: ignore[return-value]

    def _finish_epoch(self, epoch: int, trn: tuple, selection: SelectionPass | None) -> None:
        trn_row = metric_row(*trn, epoch=epoch, split="train")
        logger.info(format_row(trn_row))
        if selection is not None:
            logger.info(format_row(selection.row))
            logger.info("E%d selection at threshold %.4g (--threshold %s): precision %.4f, recall %.4f, F1 %.4f",
                        epoch, selection.threshold, self.args.threshold, selection.operating_row["precision"],
                        selection.operating_row["recall"], selection.operating_row["f1"])
        if self.dist.is_main:
            rows = [trn_row] + ([selection.row] if selection is not None else [])
            self.history = [r for r in self.history if r["epoch"] != epoch] + rows
            self._log_tensorboard(trn, trn_row, selection)
            keep_now = selection is None and self.args.selection_fraction == 0 and epoch == self.args.epochs
            if selection is not None:
                key = selection_key(self.args.keep, epoch, selection.operating_row)
                keep_now = self.best_epoch == 0 or key > self.best_key
            if keep_now:
                self.best_key = selection_key(self.args.keep, epoch, selection.operating_row) if selection else epoch
                self.best_epoch = epoch
                self._save_best(epoch, trn_row, selection)
            self._save_state(epoch)
            self._remove_stale_best()
        if self.dist.enabled:
            dist.barrier()

    def _save_best(self, epoch: int, trn_row: dict[str, Any], selection: SelectionPass | None) -> None:
        """The kept model (and its selection predictions) in the state folder, named by epoch."""
        policy = self.args.threshold
        self.best_threshold = selection.threshold if selection is not None else parse_threshold_policy(policy)[1]
        extra = {
            "train_metrics": trn_row,
            "samples_seen": self.samples_seen,
            "test_fold": int(self.args.test_fold),
            "train_series_uids": scans_with_role(self.roles, "train"),
            "selection_series_uids": scans_with_role(self.roles, "selection"),
            "threshold": float(self.best_threshold),
            "threshold_policy": str(policy),
            "keep": self.args.keep,
            "selection_metrics": selection.operating_row if selection is not None else {},
        }
        save_checkpoint(self._best_path, self.eval_model, epoch=epoch,
                        val_metrics=selection.row if selection is not None else {},
                        args=_plain_args(self.args), model_config=self.model_config, device=self.device,
                        config=self.config, extra=extra)
        if selection is not None:
            frame = self.sel_ds.rows[SELECTION_PREDICTION_COLUMNS[:7]].copy()
            frame["is_nodule"] = selection.labels
            frame["probability"] = selection.probability
            frame["loss"] = selection.loss
            frame["fold"] = int(self.args.test_fold)
            write_tsv(frame, self._best_selection_path)
        logger.info("Epoch %d is kept so far (--keep %s; selection F1 %s at threshold %.4g)", epoch, self.args.keep,
                    selection.operating_row["f1"] if selection is not None else "-", self.best_threshold)

    def _log_tensorboard(self, trn: tuple, trn_row: dict, selection: SelectionPass | None) -> None:
        if self.tb_dir is None:
            return
        if self.trn_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            suffix = f"-{self.args.comment}" if self.args.comment else ""
            self.trn_writer = SummaryWriter(log_dir=str(self.tb_dir / f"{self.time_str}-trn_cls{suffix}"))
            self.val_writer = SummaryWriter(log_dir=str(self.tb_dir / f"{self.time_str}-val_cls{suffix}"))
        step = self.samples_seen
        bins = [x / 50.0 for x in range(51)]
        runs = [(self.trn_writer, trn[0], trn[1], trn_row)]
        if selection is not None:
            runs.append((self.val_writer, selection.labels, selection.probability.astype(np.float64), selection.row))
        for writer, labels, probs, row in runs:
            for key, tag in TB_TAGS.items():
                writer.add_scalar(tag, float(row[key]), step)
            writer.add_pr_curve("pr", labels, probs, step)
            neg = (labels == 0) & (probs > 0.01)
            pos = (labels == 1) & (probs < 0.99)
            if neg.any():
                writer.add_histogram("is_neg", probs[neg], step, bins=bins)
            if pos.any():
                writer.add_histogram("is_pos", probs[pos], step, bins=bins)
            writer.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``luna-train``: bad input -> one line on stderr, exit status 2."""
    from luna.runner import setup_logging

    setup_logging()
    try:
        code = LunaTrainingApp(argv).main()
    except ERRORS as exc:  # raised while checking the arguments, before main()
        print(f"luna-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
