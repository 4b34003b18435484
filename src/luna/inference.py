"""Running a trained model over crop-store rows: the one evaluation path of the pipeline.

The per-epoch selection pass of ``luna-train`` and ``luna-predict`` both call :func:`predict`, so the same
model on the same scans gives the same probabilities in both (docs/design.md, "Precision policy"):

* float32 always, no autocast, on every device: bf16 moved probabilities by up to 0.12 (benchmarks/results/
  validate.md) and bought only 1.10x for inference on the CPU and 1.10x for training on an H100
  (benchmarks/results/gpu_check_h100.txt), so evaluation never trades exactness for it;
* the memory format the model was trained with (channels_last_3d by default; fp32 channels_last and
  contiguous differ by up to ~1e-5);
* model.eval(), ``torch.inference_mode``, crops converted as in training (int16 HU -> float32 HU, no rescaling);
* probabilities ``softmax(logits)[:, 1]`` and per-sample cross-entropy computed from float32 logits;
* optional test-time augmentation (``tta``): the probabilities of the crop and its mirror images averaged,
  the loss ``-log`` of the averaged probability of the true class; recorded in model.pt, so the selection
  pass and luna-predict average the same views.

HDF5 batches are read by one background thread while the model runs on the previous one.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from luna.device import strict_fp32
from luna.progress import format_eta
from luna.store import CropStore, read_crops

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 10.0
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip2": ((), (3, 4)),                                                    # rotated 180 degrees in-plane
    "flip2z": ((), (2, 3, 4)),                                                # point mirror: also mirrored in depth
    "flip4": ((), (3,), (4,), (3, 4)),                                        # mirror rows and/or columns
    "flip4z": ((), (3, 4), (2,), (2, 3, 4)),                                  # flip2, also mirrored in depth
    "flip8": ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)),       # and slices
}
"""Test-time augmentation: the tensor dims mirrored for each view of a (N, 1, I, R, C) batch."""


def tta_probabilities(model: torch.nn.Module, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """(N, 2) class probabilities, float32: ``softmax(model(batch))`` averaged over the views of ``tta``."""
    views = TTA_FLIPS[tta]
    total = None
    for dims in views:
        logits = model(torch.flip(batch, dims) if dims else batch)[0].float()
        p = torch.softmax(logits, dim=1)
        total = p if total is None else total + p
    return total / len(views)


def crops_to_tensor(crops: np.ndarray) -> torch.Tensor:
    """int16 crops (n, I, R, C) -> float32 (n, 1, I, R, C) in HU, what the model is fed in training and
    evaluation alike: no rescaling, the model's tail BatchNorm normalises."""
    return torch.from_numpy(np.asarray(crops).astype(np.float32)).unsqueeze(1)


@dataclass
class Prediction:
    """Per-row model output: probability of class 1 and, with labels, the cross-entropy loss (float32)."""

    probability: np.ndarray
    loss: np.ndarray | None
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.probability) / self.seconds if self.seconds > 0 else math.nan


def read_batch(stores: Sequence[CropStore], store_of: np.ndarray, row_of: np.ndarray, pin: bool = False) -> torch.Tensor:
    """One batch's crops as a float32 tensor (:func:`luna.store.read_crops`), pinned for a CUDA copy."""
    tensor = crops_to_tensor(read_crops(stores, store_of, row_of))
    return tensor.pin_memory() if pin else tensor


def predict(
    model: torch.nn.Module,
    stores: Sequence[CropStore],
    rows: pd.DataFrame,
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
    what: str = "candidates",
    resident: torch.Tensor | None = None,
    tta: str = "none",
) -> Prediction:
    """Probabilities (and losses, with ``labels``) of ``rows`` (columns store, row), in order, in float32.

    The model is put in eval mode and in the given memory format on ``device``. ``resident``: the rows' crops
    already on the device (int16 (n, 1, I, R, C), in ``rows`` order; the training stage keeps its selection
    crops so), else they are read from the stores. ``tta``: a key of :data:`TTA_FLIPS`. Progress with rate and
    ETA is logged every :data:`PROGRESS_INTERVAL_S` seconds and at the end.
    """
    device = torch.device(device)
    strict_fp32(device)  # float32 on CUDA is TF32 in cuDNN's convolutions unless said otherwise
    model.eval()
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    n = len(rows)
    store_of = rows["store"].to_numpy(dtype=np.int64)
    row_of = rows["row"].to_numpy(dtype=np.int64)
    probability = np.empty(n, dtype=np.float32)
    loss = np.empty(n, dtype=np.float32) if labels is not None else None
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    starts = list(range(0, n, batch_size))
    pin = device.type == "cuda"
    t0 = last_log = time.perf_counter()

    def submit(pool: ThreadPoolExecutor, k: int) -> Future:
        lo, hi = starts[k], min(starts[k] + batch_size, n)
        return pool.submit(read_batch, stores, store_of[lo:hi], row_of[lo:hi], pin)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-read") as pool, torch.inference_mode():
        pending = submit(pool, 0) if starts and resident is None else None
        for k, lo in enumerate(starts):
            hi = min(lo + batch_size, n)
            if resident is not None:
                batch = resident[lo:hi].float()
            else:
                batch = pending.result()  # type: ignore[union-attr]
                pending = submit(pool, k + 1) if k + 1 < len(starts) else None
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            if tta == "none":
                logits = model(batch)[0].float()
                p = torch.softmax(logits, dim=1)
                per_sample_loss = lambda target: F.cross_entropy(logits, target, reduction="none")  # noqa: E731
            else:
                p = tta_probabilities(model, batch, tta)
                per_sample_loss = lambda target: -torch.log(  # noqa: E731
                    p.gather(1, target[:, None])[:, 0].clamp_min(torch.finfo(p.dtype).tiny))
            probability[lo:hi] = p[:, 1].cpu().numpy()
            if labels_t is not None and loss is not None:
                target = labels_t[lo:hi].to(device, non_blocking=True)
                loss[lo:hi] = per_sample_loss(target).cpu().numpy()
            now = time.perf_counter()
            if now - last_log >= PROGRESS_INTERVAL_S or hi == n:
                rate = hi / max(now - t0, 1e-9)
                logger.info("predicted %d/%d %s (%.1f%%), %.1f/s, ETA %s", hi, n, what, 100.0 * hi / n, rate,
                            format_eta((n - hi) / max(rate, 1e-9)))
                last_log = now
    return Prediction(probability, loss, time.perf_counter() - t0)


def rows_of_scans(stores: Sequence[CropStore], series_uids: Sequence[str] | None) -> pd.DataFrame:
    """The store rows of the given scans (all rows when None): stores in the order given, rows in store order.

    Columns: store, row, then the store table's (candidate_id, series_uid, coord_x/y/z, is_nodule,
    diameter_mm)."""
    wanted = None if series_uids is None else set(series_uids)
    parts = []
    for position, store in enumerate(stores):
        table = store.table
        keep = np.ones(len(table), dtype=bool) if wanted is None else table["series_uid"].isin(wanted).to_numpy()
        part = table.loc[keep].copy()
        part.insert(0, "row", np.flatnonzero(keep).astype(np.int64))
        part.insert(0, "store", position)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["store", "row", "candidate_id", "series_uid", "coord_x", "coord_y", "coord_z",
                                     "is_nodule", "diameter_mm"])
    return pd.concat(parts, ignore_index=True)
