"""Training data: a Dataset over the HDF5 crop stores, the book's balanced sampling, batched augmentation.

* :class:`CropDataset` — the crops of the scans of one role (train | selection | test, luna.splits.fold_roles)
  over several stores; item ``i`` is ``(crop float32 (1, 32, 48, 48) in HU, label int64 (1 = nodule), i)``.
  Crops are read lazily (each DataLoader worker opens its own HDF5 handle), a batch in one call per store;
  :class:`ResidentBatches` holds them all on the training device instead, when they fit.
* :class:`EpochSampler` — a fixed number of samples per epoch. Balanced with ratio ``r`` (the book's
  Chapter 12): sample ``i`` is a positive when ``i % (r + 1) == 0``, else a negative; the positive and the
  negative lists are reshuffled at the start of every epoch and cycled. ``r = 0``: plain shuffling (the
  book's Chapter 11 situation). ``hard_negatives`` > 0 (off in the book) draws that share of an epoch's
  negative slots by the training loss each negative had when it was last trained on (hard-negative mining,
  see :func:`hard_negative_picks`). The order of an epoch depends only on ``(seed, epoch)`` and the recorded
  losses (part of the sampler's state), so a resumed run draws exactly the samples an uninterrupted one would,
  whatever the number of loader workers.
* :func:`augment_batch` — Chapter 12's augmentation (per-axis flip, offset, scale; in-plane rotation;
  Gaussian noise), one random affine per sample, applied to a whole collated batch on the training device
  (trilinear, border padding; on the CPU through luna.cpu_speed.resample_affine); benchmarks/train.py
  measures it against the book's per-sample version. Deterministic for a given ``torch.Generator`` seed on a
  given device.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from luna.cpu_speed import resample_affine
from luna.inference import crops_to_tensor
from luna.splits import ROLES
from luna.store import CropStore, read_crops, stores_mismatch

logger = logging.getLogger(__name__)

class DataError(ValueError):
    """Training input that cannot be used; the one-line message names the file, row or value."""


# ----------------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------------

class CropDataset(Dataset):
    """The crops of the scans with one role over several crop stores, in store order then row order.

    ``roles`` maps series UID -> role (luna.splits.fold_roles); ``role`` picks one. ``rows`` (DataFrame)
    holds, per item: store (position in ``stores``), row (in that store), candidate_id, series_uid,
    coord_x/y/z, is_nodule, diameter_mm. ``labels`` is int64 (1 = nodule). Rows of scans that the roles do
    not list are left out (and counted in the log); an unlabelled row (is_nodule -1) is an error, since
    training needs labels.

    ``int16=True``: items hold the stored int16 HU instead of float32 — half the bytes through loader
    workers, pinned memory and the host-to-device copy; the trainer converts on the device.
    """

    def __init__(
        self,
        stores: Sequence[CropStore | str | os.PathLike],
        roles: Mapping[str, str],
        role: str,
        *,
        int16: bool = False,
    ) -> None:
        if role not in ROLES:
            raise DataError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self.role = role
        self.int16 = int16
        self.stores = [s if isinstance(s, CropStore) else CropStore(s) for s in stores]
        parts = []
        n_unlisted = 0
        for position, store in enumerate(self.stores):
            table = store.table
            assigned = table["series_uid"].map(roles)
            if len(table) and assigned.isna().all():  # it took no part, and the run went on: with warnings only
                raise DataError(f"{store.path}: none of its {table['series_uid'].nunique()} scans is in the split "
                                "(splits.tsv): a crop store of another data set?")
            n_unlisted += int(assigned.isna().sum())
            keep = (assigned == role).to_numpy()
            part = table.loc[keep].copy()
            part.insert(0, "row", np.flatnonzero(keep).astype(np.int64))
            part.insert(0, "store", position)
            unlabelled = part["is_nodule"].to_numpy() < 0
            if unlabelled.any():
                first = part.iloc[int(np.flatnonzero(unlabelled)[0])]
                raise DataError(
                    f"{store.path}: row {int(first['row'])} (candidate_id {int(first['candidate_id'])}) has no "
                    "class label (is_nodule -1); training needs labelled candidates"
                )
            parts.append(part)
        if n_unlisted and role == ROLES[0]:  # once, not once per role
            logger.warning("%d crops belong to scans not listed in splits.tsv; left out", n_unlisted)
        self.rows = (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["store", "row", "candidate_id", "series_uid", "coord_x", "coord_y", "coord_z",
                     "is_nodule", "diameter_mm"]))
        self.labels = (self.rows["is_nodule"].to_numpy() > 0).astype(np.int64)
        self._store_of = self.rows["store"].to_numpy(dtype=np.int64)
        self._row_of = self.rows["row"].to_numpy(dtype=np.int64)
        self.crop_shape = self.stores[0].crop_shape if self.stores else (32, 48, 48)
        mismatch = stores_mismatch(self.stores)
        if mismatch:
            raise DataError(mismatch)

    def drop(self, mask: np.ndarray) -> None:
        """Leave out the items where ``mask`` is True (e.g. negatives on excluded findings); order kept."""
        keep = ~np.asarray(mask, dtype=bool)
        if keep.shape != self.labels.shape:
            raise ValueError(f"mask of {keep.size} items for a dataset of {len(self.labels)}")
        self.rows = self.rows.loc[keep].reset_index(drop=True)
        self.labels = self.labels[keep]
        self._store_of = self._store_of[keep]
        self._row_of = self._row_of[keep]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_pos(self) -> int:
        return int(self.labels.sum())

    @property
    def n_neg(self) -> int:
        return len(self.labels) - self.n_pos

    def crops_int16(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The crops of the given items, int16 (n, I, R, C) in the given order (:func:`luna.store.read_crops`)."""
        indices = np.asarray(indices, dtype=np.int64)
        return read_crops(self.stores, self._store_of[indices], self._row_of[indices], self.crop_shape)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index = int(index)
        crop = self.stores[int(self._store_of[index])].crop(int(self._row_of[index]))
        crop_t = torch.from_numpy(crop if self.int16 else crop.astype(np.float32)).unsqueeze(0)
        return crop_t, torch.tensor(self.labels[index], dtype=torch.long), index

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A whole batch at once (DataLoader calls this when present): far fewer HDF5 calls."""
        crops_np = self.crops_int16(indices)
        crops = torch.from_numpy(crops_np).unsqueeze(1) if self.int16 else crops_to_tensor(crops_np)
        labels = torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])
        return [(crops[k], labels[k], int(i)) for k, i in enumerate(indices)]


# ----------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------

def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]))


def balanced_indices(
    labels: np.ndarray, ratio: float, n_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """The book's balanced order: position i is a positive when ``floor(i / (ratio + 1))`` steps up (for a whole
    ``ratio``: when ``i % (ratio + 1) == 0``, the book's LunaDataset.__getitem__ arithmetic), else a negative;
    both lists shuffled once by ``rng`` and then cycled. ``ratio`` is negatives per positive and may be a
    fraction: 0.5 gives P N P, P N P, ... (two positives per negative)."""
    labels = np.asarray(labels)
    positives = np.flatnonzero(labels > 0)
    negatives = np.flatnonzero(labels <= 0)
    if len(positives) == 0 or len(negatives) == 0:
        raise DataError(
            f"balanced sampling needs positive and negative training crops (have {len(positives)} positive, "
            f"{len(negatives)} negative)"
        )
    positives = positives[rng.permutation(len(positives))]
    negatives = negatives[rng.permutation(len(negatives))]
    i = np.arange(n_samples, dtype=np.int64)
    pos_ndx = np.floor(i / (ratio + 1.0)).astype(np.int64)  # at a positive: how many came before it
    is_pos = np.diff(pos_ndx, prepend=-1) > 0
    neg_ndx = (i - 1 - pos_ndx) % len(negatives)
    return np.where(is_pos, positives[pos_ndx % len(positives)], negatives[neg_ndx])


def hard_negative_picks(item_loss: np.ndarray, negatives: np.ndarray, k: int,
                        rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct negatives drawn with probability proportional to their last recorded training loss
    (weighted sampling without replacement, Efraimidis-Spirakis keys ``u ** (1 / w)``), the hardest first.

    A negative never trained on weighs the mean recorded negative loss (neither favoured nor avoided); every
    weight is at least 1e-6, so an easy negative can still come back. ``k`` is capped at ``len(negatives)``."""
    loss = np.asarray(item_loss, dtype=np.float64)[negatives]
    seen = np.isfinite(loss)
    if not seen.any():
        return np.zeros(0, dtype=np.int64)
    weight = np.where(seen, loss, loss[seen].mean())
    weight = np.maximum(weight, 1e-6)
    k = min(int(k), len(negatives))
    keys = np.log(rng.random(len(negatives))) / weight  # log of u ** (1 / w): larger is drawn first
    order = np.argsort(-keys, kind="stable")[:k]
    return negatives[order].astype(np.int64)


def shuffled_indices(n_items: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Plain shuffling: fresh permutations of all items, concatenated up to ``n_samples``."""
    if n_items == 0:
        raise DataError("no training crops")
    parts, total = [], 0
    while total < n_samples:
        parts.append(rng.permutation(n_items))
        total += n_items
    return np.concatenate(parts)[:n_samples].astype(np.int64)


def whole_if_integral(value: float) -> int | float:
    """``value`` as an int when it is whole (1.0 -> 1: the book's integer ratios keep their exact arithmetic and
    their spelling in logs and run fingerprints), else the float."""
    return int(value) if float(value).is_integer() else float(value)


class EpochSampler(Sampler[int]):
    """A fixed-length, per-epoch deterministic order of training items (balanced or plain).

    ``samples_per_epoch`` 0 means one pass over the items (the book's unbalanced epoch). ``schedule`` lists
    ``(epoch, ratio)`` pairs: from that epoch on, ``ratio`` replaces ``ratio`` (e.g. ``[(7, 8)]``: 1:8 from
    epoch 7), so a run can learn on many positives first and end nearer the data's own prior. Under
    DistributedDataParallel, rank ``k`` of ``world_size`` takes the ``k``-th contiguous block of the epoch's
    sequence, which is rounded up to a multiple of ``world_size`` (``total``) so that every process runs the
    same number of steps (an uneven count would hang the gradient all-reduce). Contiguous, not strided: the
    balanced sequence alternates the classes, so positions ``k, k + world_size, ...`` would give each rank one
    class only (at 1:1 and 2 processes, rank 0 all positives), and each rank's BatchNorm its own class's
    statistics. The state
    (``state_dict``) is the seed, the epoch and the recorded losses: the order is a function of them, so a
    resumed run continues with the same samples.

    ``hard_negatives`` h (balanced orders only): from the second epoch on, a random share h of the epoch's
    negative slots is refilled with negatives drawn by their last training loss (:func:`hard_negative_picks`),
    the rest keeps the book's cycled order. The trainer reports each epoch's per-sample losses through
    :meth:`record` (gathered over all processes, so every rank draws the same order). Why it was tried: at 1:1
    a 15-minute run shows each training negative about twice, and most negatives (parenchyma, the chest wall)
    are learnt at once while nodule-sized vessel cross-sections are the false positives; measured at 0.5 it
    changed the development CPM by less than 0.01 (benchmarks/results/quality.md), so the default is off.
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        ratio: float = 1,
        samples_per_epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        schedule: Sequence[tuple[int, float]] = (),
        hard_negatives: float = 0.0,
    ) -> None:
        if not 0.0 <= hard_negatives <= 1.0:
            raise DataError(f"hard_negatives must be in [0, 1], got {hard_negatives}")
        if not ratio >= 0 or any(not r >= 0 for _, r in schedule):  # NaN fails too
            raise DataError(f"balanced ratio must be >= 0, got {min([ratio, *(r for _, r in schedule)])}")
        if any(e < 1 for e, _ in schedule):
            raise DataError(f"balanced schedule epochs start at 1, got {min(e for e, _ in schedule)}")
        if samples_per_epoch < 0:
            raise DataError(f"samples per epoch must be >= 0, got {samples_per_epoch}")
        self.labels = np.asarray(labels)
        self.ratio = whole_if_integral(ratio)
        self.schedule = sorted((int(e), whole_if_integral(r)) for e, r in schedule)
        self.samples_per_epoch = int(samples_per_epoch) or len(self.labels)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.hard_negatives = float(hard_negatives)
        self.item_loss = np.full(len(self.labels), np.nan)  # each item's loss when last trained on (NaN: never)
        self.epoch = 1

    @property
    def total(self) -> int:
        """Samples per epoch over all processes (``samples_per_epoch`` rounded up to a multiple of world_size)."""
        return -(-self.samples_per_epoch // self.world_size) * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def ratio_at(self, epoch: int) -> float:
        """Negatives per positive in ``epoch`` (0 = plain shuffling): the last schedule entry that has begun."""
        return next((r for e, r in reversed(self.schedule) if e <= epoch), self.ratio)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch's sequence (all ranks)."""
        epoch = self.epoch if epoch is None else epoch
        rng = _rng(self.seed, 1, epoch)
        ratio = self.ratio_at(epoch)
        if not ratio:
            return shuffled_indices(len(self.labels), self.total, rng)
        order = balanced_indices(self.labels, ratio, self.total, rng)
        if self.hard_negatives > 0 and epoch > 1:
            order = self._with_hard_negatives(order, epoch, _rng(self.seed, 2, epoch))
        return order

    def _with_hard_negatives(self, order: np.ndarray, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """``order`` with a random ``hard_negatives`` share of its negative slots refilled by recorded loss
        (logged, so the training log shows that mining took effect)."""
        negative_slots = np.flatnonzero(self.labels[order] <= 0)
        n_hard = int(round(self.hard_negatives * len(negative_slots)))
        picks = hard_negative_picks(self.item_loss, np.flatnonzero(self.labels <= 0), n_hard, rng)
        if len(picks) == 0:
            return order
        recorded = self.item_loss[self.labels <= 0]
        recorded = recorded[np.isfinite(recorded)]
        picked = self.item_loss[picks]
        logger.info("E%d hard negatives: %d of %d negative slots drawn by recorded loss (their mean %.3f, %d "
                    "recorded; all %d recorded negatives %.3f)", epoch, len(picks), len(negative_slots),
                    np.nanmean(picked) if np.isfinite(picked).any() else math.nan, int(np.isfinite(picked).sum()),
                    len(recorded), recorded.mean())
        slots = np.sort(rng.choice(negative_slots, size=len(picks), replace=False))
        order = order.copy()
        order[slots] = picks[rng.permutation(len(picks))]
        return order

    def record(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Remember each trained item's loss (the last one when an item was trained on more than once)."""
        indices = np.asarray(indices, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float64)
        if len(indices) != len(losses):
            raise DataError(f"{len(indices)} indices but {len(losses)} losses")
        last = len(indices) - 1 - np.unique(indices[::-1], return_index=True)[1]  # last occurrence of each
        self.item_loss[indices[last]] = losses[last]

    def __iter__(self) -> Iterator[int]:
        n = len(self)
        return iter(self.epoch_indices()[self.rank * n:(self.rank + 1) * n].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "ratio": self.ratio,
                "schedule": [list(p) for p in self.schedule], "samples_per_epoch": self.samples_per_epoch,
                "hard_negatives": self.hard_negatives, "item_loss": torch.from_numpy(self.item_loss.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        if "item_loss" in state:
            item_loss = torch.as_tensor(state["item_loss"], dtype=torch.float64).numpy()
            if len(item_loss) != len(self.labels):
                raise DataError(f"sampler state has {len(item_loss)} item losses for {len(self.labels)} items")
            self.item_loss = item_loss.copy()


class ResidentBatches:
    """The crops of a dataset loaded once into one int16 tensor on the training device; the batches of
    ``sampler``'s order are gathered there (no loader process, HDF5 read or host-to-device copy per batch).

    Iterating gives what a DataLoader over the same sampler gives, ``(crops int16 (B, 1, I, R, C), labels,
    indices)``, batch for batch, so the two paths train on identical batches (tests/test_data.py)."""

    def __init__(self, dataset: CropDataset, sampler: Sampler[int], batch_size: int, device: torch.device | str,
                 chunk: int = 1024) -> None:
        self.sampler, self.batch_size, self.device = sampler, int(batch_size), torch.device(device)
        self.crops = self.load(dataset, self.device, chunk)
        self.labels = torch.from_numpy(dataset.labels).to(self.device)

    @staticmethod
    def load(dataset: CropDataset, device: torch.device | str, chunk: int = 1024) -> torch.Tensor:
        """Every crop of ``dataset`` as one int16 (n, 1, I, R, C) tensor on ``device``, read ``chunk`` at a time."""
        n = len(dataset)
        crops = torch.empty((n, 1, *dataset.crop_shape), dtype=torch.int16, device=device)
        for lo in range(0, n, chunk):  # bounded host memory while loading
            hi = min(lo + chunk, n)
            crops[lo:hi, 0] = torch.from_numpy(dataset.crops_int16(np.arange(lo, hi))).to(device)
        return crops

    @staticmethod
    def n_bytes(dataset: CropDataset) -> int:
        """Bytes the resident crops take (int16)."""
        return len(dataset) * int(np.prod(dataset.crop_shape)) * 2

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        order_on_device = order.to(self.device)  # one copy an epoch: a copy a batch made CUDA wait each step
        for lo in range(0, len(order), self.batch_size):
            index, on_device = order[lo:lo + self.batch_size], order_on_device[lo:lo + self.batch_size]
            yield self.crops.index_select(0, on_device), self.labels.index_select(0, on_device), index


def _ignore_sigterm(worker_id: int) -> None:
    """Loader worker init: SIGTERM to the process group (SLURM's time limit, ``scancel``, ``kill -TERM -PGID``) is
    the main process's to act on (luna.app.sigterm_unwinds). A worker ended by it first made torch raise "DataLoader
    worker (pid N) is killed by signal: Terminated" in the main process, in the middle of its clean-up: a traceback,
    exit status 1, temp files left. The worker still ends with the loader's shutdown or the main process.

    A worker hands its batches' shared memory to the main process as file descriptors, through a background
    thread (multiprocessing's resource sharer) that prints any error with ``sys.excepthook``: when the main
    process ends mid-handover (SIGTERM, Ctrl-C) the broken connection printed a traceback after the run's one-line
    message. A connection error there is the main process going away, and is not printed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = _quiet_connection_errors


def _quiet_connection_errors(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """A loader worker's ``sys.excepthook``: broken connections, pipes and descriptors (OSError, EOFError: the main
    process gone) silent, every other error printed as Python does. Errors of the worker's own work (reading a
    crop) do not come here: torch's worker loop sends them to the main process, which raises them."""
    if issubclass(kind, (OSError, EOFError)):
        return
    sys.__excepthook__(kind, value, tb)


def make_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``sampler``'s order; workers persist across epochs and open HDF5 lazily."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=False,
        worker_init_fn=_ignore_sigterm if num_workers > 0 else None,
    )


# ----------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    """Chapter 12's augmentation; each part off with False / 0."""

    flip: bool = True
    offset: float = 0.1     # normalised grid units (the crop spans -1..1), per axis
    scale: float = 0.2      # factor 1 +- scale, per axis
    rotate: bool = True     # random angle in [0, 2 pi) about the slice (index) axis
    noise_hu: float = 25.0  # std of added Gaussian noise, HU

    @property
    def geometric(self) -> bool:
        return bool(self.flip or self.offset or self.scale or self.rotate)

    @property
    def enabled(self) -> bool:
        return self.geometric or bool(self.noise_hu)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flips_only(self) -> AugmentConfig:
        """These settings with only the flips kept: crops as they are predicted, mirrored (voxel centres map onto
        voxel centres, so the resampling only mirrors: values equal to fp32 rounding), without the offset, scale,
        rotation and noise."""
        return replace(self, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)


NO_AUGMENTATION = AugmentConfig(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)


def random_affine(
    n: int, config: AugmentConfig, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n, 3, 4) affine matrices for ``affine_grid``, as the book builds one per sample: per grid axis
    (x = column, y = row, z = index) a flip, a scale ``1 + scale * u`` and an offset ``offset * u``
    (``u`` uniform in [-1, 1)), then a rotation in the x-y plane (about the slice axis)."""
    kw = {"generator": generator, "device": device, "dtype": torch.float32}
    transform = torch.eye(4, device=device, dtype=torch.float32).repeat(n, 1, 1)
    diagonal = torch.ones(n, 3, device=device, dtype=torch.float32)
    if config.flip:
        diagonal = torch.where(torch.rand(n, 3, **kw) > 0.5, -diagonal, diagonal)
    if config.offset:
        transform[:, :3, 3] = config.offset * (torch.rand(n, 3, **kw) * 2 - 1)
    if config.scale:
        diagonal = diagonal * (1.0 + config.scale * (torch.rand(n, 3, **kw) * 2 - 1))
    transform[:, [0, 1, 2], [0, 1, 2]] = diagonal
    if config.rotate:
        angle = torch.rand(n, **kw) * (2 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.eye(4, device=device, dtype=torch.float32).repeat(n, 1, 1)
        rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin
        rotation[:, 1, 0], rotation[:, 1, 1] = sin, cos
        transform = transform @ rotation
    return transform[:, :3]


def augment_batch(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch (N, C, I, R, C) on its own device: one random affine per sample, resampled
    (trilinear, border padding, as the book), then noise. ``generator`` must live on the batch's device."""
    if not config.enabled or batch.shape[0] == 0:
        return batch
    batch = batch.float()
    if config.geometric:
        theta = random_affine(batch.shape[0], config, generator, batch.device)
        # affine_grid + trilinear grid_sample (border padding, as the book); on the CPU as 2-D resampling of the
        # slices plus interpolation in depth, equal to fp32 rounding and ~4x faster (luna.cpu_speed)
        batch = resample_affine(batch, theta)
    if config.noise_hu:
        noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
        batch = batch + noise * config.noise_hu
    return batch
