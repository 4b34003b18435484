"""The selection set's evaluation during training: every selection crop through luna.inference.predict (float32,
the path luna-predict takes, so the selection rows and a later luna-predict agree to 1e-5), the operating
threshold ``--threshold`` picks on it, the metric rows, and what ``--keep`` ranks epochs by. The selection set is
drawn from the non-test folds and never trained on (docs/design.md)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from luna.data import CropDataset
from luna.device import DistInfo
from luna.inference import predict
from luna.metrics import choose_threshold, metric_row

logger = logging.getLogger("luna.training")  # one stage, one logger name in the log

SELECTION_PREDICTION_COLUMNS = ["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z", "is_nodule",
                                "diameter_mm", "probability", "loss", "fold"]
"""selection_predictions.tsv's columns, predictions.tsv's (``fold``: the test fold of the run)."""


class DivergedError(ValueError):
    """The model's outputs are NaN: the training diverged (one line naming the epoch and what to change)."""


def check_finite(epoch: int, what: str, probability: np.ndarray) -> None:
    """DivergedError when an epoch's probabilities are not all finite: the run stops with one line instead of a
    NaN model kept or a threshold that cannot be chosen (a resume would repeat the same epoch)."""
    bad = int(np.count_nonzero(~np.isfinite(probability)))
    if bad:
        raise DivergedError(f"epoch {epoch}: {bad} of the {len(probability)} {what} probabilities are NaN: the "
                            "training diverged; lower --lr, clip the gradients (--clip-grad-norm) or warm up "
                            "longer (--lr-warmup-steps): a --resume with these settings repeats the epoch")


@dataclass
class SelectionPass:
    """One evaluation of the selection set: per-sample values, the chosen threshold and the metric rows."""

    labels: np.ndarray
    probability: np.ndarray
    loss: np.ndarray
    threshold: float
    row: dict[str, Any]            # history row, threshold 0.5
    operating_row: dict[str, Any]  # the same at the chosen threshold


def evaluate_selection(model: torch.nn.Module, dataset: CropDataset, dist_info: DistInfo, *, epoch: int,
                       device: torch.device, batch_size: int, channels_last: bool, tta: str, threshold_policy: str,
                       resident: torch.Tensor | None = None) -> SelectionPass:
    """Every crop of ``dataset`` through ``model``; under DDP each process takes every world_size-th row with
    rank 0's batch-norm statistics (the saved ones) and the results are gathered on every process.
    ``resident``: the dataset's crops already on ``device`` (luna.data.ResidentBatches.load)."""
    if dist_info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    rows = dataset.rows
    share = np.arange(dist_info.rank, len(rows), dist_info.world_size)
    logger.info("E%d Selection: %d crops of %d scans", epoch, len(rows), rows["series_uid"].nunique())
    if resident is not None and dist_info.enabled:  # its share of the crops; one process uses them as they are
        resident = resident.index_select(0, torch.as_tensor(share, device=device))
    prediction = predict(model, dataset.stores, rows.iloc[share], dataset.labels[share], batch_size=batch_size,
                         device=device, channels_last=channels_last, what="selection crops", resident=resident,
                         tta=tta)
    probability = np.empty(len(rows), dtype=np.float32)
    loss = np.empty(len(rows), dtype=np.float32)
    if dist_info.enabled:
        parts: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(parts, (share, prediction.probability, prediction.loss))
    else:
        parts = [(share, prediction.probability, prediction.loss)]
    for where, p, l in parts:
        probability[where], loss[where] = p, l
    labels = dataset.labels
    # metrics from the values as selection_predictions.tsv holds them (float32 -> shortest decimal)
    p64, l64 = probability.astype(np.float64), loss.astype(np.float64)
    check_finite(epoch, "selection", p64)
    threshold = choose_threshold(labels, p64, threshold_policy, n_scans=int(rows["series_uid"].nunique()))
    row = metric_row(labels, p64, l64, epoch=epoch, split="selection")
    operating = metric_row(labels, p64, l64, epoch=epoch, split="selection", threshold=threshold)
    return SelectionPass(labels, probability, loss, threshold, row, operating)


def selection_frame(dataset: CropDataset, selection: SelectionPass, test_fold: int) -> pd.DataFrame:
    """selection_predictions.tsv's rows: the selection crops in store order with their values and the fold."""
    frame = dataset.rows[SELECTION_PREDICTION_COLUMNS[:7]].copy()
    frame["is_nodule"] = selection.labels
    frame["probability"] = selection.probability
    frame["loss"] = selection.loss
    frame["fold"] = int(test_fold)
    return frame


def selection_key(keep: str, epoch: int, row: dict[str, Any]) -> float:
    """What ``--keep`` maximises over the evaluated epochs: F1 at the operating threshold, AUC, or the epoch
    (last). An undefined value (NaN) ranks below every defined one."""
    value = float(epoch) if keep == "last" else float(row[keep])
    return -1.0 if math.isnan(value) else value
