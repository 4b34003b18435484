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
(fixed, max_f1, recall:R or fp_per_scan:F on the selection set). model.pt records the test fold, the training
and selection series UIDs, the crop shape and the threshold; ``selection_predictions.tsv`` holds the kept epoch's
selection probabilities (docs/design.md has the contracts).

Method: the book's (SGD lr 0.001 momentum 0.99, balanced 1:1, Chapter 12 augmentation) unless asked;
options beside it, each off by default: linear LR warm-up, gradient-norm clipping, Adam, an exponential
moving average of the weights (then the average is what is evaluated and kept) and a balance schedule.

Resumable: after every epoch the full state (model, optimizer, EMA, sampler epoch, RNG, history rows, best
model) is written atomically to ``--state DIR``, a folder outside the declared outputs (Snakemake deletes
those before a job starts). ``--resume`` continues after the last finished epoch. The state is keyed by a
fingerprint of the settings, the inputs and the code version (package version and a hash of its sources),
so a state written with other settings, inputs or code is never resumed. The outputs (model.pt,
history.tsv, selection_predictions.tsv) are written only when the run ends: a killed run leaves nothing at
--out that looks finished, and a resumed run ends with the same files as an uninterrupted one (on the CPU, bit
for bit; on CUDA cuDNN picks its algorithms by timing them, some nondeterministic, so two runs, resumed or not,
agree to float noise only).

Speed without changing the method: channels_last_3d, bf16 autocast for the training steps (CUDA; CPU only
with native bf16), pinned memory and non-blocking copies on CUDA, augmentation batched on the device, HDF5
read a batch at a time. Several processes: DistributedDataParallel under torchrun (gloo on CPU, nccl on
CUDA); each process trains on its own contiguous block of each epoch's samples (luna.data.EpochSampler; strided
slots would give a rank of a balanced order one class) and evaluates a share of the selection set; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from luna.app import StageApp, interrupted, sigterm_unwinds
from luna.cpu_speed import cpu_report, speed_up_training, tune_allocator
from luna.data import CropDataset, DataError, EpochSampler, ResidentBatches, augment_batch, make_loader
from luna.device import (DeviceError, cpu_has_native_bf16, dist_info_from_env, resident_decision, resolve_device,
                         strict_fp32, use_bf16)
from luna.froc import on_findings
from luna.io import (OutputError, check_not_an_input, check_output_file, check_writable_dir, copy_file, named_output,
                     release_lock, write_tsv)
from luna.luna16 import TableError, read_annotations_csv
from luna.metrics import HISTORY_COLUMNS, MetricsError, format_row, metric_row, parse_threshold_policy
from luna.model import LunaModel, atomic_torch_save, check_crop_shape, save_checkpoint, unwrap_model
from luna.progress import format_duration, with_progress
from luna.provenance import plain, provenance
from luna.recipe import augment_config, ema_decay_at, ema_update, make_optimizer, scheduled_lr
from luna.runner import setup_logging
from luna.selection import (SELECTION_PREDICTION_COLUMNS, DivergedError, SelectionPass, check_finite,
                            evaluate_selection, selection_frame,
                            selection_key)
from luna.splits import SplitsError, read_fold_roles, read_splits_tsv, scans_with_role
from luna.store import CropStore, StoreError, check_distinct_stores
from luna.tensorboard_log import TensorBoardLog
from luna.train_state import StateFolder, default_state_dir, fingerprint_parts, lock_state_folder
from luna.training_options import DESCRIPTION, add_arguments, resolve_workers

logger = logging.getLogger(__name__)

CPU_AMP_AUTO = True
"""``--amp auto`` on CPU: bf16 autocast where the CPU runs it natively (the project's brief quotes ~80 samples/s
bf16 with channels_last_3d on an AVX512-BF16 box against ~18-19 fp32 on AVX2; not measured in this repo, which
had no such CPU: docs/results.md); emulated bf16 is slower than fp32, so auto turns it on only where
``torch.backends.mkldnn`` reports native bf16 support (see resolve_amp)."""


class TrainingError(ValueError):
    """Training settings or state that cannot be used; the message names the option, file or value."""


OUTPUT_NAMES = ("model.pt", "history.tsv", "selection_predictions.tsv")
"""What --out receives, written when the run ends (model.pt last)."""

STALE_NAMES = ("predictions.tsv",)
"""Made from an earlier model.pt in --out (luna-predict's output in a fold folder, luna-evaluate --folds reads it
beside model.pt): removed with that model, so the new model is never reported with the old one's probabilities."""

ERRORS = (TrainingError, DataError, SplitsError, StoreError, OutputError, MetricsError, DeviceError, DivergedError)
"""What a bad input or an unwritable output raises: reported as one line, exit status 2."""


def resolve_amp(choice: str, device: torch.device) -> bool:
    """bf16 autocast for training (luna.device's policy, :data:`CPU_AMP_AUTO` on the CPU)."""
    return use_bf16(choice, device, cpu_auto=CPU_AMP_AUTO)


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options model.pt records; not --resume (how the run was started changes no weight, and a resumed
    run's model.pt must equal an uninterrupted run's byte for byte)."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items() if k != "resume"}


def _remove_output(path: Path) -> None:
    """Remove an output file; through a symlink, its target (the link stays and is written through later, as
    every output is: luna.io.atomic_path)."""
    (path.resolve() if path.is_symlink() else path).unlink(missing_ok=True)


def _read_config(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    import yaml

    try:
        with open(path) as fh:
            value = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:  # PyYAML's messages span lines: one line here
        raise TrainingError(f"{path}: cannot read config ({' '.join(str(exc).split())})") from exc
    return value if isinstance(value, dict) else {"value": value}


def _seed_int(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, dtype=np.uint64)[0]
               & 0x7FFFFFFFFFFFFFFF)


def write_history(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """history.tsv from all kept rows, atomically; NaN as ``NaN``."""
    write_tsv(pd.DataFrame(list(rows), columns=HISTORY_COLUMNS), path)


class LunaTrainingApp(StageApp):
    """``LunaTrainingApp(argv).main()``: parse ``argv`` (``sys.argv[1:]`` when None) and train."""

    prog = "luna-train"
    description = DESCRIPTION
    errors = ERRORS

    def __init__(self, sys_argv: Sequence[str] | None = None) -> None:
        super().__init__(sys_argv)
        self.args.channels_last = self.args.channels_last != "off"  # auto: on (faster on CPU and CUDA alike)
        self.time_str = datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
        self._state_lock: IO[bytes] | None = None  # held from the output checks to the end of main()
        self._new_dirs: list[Path] = []  # folders this run created: removed at the end if it left them empty
        self.out_dir = named_output(self.args.out, "--out", "output folder")
        self.state_dir = Path(self.args.state) if self.args.state else default_state_dir(self.out_dir.resolve())
        if self.args.tb_dir is None:
            self.tb_dir: Path | None = self.out_dir / "tensorboard"
        elif str(self.args.tb_dir).lower() in ("", "none"):
            self.tb_dir = None
        else:
            self.tb_dir = Path(self.args.tb_dir)
        self._check_args()
        self.dist = dist_info_from_env()
        self.device = resolve_device(self.args.device, self.dist.local_rank)
        self.tensorboard = TensorBoardLog(self.tb_dir, self.time_str, self.args.comment)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def _check_args(self) -> None:
        args = self.args
        out = self.out_dir.resolve()
        state = self.state_dir.resolve()
        if state == out or out in state.parents:
            raise TrainingError(f"--state {self.state_dir} lies inside --out {self.out_dir}; it must live "
                                "outside the declared outputs")
        for path in [*args.crops, args.splits]:
            if Path(path).is_dir():
                what = "splits.tsv" if path == args.splits else "crop store"
                raise TrainingError(f"{path}: is a folder, not a {what}")
            if not Path(path).is_file():
                raise TrainingError(f"{path}: no such file")
        check_distinct_stores(args.crops)
        if args.skip_excluded and args.annotations_excluded is None:
            raise TrainingError("--skip-excluded needs --annotations-excluded (LUNA16's annotations_excluded.csv: the "
                                "findings whose negatives leave the training set)")
        if args.annotations_excluded is not None and not Path(args.annotations_excluded).is_file():
            raise TrainingError(f"--annotations-excluded {args.annotations_excluded}: no such file")
        if args.annotations_excluded is not None and not args.skip_excluded:  # luna-evaluate's is another option
            logger.warning("--annotations-excluded %s is read only with --skip-excluded: this run trains on every "
                           "candidate", args.annotations_excluded)
        counts = Counter(e for e, _ in args.balanced_schedule)
        repeated = min((e for e, n in counts.items() if n > 1), default=None)
        if repeated is not None:  # the larger ratio won, whatever the order given
            raise TrainingError(f"--balanced-schedule gives epoch {repeated} more than once ("
                                + ", ".join(f"{e}:{r}" for e, r in args.balanced_schedule if e == repeated) + ")")
        if args.augment_flip_only_epochs > args.epochs:
            raise TrainingError(f"--augment-flip-only-epochs {args.augment_flip_only_epochs} is more than --epochs "
                                f"{args.epochs}")
        self.config = _read_config(args.config)  # a bad one found now, before an earlier run's outputs go
        if args.selection_fraction == 0 and (args.keep != "last" or parse_threshold_policy(args.threshold)[0] != "fixed"):
            raise TrainingError("--selection-fraction 0 leaves nothing to choose on: use --keep last and a fixed "
                                f"--threshold (got --keep {args.keep} --threshold {args.threshold})")

    # -- setup ------------------------------------------------------------------------------------

    def main(self) -> int:
        """Train; on bad input (or an output that cannot be written) print one line to stderr and return 2
        (StageApp.main's contract, with the "Starting" line logged by rank 0 only)."""
        setup_logging()
        try:
            with sigterm_unwinds():
                return self._run_dist()
        except self.errors as exc:
            print(f"{self.prog}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            return interrupted(self.prog, exc)

    def _run_dist(self) -> int:
        args = self.args
        if not self.dist.is_main:  # one log for the whole run: other processes report problems only (every
            for name in (__name__, "luna"):  # luna logger: under torchrun this module's is __main__'s
                logging.getLogger(name).setLevel(logging.WARNING)
        logger.info("Starting %s, %s", type(self).__name__, args)
        if self.dist.enabled and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
        try:
            return self._main()
        finally:
            self._release_and_tidy()
            if self.dist.enabled and dist.is_initialized():
                dist.destroy_process_group()

    def _main(self) -> int:
        self.setup()
        return self.run()

    def _release_and_tidy(self) -> None:
        """The state lock released (the next run in this process, a notebook or a test, may take it) and the
        folders this run created removed where it left them empty: a refused run leaves no empty --out,
        tensorboard or state folder (with its lock file) behind. Only by the run that held the lock: a run
        refused by it may have seen the folders missing a moment before the running one made them."""
        lock, self._state_lock = self._state_lock, None
        new_dirs, self._new_dirs = (self._new_dirs if lock is not None else []), []
        state_lock_only = False
        if self.state_dir in new_dirs:
            with contextlib.suppress(OSError):
                state_lock_only = {p.name for p in self.state_dir.iterdir()} == {".lock"}
        release_lock(lock, self.state_dir / ".lock" if state_lock_only else None)  # removed while still held
        self.tensorboard.close()
        for folder in reversed(new_dirs):  # the tensorboard folder before the --out folder holding it
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one

    def _check_writable(self) -> None:
        """Every folder this run writes, checked before the first epoch (not after an hour of training)."""
        # the folders missing now, with their missing parents (--out new/t made new/ too), shallowest first: the
        # tidy-up removes them deepest first where this run leaves them empty
        missing = {parent for d in (self.out_dir, self.state_dir, self.tb_dir) if d is not None
                   for parent in (d, *d.parents) if not parent.exists()}
        self._new_dirs = sorted(missing, key=lambda d: (len(d.parts), str(d)))
        check_writable_dir(self.out_dir, "--out folder")
        check_writable_dir(self.state_dir, "--state folder")
        # one run at a time per state folder (two runs with one --out share the default one): the second one's
        # cleanup deleted the first's kept model, and each copied whatever file had the kept name. Taken before
        # the --tb-dir check: a refused --tb-dir then leaves no folder this run made (only the holder tidies up)
        self._state_lock = lock_state_folder(self.state_dir)
        if self.tb_dir is not None:
            check_writable_dir(self.tb_dir, "--tb-dir folder")
            try:
                self.tensorboard.check_available()
            except ImportError as exc:
                raise TrainingError(f"TensorBoard logging needs the tensorboard package ({exc}): install it, or "
                                    "pass --tb-dir none") from exc
        last = self.state_dir / "last.pt"
        if last.is_dir():  # found now, not after the first epoch
            raise OutputError(f"{last}: is a folder; luna-train keeps its resumable state there")
        check_output_file(last)
        inputs = {"--crops": list(self.args.crops), "--splits": [self.args.splits],
                  "--annotations-excluded": [self.args.annotations_excluded],
                  "--config": [self.args.config]}
        for name in OUTPUT_NAMES:  # an earlier run's, checked now (removed by _remove_previous_outputs)
            old = self.out_dir / name
            if old.is_dir():  # found now, not after the training
                raise OutputError(f"{old}: is a folder; luna-train writes its {name} there")
            check_output_file(old)  # a FIFO or a device there: found now too
            check_not_an_input(old, inputs, what=f"--out {self.out_dir}:")  # removed later, then read: gone

    def _remove_previous_outputs(self) -> None:
        """An earlier run's outputs, removed once this run's inputs have checked out (a refused rerun keeps
        them) and before its first epoch (a failed or killed rerun must not leave them looking finished), with
        the predictions made from that model (STALE_NAMES)."""
        for name in (*OUTPUT_NAMES, *STALE_NAMES):
            old = self.out_dir / name
            try:
                if old.is_file():
                    logger.info("removing previous %s%s", old, " (made by the model this run replaces)"
                                if name in STALE_NAMES else "")
                    _remove_output(old)
            except OSError as exc:
                raise OutputError(f"{old}: cannot remove the previous output ({exc.strerror or exc})") from exc

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
        if self.use_amp and self.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("--amp on: this CPU has no native bf16 (oneDNN emulates it), so training runs several "
                           "times slower than fp32 (--amp auto chooses fp32 here)")
        self.augment = augment_config(args)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest algorithms by timing: bits vary between runs on CUDA
            strict_fp32(self.device)  # what is not bf16 (all of it with --amp off) is float32, not TF32
        logger.info("device %s, amp %s, channels_last %s, %d process(es); %s", self.device,
                    "bf16" if self.use_amp else "off", args.channels_last, self.dist.world_size, cpu_report())

        self.roles = read_fold_roles(args.splits, args.test_fold, args.selection_fraction)
        stores = [CropStore(p) for p in args.crops]
        # int16 through the loader (half the bytes), float32 on the device
        self.train_ds = CropDataset(stores, self.roles, "train", int16=True)
        self.sel_ds = CropDataset(stores, self.roles, "selection", int16=True)
        test_ds = CropDataset(stores, self.roles, "test", int16=True)
        if args.skip_excluded:
            self._skip_excluded(args.annotations_excluded)
        self._check_roles(test_ds)
        in_stores = {uid for store in stores for uid in store.geometries}
        for role in ("train", "selection"):
            scans = scans_with_role(self.roles, role)
            missing = [uid for uid in scans if uid not in in_stores]
            if missing:  # a subset's store left out of --crops: its scans would silently not take part
                logger.warning("%d of the %d %s scans in %s are in none of the crop stores given (e.g. %s): they "
                               "take no part in this run (a store left out of --crops, or scans the crop stage "
                               "skipped)", len(missing), len(scans), role, args.splits, missing[0])
        logger.info("test fold %d: %d scans, %d crops (%d positive), held out; train: %d scans, %d crops (%d "
                    "positive); selection: %d scans, %d crops (%d positive)", args.test_fold,
                    len(scans_with_role(self.roles, "test")), len(test_ds), test_ds.n_pos,
                    len(scans_with_role(self.roles, "train")), len(self.train_ds), self.train_ds.n_pos,
                    len(scans_with_role(self.roles, "selection")), len(self.sel_ds), self.sel_ds.n_pos)
        self.crop_shape = self.train_ds.crop_shape
        try:
            check_crop_shape(self.crop_shape)
        except ValueError as exc:
            raise TrainingError(f"{args.crops[0]}: {exc}") from exc

        self.sampler = EpochSampler(self.train_ds.labels, ratio=args.balanced, schedule=args.balanced_schedule,
                                    samples_per_epoch=args.samples_per_epoch, seed=args.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size,
                                    hard_negatives=args.hard_negatives)
        unused = [f"{e}:{r}" for e, r in args.balanced_schedule if e > args.epochs]
        if unused:  # not an error: a later --resume --epochs N may reach them
            logger.warning("--balanced-schedule %s: after the last epoch (--epochs %d), unused in this run",
                           " ".join(unused), args.epochs)
        if args.hard_negatives > 0 and not any(self.sampler.ratio_at(e) for e in range(2, args.epochs + 1)):
            logger.warning("--hard-negatives %g mines the negatives of balanced epochs from the second on; this run "
                           "has none (--balanced %g, --balanced-schedule %s, --epochs %d): it changes nothing",
                           args.hard_negatives, args.balanced, args.balanced_schedule or "none", args.epochs)
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
        self.state = StateFolder(self.state_dir, fingerprint_parts(args, self.use_amp, self.device,
                                                                   self.dist.world_size))

        if self.dist.is_main:  # every input has checked out: an earlier run's outputs go before the first epoch
            self._remove_previous_outputs()

        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_key = -math.inf
        self.best_threshold = math.nan
        self.samples_seen = 0
        self.start_epoch = self._restore() + 1
        if self.dist.is_main and self.tb_dir is not None \
                and self.tb_dir.resolve() == (self.out_dir / "tensorboard").resolve():
            # OUT/tensorboard shows this model's curves only: a resumed run keeps its own runs (named by the
            # state's time), and removes another training's, left there since by a run with other settings
            own = self.tensorboard.run_names if self.start_epoch > 1 else []
            for path in self.tensorboard.remove_earlier_runs(keep=own):
                logger.info("removed an earlier training's TensorBoard run %s", path)
            if own and not (self.tb_dir / own[0]).is_dir():  # its training run is written every epoch
                logger.warning("%s: this model's TensorBoard runs (%s) are not there (a training with other "
                               "settings removed them since, or its earlier epochs were logged elsewhere); its curves "
                               "there start at epoch %d (history.tsv has every epoch)",
                               self.tb_dir, ", ".join(own), self.start_epoch)

        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)

    def _skip_excluded(self, path: str) -> None:
        """--skip-excluded: the training negatives on excluded findings leave the training set."""
        try:
            excluded = read_annotations_csv(path, allow_negative=True)
        except (TableError, OSError) as exc:
            raise TrainingError(f"--annotations-excluded: {exc}") from exc
        on = on_findings(self.train_ds.rows, excluded) & (self.train_ds.labels == 0)
        self.train_ds.drop(on)
        logger.info("--skip-excluded: %d training negatives on the %d findings of %s left out (%d training crops "
                    "remain)", int(on.sum()), len(excluded), path, len(self.train_ds))

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
            workers = resolve_workers(args.num_workers, self.device, self.dist.world_size, args.threads)
            self.train_batches = make_loader(self.train_ds, self.sampler, batch_size=args.batch_size,
                                             num_workers=workers, pin_memory=self.device.type == "cuda")

    def _check_roles(self, test_ds: CropDataset) -> None:
        """Clear errors, before any training, for a split that cannot give honest numbers."""
        args, fold = self.args, self.args.test_fold
        if len(self.train_ds) == 0 or self.train_ds.n_pos == 0:
            raise TrainingError(f"{args.splits}: test fold {fold} leaves {len(self.train_ds)} training crops with "
                                f"{self.train_ds.n_pos} nodules in {', '.join(args.crops)} (--selection-fraction "
                                f"{args.selection_fraction}); nothing to learn from")
        if self.train_ds.n_neg == 0:  # a classifier of one class; balanced sampling failed only after setup
            raise TrainingError(f"{args.splits}: test fold {fold} leaves {len(self.train_ds)} training crops, all "
                                f"nodules, in {', '.join(args.crops)}; nothing to tell them from")
        if len(test_ds) == 0:
            splits = read_splits_tsv(args.splits)
            test_subsets = set(splits.loc[splits["fold"] == fold, "subset"])
            given = [store for store in test_ds.stores if store.subset in test_subsets]
            if test_subsets and {store.subset for store in given} == test_subsets:  # not a store left out
                raise TrainingError(f"{args.splits}: test fold {fold} has no candidate in the stores of its subsets "
                                    f"({', '.join(str(store.path) for store in given)}): nothing to test, its metrics "
                                    "would be undefined")
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
            if self.sampler.hard_negatives:  # per-item losses for the next epochs' mining (all processes alike)
                self.sampler.record(trn[3], trn[2])
            trn = trn[:3]
            self.samples_seen += self.sampler.total
            selection = self._select(epoch) if evaluate else None
            self._finish_epoch(epoch, trn, selection)
            epoch_times.append(time.perf_counter() - started)
            remaining = (args.epochs - epoch) * float(np.mean(epoch_times))
            logger.info("Epoch %d took %s; ETA %s for %d more epoch(s)", epoch, format_duration(epoch_times[-1]),
                        format_duration(remaining), args.epochs - epoch)
        if self.dist.is_main:
            self._write_outputs()
            kept = torch.load(self.out_dir / "model.pt", map_location="cpu", weights_only=True)
            at = kept.get("selection_metrics") or {}
            logger.info("Kept epoch %d (--keep %s), operating threshold %.4g%s", self.best_epoch, args.keep,
                        self.best_threshold,
                        f": selection precision {at['precision']:.4f}, recall {at['recall']:.4f}, F1 {at['f1']:.4f} "
                        "at it" if at else " (no selection set)")
        return 0

    def _selects_at(self, epoch: int) -> bool:
        if self.args.selection_fraction == 0:
            return False
        return epoch % self.args.selection_interval == 0 or epoch == self.args.epochs

    # -- state ------------------------------------------------------------------------------------

    @property
    def _best_path(self) -> Path:
        return self.state.best_model(self.best_epoch)

    @property
    def _best_selection_path(self) -> Path:
        return self.state.best_selection(self.best_epoch)

    def _restore(self) -> int:
        """Load the state when resuming; returns the last finished epoch (0 for a fresh start)."""
        state = self.state.load(self.args.epochs) if self.args.resume else None
        if state is None:
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
        self.tensorboard.time_str = str(state.get("tensorboard_time", self.tensorboard.time_str))  # the same runs
        epoch = int(state["epoch"])
        logger.info("Resuming after epoch %d from %s (kept epoch so far %d)", epoch, self.state.last, self.best_epoch)
        return epoch

    def _save_state(self, epoch: int) -> None:
        self.state.save({
            "epoch": epoch,
            "epochs": self.args.epochs,
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
            "tensorboard_time": self.tensorboard.time_str,
        })

    def _write_outputs(self) -> None:
        """history.tsv, selection_predictions.tsv and model.pt (each atomic), once the run is complete."""
        if self.best_epoch == 0 or not self._best_path.is_file():
            raise TrainingError(f"{self.state_dir}: no kept model after {self.args.epochs} epochs")
        out = {name: self.out_dir / name for name in OUTPUT_NAMES}
        selected = self.args.selection_fraction > 0
        if selected and not self._best_selection_path.is_file():  # removed by hand or by another run
            raise TrainingError(f"{self._best_selection_path}: the kept epoch's selection predictions are missing "
                                "from the state folder; rerun without --resume")
        # the kept model as this run's options say (a resumed run's kept epoch was saved under the first
        # process's: --epochs, --out, --state may have changed since)
        kept = torch.load(self._best_path, map_location="cpu", weights_only=True)
        kept["args"] = plain(_plain_args(self.args))
        kept["provenance"] = provenance(self.device, self.config)
        # the runs that hold its curves, named when the outputs are written, not with the kept epoch: a run
        # without a selection pass has no val run, and a resumed one's may have been removed by a training with
        # other settings since
        kept["tensorboard_runs"] = [str(self.tb_dir / run) for run in self.tensorboard.run_names
                                    if (self.tb_dir / run).is_dir()] if self.tb_dir is not None else []
        try:
            write_history(out["history.tsv"], self.history)
            if selected:
                copy_file(self._best_selection_path, out["selection_predictions.tsv"])
            else:  # no selection pass (--selection-fraction 0): the table's header, so every declared output exists
                write_tsv(pd.DataFrame(columns=SELECTION_PREDICTION_COLUMNS), out["selection_predictions.tsv"])
            atomic_torch_save(kept, out["model.pt"])  # last: its presence marks a finished run
        except BaseException:  # a full disk at the end: none of the three, not a finished-looking part of them
            for path in out.values():
                if path.resolve().is_file():
                    _remove_output(path)
            raise
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

    def _train_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One epoch of training steps; per-sample labels, probabilities, losses and item indices (all ranks)."""
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_seed_int(self.args.seed, 3, epoch, self.dist.rank))
        augment = augment_config(self.args, epoch)
        if augment != self.augment:
            logger.info("E%d: augmentation flips only (the last %d epoch(s), --augment-flip-only-epochs)", epoch,
                        self.args.augment_flip_only_epochs)
        labels, probs, losses, items = [], [], [], []
        first_step = (epoch - 1) * len(self.train_batches)
        for step, (crops, label, index) in enumerate(
                with_progress(self.train_batches, len(self.train_batches), f"E{epoch} Training", log=logger),
                start=first_step):
            crops = augment_batch(self._to_device(crops).float(), augment, generator)
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
            items.append(torch.as_tensor(index).cpu())
        return self._gather(labels, probs, losses, items)

    def _select(self, epoch: int) -> SelectionPass:
        return evaluate_selection(self.eval_model, self.sel_ds, self.dist, epoch=epoch, device=self.device,
                                  batch_size=self.args.batch_size * 2, channels_last=self.args.channels_last,
                                  tta=self.args.tta, threshold_policy=self.args.threshold, resident=self.sel_resident)

    def _gather(self, labels: list[torch.Tensor], probs: list[torch.Tensor], losses: list[torch.Tensor],
                items: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-sample values as numpy, concatenated over every process (rank order)."""
        def cat(parts: list[torch.Tensor], dtype: Any) -> np.ndarray:
            return torch.cat(parts).cpu().numpy().astype(dtype) if parts else np.zeros(0, dtype=dtype)

        local = (cat(labels, np.int64), cat(probs, np.float64), cat(losses, np.float64), cat(items, np.int64))
        if not self.dist.enabled:
            return local
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, local)
        return tuple(np.concatenate([g[k] for g in gathered]) for k in range(4))  # type: ignore[return-value]

    def _finish_epoch(self, epoch: int, trn: tuple, selection: SelectionPass | None) -> None:
        check_finite(epoch, "training", trn[1])  # a NaN model is never kept (with a fixed threshold it was)
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
            keep_now = selection is None and self.args.selection_fraction == 0 and epoch == self.args.epochs
            if selection is not None:
                key = selection_key(self.args.keep, epoch, selection.operating_row)
                keep_now = self.best_epoch == 0 or key > self.best_key
            if keep_now:
                self.best_key = selection_key(self.args.keep, epoch, selection.operating_row) if selection else epoch
                self.best_epoch = epoch
                self._save_best(epoch, trn_row, selection)
            self._save_state(epoch)
            self.state.remove_stale(self.best_epoch)
            # after the state: a resumed run continues these runs and never logs an epoch twice
            self.tensorboard.log(self.samples_seen, (trn[0], trn[1], trn_row), None if selection is None else
                                 (selection.labels, selection.probability.astype(np.float64), selection.row))
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
            "hu_window": list(self.train_ds.stores[0].hu_window),  # luna-predict refuses stores cut otherwise
            "keep": self.args.keep,
            "selection_metrics": selection.operating_row if selection is not None else {},
        }
        save_checkpoint(self._best_path, self.eval_model, epoch=epoch,
                        val_metrics=selection.row if selection is not None else {},
                        args=_plain_args(self.args), model_config=self.model_config, device=self.device,
                        config=self.config, extra=extra)
        if selection is not None:
            write_tsv(selection_frame(self.sel_ds, selection, self.args.test_fold), self._best_selection_path)
        by = "auc" if self.args.keep == "auc" else "f1"
        logger.info("Epoch %d is kept so far (--keep %s; selection %s %s at threshold %.4g)", epoch, self.args.keep,
                    by.upper(), selection.operating_row[by] if selection is not None else "-", self.best_threshold)


main = LunaTrainingApp.console


if __name__ == "__main__":
    main()
