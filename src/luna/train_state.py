"""The training stage's resumable state: where it lives, the fingerprint that keys it (settings, inputs, code),
and reading it back only when it belongs to this run. The state folder lies outside the declared outputs,
which Snakemake deletes before a job starts (docs/design.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

import torch

from luna.io import lock_path
from luna.model import atomic_torch_save
from luna.provenance import code_version

logger = logging.getLogger("luna.training")  # one stage, one logger name in the log

STATE_FORMAT = "luna-train-state-v2"
# settings that change what is trained or kept; a state written under others is not resumed
FINGERPRINT_ARGS = (
    "test_fold", "selection_fraction", "keep", "threshold", "selection_interval", "tta",
    "batch_size", "optimizer", "weight_decay", "lr", "momentum", "balanced", "balanced_schedule", "hard_negatives",
    "samples_per_epoch",
    "seed", "lr_warmup_steps", "lr_schedule", "clip_grad_norm", "ema_decay", "skip_excluded",
    "augment_flip", "augment_offset", "augment_scale", "augment_rotate", "augment_noise", "augment_flip_only_epochs",
    "channels_last",
)


def lock_state_folder(folder: Path) -> IO[bytes] | None:
    """Hold an exclusive lock on ``folder/.lock`` until the returned file is closed (:func:`luna.io.lock_path`):
    a second luna-train on the same state folder is refused at once, not left to delete the first one's kept
    model and copy another run's."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / ".lock"
    return lock_path(path, f"{folder}: the state folder is in use by another luna-train run ({path} is locked); "
                           "wait for it, or give this run its own --out or --state")


def default_state_dir(out: Path) -> Path:
    """``OUT/../.<OUT name>.train_state``: beside the outputs, never inside them."""
    out = Path(out)
    return out.parent / f".{out.name or 'model'}.train_state"


def _file_identity(path: str) -> list[Any]:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def fingerprint_parts(args: argparse.Namespace, amp: bool, device: torch.device, world_size: int) -> dict[str, Any]:
    """Everything that changes what is trained: settings, inputs (path, size, mtime), the code version (luna's
    version and a hash of its sources, so an uncommitted edit counts), torch's version, device kind, AMP, process
    count, on the CPU the torch thread count (fp32 sums split over other threads round differently: a resume at another
    count would not end where the uninterrupted run does) and on CUDA the GPU model and cuDNN version (other
    kernels). Not the number of epochs (a resumed run may go
    further) unless the learning-rate schedule or the flip-only last epochs depend on it, nor speed-only settings."""
    return {
        "code": code_version(),
        # another torch has other kernels and RNG streams: a resume under it would not end where the run would
        "torch": torch.__version__,
        # the schedule in epoch order: one schedule given in another order is the same run
        "args": {k: sorted(getattr(args, k)) if k == "balanced_schedule" else getattr(args, k)
                 for k in FINGERPRINT_ARGS},
        # a cosine schedule's rates depend on the run's length, and so do which epochs are flip-only: a run with
        # more epochs is another run
        "epochs": (args.epochs if args.lr_schedule != "constant" or (args.augment and args.augment_flip_only_epochs)
                   else None),
        "augment": bool(args.augment),
        "crops": [_file_identity(p) for p in args.crops],
        "splits": hashlib.sha256(Path(args.splits).read_bytes()).hexdigest(),
        # the findings whose negatives leave the training set, when they do
        "excluded": (hashlib.sha256(Path(args.annotations_excluded).read_bytes()).hexdigest()
                     if args.skip_excluded else None),
        "amp": amp,
        "device": device.type,
        "world_size": world_size,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "gpu": [torch.cuda.get_device_name(device), torch.backends.cudnn.version()] if device.type == "cuda" else None,
    }


def run_fingerprint(parts: dict[str, Any]) -> str:
    """The state's key: a hash of :func:`fingerprint_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two fingerprints' parts, for the log: ``lr 0.001 -> 0.002; threads 1 -> 2``."""
    changes = []
    new = json.loads(json.dumps(new))  # as the stored parts were read back: tuples are lists there
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "args" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changes += [f"{name} {old[key].get(name)!r} -> {new[key].get(name)!r}"
                        for name in sorted(set(old[key]) | set(new[key])) if old[key].get(name) != new[key].get(name)]
        elif key == "code":
            changes.append("the luna source code")
        elif key == "crops":
            changes.append("the crop stores (path, size or modification time)")
        elif key == "splits":
            changes.append("splits.tsv's content")
        elif key == "excluded":  # switched on or off: the skip_excluded argument says so
            if old.get(key) and new.get(key):
                changes.append("annotations_excluded.csv's content")
        else:
            changes.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return "; ".join(changes)


class StateFolder:
    """``--state DIR``: ``last.pt`` (everything after the last finished epoch) and the kept model so far with
    its selection predictions, named by epoch (a kill between writing one and writing the state leaves the
    state pointing at the previous, still present, file)."""

    def __init__(self, folder: Path, parts: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.parts = parts  # fingerprint_parts(): stored with the state, so a refused resume can say what changed
        self.fingerprint = run_fingerprint(parts)

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def best_model(self, epoch: int) -> Path:
        return self.folder / f"best_model.e{epoch}.pt"

    def best_selection(self, epoch: int) -> Path:
        return self.folder / f"best_selection.e{epoch}.tsv"

    def remove_stale(self, epoch: int) -> None:
        """Every kept-model file but the one of ``epoch``."""
        for pattern, keep in (("best_model.e*.pt", self.best_model(epoch)),
                              ("best_selection.e*.tsv", self.best_selection(epoch))):
            for path in self.folder.glob(pattern):
                if path != keep:
                    path.unlink(missing_ok=True)

    def load(self, max_epochs: int) -> dict[str, Any] | None:
        """The state when it belongs to this run (same format and fingerprint, at most ``max_epochs`` finished),
        else None with the reason logged: a fresh start."""
        path = self.last
        if not path.is_file():
            logger.info("--resume: no state in %s, starting at epoch 1", self.folder)
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: start afresh, say why
            logger.warning("--resume: cannot read %s (%s); starting at epoch 1", path, exc)
            return None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            logger.warning("--resume: %s is not a luna training state of this version; starting at epoch 1", path)
            return None
        if state.get("fingerprint") != self.fingerprint:
            what = ""
            if isinstance(state.get("fingerprint_parts"), str):
                what = describe_changes(json.loads(state["fingerprint_parts"]), self.parts)
            logger.warning("--resume: state in %s was written with other settings, inputs or code%s; starting at "
                           "epoch 1", self.folder, f" ({what})" if what else "")
            return None
        if int(state["epoch"]) > max_epochs:
            logger.warning("--resume: state in %s has %d finished epochs, more than --epochs %d; starting at "
                           "epoch 1", self.folder, int(state["epoch"]), max_epochs)
            return None
        planned = int(state.get("epochs", max_epochs))
        if int(state["epoch"]) == max_epochs and planned > max_epochs:
            # the state's epoch was not the last of its run: no last-epoch selection pass, no kept model
            logger.warning("--resume: state in %s is epoch %d of a %d-epoch run, not a finished %d-epoch run; "
                           "starting at epoch 1", self.folder, max_epochs, planned, max_epochs)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """``last.pt``, atomically, stamped with the format and this run's fingerprint."""
        stamp = {"format": STATE_FORMAT, "fingerprint": self.fingerprint,
                 "fingerprint_parts": json.dumps(self.parts, sort_keys=True)}  # JSON text: weights_only loads it
        atomic_torch_save({**stamp, **state}, self.last)
