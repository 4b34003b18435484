"""The validation stage: predict every candidate of the val scans, then metrics, FROC/CPM, plots, submission.

``luna-validate --model model.pt --crops results/crops/*.h5 --splits splits.tsv --annotations annotations.csv
--out results/validation`` writes into ``--out`` (each file atomically, DESIGN.md has the contracts):

* ``predictions.tsv`` — one row per cropped candidate of the val scans, in store order (stores in the order
  given): candidate_id, series_uid, coord_x, coord_y, coord_z, is_nodule, diameter_mm, probability, loss;
* ``metrics.tsv`` — one row: the history.tsv columns for split ``val`` at model.pt's epoch, then CPM and the
  seven LUNA16 sensitivities (``NaN`` where undefined);
* ``froc.tsv`` — the FROC curve (threshold, fp_per_scan, sensitivity), every val scan in the FP divisor;
* ``submission.csv`` — LUNA16's ``seriesuid,coordX,coordY,coordZ,probability``;
* ``roc.png``, ``pr.png``, ``froc.png``, ``training_curves.png`` (with ``--history``) and, with
  ``--bootstrap N``, ``metrics_ci.tsv`` (bootstrap confidence intervals of CPM and the sensitivities).

It works on any LunaModel checkpoint, any crop stores and any candidate set. Three modes follow from the
inputs: labelled candidates (``is_nodule`` 0/1 in the stores) give the classification metrics, ROC and PR;
``--annotations`` gives FROC/CPM; with neither (a candidate list without a class column and no
annotations) only predictions and the submission are written (predict-only), and the log says why.

Inference: model.eval() under ``torch.inference_mode``, no balancing, no augmentation, the crops converted
exactly as the training Dataset does (int16 HU -> float32 HU, shape (N, 1, 32, 48, 48)); batches are read
from HDF5 in a background thread while the model runs on the previous one. On CUDA the model and batches
are channels_last_3d and run under bf16 autocast (as training does); on the CPU the defaults follow
benchmarks/results/validate.md. Probabilities and losses are computed from the logits in float32.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from luna.candidates import TableError, read_annotations_csv
from luna.splits import SplitsError, read_splits_tsv
from luna.data import crops_to_tensor
from luna.device import DeviceError, resolve_device, use_bf16
from luna.metrics import (
    FROC_RATES,
    HISTORY_COLUMNS,
    METRICS_COLUMNS,
    SENSITIVITY_COLUMNS,
    FrocResult,
    MetricsError,
    combine_metrics,
    froc,
    froc_bootstrap,
    metric_row,
    pr_curve,
    roc_curve,
)
from luna.model import CheckpointError, load_model
from luna.store import CropStore, StoreError
from luna.tables import numeric_column, read_tsv

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z", "is_nodule", "diameter_mm",
                      "probability", "loss"]
SUBMISSION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
FROC_COLUMNS = ["threshold", "fp_per_scan", "sensitivity"]
CI_COLUMNS = ["metric", "value", "ci_low", "ci_high", "confidence", "n_bootstrap", "seed"]
HISTORY_REQUIRED = ["epoch", "split", "loss_all", "precision", "recall", "f1"]

OUTPUT_NAMES = ("predictions.tsv", "metrics.tsv", "froc.tsv", "submission.csv", "metrics_ci.tsv",
                "roc.png", "pr.png", "froc.png", "training_curves.png")
"""Every file the app may write; one that a run does not write is removed, so no stale result survives."""

CPU_CHANNELS_LAST = True
"""channels_last_3d on the CPU: faster and equal to 1e-6 (benchmarks/results/validate.md)."""
CPU_AMP_AUTO = False
"""bf16 autocast on the CPU under ``--amp auto``: off, see benchmarks/results/validate.md."""
PROGRESS_INTERVAL_S = 10.0
CONFIDENCE = 0.95


class ValidationError(ValueError):
    """Input the validation stage cannot use; the one-line message names the file, row or value."""


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

def open_stores(paths: Sequence[str | os.PathLike]) -> list[CropStore]:
    """Open the crop stores (StoreError names an unreadable one); the same file twice is an error."""
    seen: dict[Path, str] = {}
    stores = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise ValidationError(f"{path}: crop store given twice (also as {seen[resolved]})")
        seen[resolved] = str(path)
        stores.append(CropStore(path))
    shapes = {store.crop_shape for store in stores}
    if len(shapes) > 1:
        raise ValidationError(f"{stores[-1].path}: crop shape {stores[-1].crop_shape} differs from "
                              f"{stores[0].path}'s {stores[0].crop_shape}")
    return stores


def read_splits(path: str | os.PathLike) -> pd.DataFrame:
    """splits.tsv (series_uid, split), checked by luna.splits; errors as ValidationError."""
    try:
        return read_splits_tsv(path)
    except SplitsError as exc:
        raise ValidationError(str(exc)) from exc


def val_scans_of(splits: pd.DataFrame, path: str | os.PathLike) -> list[str]:
    """The val scans of splits.tsv (``split == val``), in file order; none is an error."""
    uids = splits.loc[splits["split"] == "val", "series_uid"].tolist()
    if not uids:
        raise ValidationError(f"{path}: no scan with split val; FROC and the metrics need val scans")
    return list(dict.fromkeys(uids))


def select_candidates(stores: Sequence[CropStore], val_scans: Sequence[str] | None) -> pd.DataFrame:
    """The rows to predict: every row of the val scans (all rows when ``val_scans`` is None), stores in the
    order given, rows in store order. Columns: store, row, then the store table's columns."""
    wanted = None if val_scans is None else set(val_scans)
    parts = []
    for position, store in enumerate(stores):
        table = store.table
        keep = np.ones(len(table), dtype=bool) if wanted is None else table["series_uid"].isin(wanted).to_numpy()
        part = table.loc[keep].copy()
        part.insert(0, "row", np.flatnonzero(keep).astype(np.int64))
        part.insert(0, "store", position)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["store", "row", *PREDICTION_COLUMNS[:7]])
    rows = pd.concat(parts, ignore_index=True)
    duplicated = rows.duplicated(["series_uid", "candidate_id"])
    if duplicated.any():
        first = rows.loc[duplicated].iloc[0]
        logger.warning("%d candidates appear in more than one store (first: candidate_id %d of %s); each row is "
                       "predicted", int(duplicated.sum()), int(first["candidate_id"]), first["series_uid"])
    return rows


def labels_of(rows: pd.DataFrame, stores: Sequence[CropStore]) -> np.ndarray | None:
    """int64 labels (1 = nodule) when every selected row has a class, None when none has (predict-only
    candidate list); a mix is an error naming the first unlabelled row."""
    is_nodule = rows["is_nodule"].to_numpy(dtype=np.int64)
    unlabelled = is_nodule < 0
    if unlabelled.all() and len(rows):
        return None
    if unlabelled.any():
        first = rows.iloc[int(np.flatnonzero(unlabelled)[0])]
        raise ValidationError(
            f"{stores[int(first['store'])].path}: row {int(first['row'])} (candidate_id {int(first['candidate_id'])}) "
            "has no class label (is_nodule -1) while other candidates have one; use one candidate list")
    return (is_nodule > 0).astype(np.int64)


def read_annotations(path: str | os.PathLike | None, excluded: bool = False) -> pd.DataFrame | None:
    """A LUNA16 annotations(_excluded).csv, checked (TableError names file and line); None without a path."""
    if path is None:
        return None
    return read_annotations_csv(path, allow_negative=excluded)


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """history.tsv for the training-curves plot (columns checked)."""
    history = read_tsv(path, what="history file", error=ValidationError, required=HISTORY_REQUIRED)
    for column in HISTORY_REQUIRED:
        if column != "split":
            history[column] = numeric_column(history, column, path, ValidationError, allow_missing=True)
    return history


# ----------------------------------------------------------------------------------------------------
# device and inference
# ----------------------------------------------------------------------------------------------------

def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (luna.device's policy; on the CPU per :data:`CPU_AMP_AUTO`): bf16 or None."""
    return torch.bfloat16 if use_bf16(mode, device, cpu_auto=CPU_AMP_AUTO) else None


def use_channels_last(device: torch.device, mode: str = "auto") -> bool:
    """channels_last_3d: always on CUDA (as training), on the CPU per :data:`CPU_CHANNELS_LAST`."""
    if mode != "auto":
        return mode == "on"
    return device.type == "cuda" or CPU_CHANNELS_LAST


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Prediction:
    """Per-row model output: probability of class 1 and, with labels, the cross-entropy loss (float32)."""

    probability: np.ndarray
    loss: np.ndarray | None
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.probability) / self.seconds if self.seconds > 0 else math.nan


def _read_batch(stores: Sequence[CropStore], store_of: np.ndarray, row_of: np.ndarray, pin: bool) -> torch.Tensor:
    """One batch's crops as a float32 tensor, one HDF5 read per store (runs in the reader thread)."""
    crop_shape = stores[0].crop_shape
    out = np.empty((len(store_of), *crop_shape), dtype=np.int16)
    for position in np.unique(store_of):
        where = np.flatnonzero(store_of == position)
        out[where] = stores[int(position)].crops(row_of[where])
    tensor = crops_to_tensor(out)
    return tensor.pin_memory() if pin else tensor


def predict(
    model: torch.nn.Module,
    stores: Sequence[CropStore],
    rows: pd.DataFrame,
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Prediction:
    """Probabilities (and losses, with ``labels``) of ``rows`` (columns store, row), in order.

    Batches are read from HDF5 by one background thread while the model runs on the previous batch. The
    model is put in eval mode; probabilities are ``softmax(logits)[:, 1]`` and losses the per-sample
    cross-entropy, both computed from the logits in float32.
    """
    device = torch.device(device)
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
        return pool.submit(_read_batch, stores, store_of[lo:hi], row_of[lo:hi], pin)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="validate-read") as pool, torch.inference_mode():
        pending = submit(pool, 0) if starts else None
        for k, lo in enumerate(starts):
            hi = min(lo + batch_size, n)
            batch = pending.result()  # type: ignore[union-attr]
            pending = submit(pool, k + 1) if k + 1 < len(starts) else None
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits, _ = model(batch)
            logits = logits.float()
            probability[lo:hi] = torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
            if labels_t is not None and loss is not None:
                target = labels_t[lo:hi].to(device, non_blocking=True)
                loss[lo:hi] = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
            now = time.perf_counter()
            if now - last_log >= PROGRESS_INTERVAL_S or hi == n:
                rate = hi / max(now - t0, 1e-9)
                logger.info("predicted %d/%d candidates (%.1f%%), %.1f candidates/s, ETA %s",
                            hi, n, 100.0 * hi / n, rate, _format_eta((n - hi) / max(rate, 1e-9)))
                last_log = now
    return Prediction(probability, loss, time.perf_counter() - t0)


def check_model_input(model: torch.nn.Module, crop_shape: Sequence[int], device: torch.device, model_path: str) -> None:
    """One forward pass on a blank crop: a model that cannot take the stores' crop shape fails here, with
    a one-line message, not deep inside the loop."""
    blank = torch.full((1, 1, *crop_shape), -1000.0, device=device)
    try:
        with torch.inference_mode():
            logits, _ = model(blank)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ValidationError(f"{model_path}: model does not accept crops of shape {tuple(crop_shape)} "
                              f"({first_line})") from exc
    if logits.shape != (1, 2):
        raise ValidationError(f"{model_path}: model gives logits of shape {tuple(logits.shape)}, expected (1, 2)")


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------

def as_written(values: np.ndarray) -> np.ndarray:
    """float32 values as float64 parsed from their shortest decimal form, i.e. as predictions.tsv holds
    them, so metrics computed here equal metrics recomputed from the file."""
    values = np.asarray(values, dtype=np.float32)
    return np.array([float(v) for v in values.astype(str)], dtype=np.float64) if values.size else np.zeros(0)


def predictions_frame(rows: pd.DataFrame, prediction: Prediction, labelled: bool) -> pd.DataFrame:
    """predictions.tsv rows; is_nodule and loss are empty strings when the candidates have no class."""
    frame = pd.DataFrame({
        "candidate_id": rows["candidate_id"].to_numpy(dtype=np.int64),
        "series_uid": rows["series_uid"].astype(str).to_numpy(),
        "coord_x": rows["coord_x"].to_numpy(dtype=np.float64),
        "coord_y": rows["coord_y"].to_numpy(dtype=np.float64),
        "coord_z": rows["coord_z"].to_numpy(dtype=np.float64),
        "is_nodule": (rows["is_nodule"].to_numpy(dtype=np.int64) if labelled else np.full(len(rows), "", object)),
        "diameter_mm": rows["diameter_mm"].to_numpy(dtype=np.float32),
        "probability": np.asarray(prediction.probability, dtype=np.float32),
        "loss": (np.asarray(prediction.loss, dtype=np.float32) if labelled and prediction.loss is not None
                 else np.full(len(rows), "", object)),
    })
    return frame[PREDICTION_COLUMNS]


def submission_frame(predictions: pd.DataFrame) -> pd.DataFrame:
    """LUNA16's submission table (seriesuid, coordX, coordY, coordZ, probability) from predictions."""
    return pd.DataFrame({
        "seriesuid": predictions["series_uid"].to_numpy(),
        "coordX": predictions["coord_x"].to_numpy(),
        "coordY": predictions["coord_y"].to_numpy(),
        "coordZ": predictions["coord_z"].to_numpy(),
        "probability": predictions["probability"].to_numpy(),
    })[SUBMISSION_COLUMNS]


def unlabelled_metric_row(n: int, epoch: int) -> dict[str, object]:
    """The metric row of candidates without classes: only epoch, split and n are known."""
    row: dict[str, object] = {column: math.nan for column in HISTORY_COLUMNS}
    row.update({"epoch": int(epoch), "split": "val", "n": int(n)})
    return row


def ci_frame(point: dict[str, object], intervals: dict[str, tuple[float, float]], n_bootstrap: int,
             seed: int) -> pd.DataFrame:
    """metrics_ci.tsv: one row per FROC metric (cpm, sens_at_*), with its value and bootstrap interval."""
    names = ["cpm", *SENSITIVITY_COLUMNS]
    return pd.DataFrame({
        "metric": names,
        "value": [float(point[name]) for name in names],  # type: ignore[arg-type]
        "ci_low": [intervals[name][0] for name in names],
        "ci_high": [intervals[name][1] for name in names],
        "confidence": CONFIDENCE,
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
    })[CI_COLUMNS]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_table(frame: pd.DataFrame, path: str | os.PathLike, sep: str = "\t") -> Path:
    """Write atomically (temp + rename); NaN as ``NaN``, floats in their shortest exact form."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        frame.to_csv(tmp, sep=sep, index=False, na_rep="NaN", lineterminator="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend state)
# ----------------------------------------------------------------------------------------------------

def _figure(width_in: float = 6.0, height_in: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        figure.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"})


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, row: dict[str, object], path: str | os.PathLike) -> Path:
    """ROC curve with the AUC and the operating point at threshold 0.5."""
    figure = _figure()
    ax = figure.add_subplot()
    n_pos, n_neg = int(row["n_pos"]), int(row["n_neg"])  # type: ignore[arg-type]
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    if n_pos and n_neg:
        fpr, tpr, _ = roc_curve(labels, probabilities)
        ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"ROC, AUC {float(row['auc']):.4f}")  # type: ignore[arg-type]
        ax.plot([1.0 - float(row["correct_neg"]) / 100.0], [float(row["recall"])], "o", color="C3",  # type: ignore[arg-type]
                label="threshold 0.5")
    else:
        _note(ax, f"ROC undefined: {n_pos} positive, {n_neg} negative candidates")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="false positive rate", ylabel="true positive rate (recall)",
           title=f"ROC, val (epoch {row['epoch']}, {n_pos} positive / {n_neg} negative)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(figure, path)


def plot_pr(labels: np.ndarray, probabilities: np.ndarray, row: dict[str, object], path: str | os.PathLike) -> Path:
    """Precision-recall curve with the prevalence baseline and the operating point at threshold 0.5."""
    figure = _figure()
    ax = figure.add_subplot()
    n_pos, n_neg = int(row["n_pos"]), int(row["n_neg"])  # type: ignore[arg-type]
    if n_pos:
        precision, recall, _ = pr_curve(labels, probabilities)
        ax.plot(np.r_[0.0, recall], np.r_[precision[0] if precision.size else 1.0, precision], color="C0",
                linewidth=2, label="precision-recall")
        ax.axhline(n_pos / (n_pos + n_neg), linestyle="--", color="0.6", linewidth=1,
                   label=f"prevalence {n_pos / (n_pos + n_neg):.4f}")
        if not math.isnan(float(row["precision"])):  # type: ignore[arg-type]
            ax.plot([float(row["recall"])], [float(row["precision"])], "o", color="C3",  # type: ignore[arg-type]
                    label=f"threshold 0.5, F1 {float(row['f1']):.4f}")  # type: ignore[arg-type]
        ax.legend(loc="lower left")
    else:
        _note(ax, "precision-recall undefined: no positive candidates")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall, val (epoch {row['epoch']})")
    ax.grid(True, alpha=0.3)
    return save_figure(figure, path)


def plot_froc(result: FrocResult, path: str | os.PathLike) -> Path:
    """The FROC curve on a log FP-per-scan axis (1/8 ... 8) with the seven LUNA16 operating points."""
    figure = _figure(6.5, 5.0)
    ax = figure.add_subplot()
    curve = result.curve
    # the (0, 0) start cannot sit on a log axis; the first real point is drawn from the axis' left edge
    fp = curve["fp_per_scan"].to_numpy()
    sensitivity = curve["sensitivity"].to_numpy()
    shown = fp > 0
    left = FROC_RATES[0] / 2
    x = np.r_[left, fp[shown]] if shown.any() else np.array([left, FROC_RATES[-1] * 2])
    y = np.r_[np.interp(left, fp, sensitivity), sensitivity[shown]] if shown.any() else np.full(2, sensitivity[-1])
    ax.plot(x, y, color="C0", linewidth=2, label="FROC")
    if shown.any() and fp[-1] < FROC_RATES[-1]:  # LUNA16 reads past the curve's end as its last value
        ax.plot([fp[-1], FROC_RATES[-1] * 1.1], [sensitivity[-1]] * 2, ":", color="C0", linewidth=1.5,
                label="past the last candidate (last value)")
    values = [result.sensitivities[name] for name in SENSITIVITY_COLUMNS]
    ax.plot(FROC_RATES, values, "o", color="C3", label="LUNA16 operating points")
    for rate, value in zip(FROC_RATES, values):
        if not math.isnan(value):
            ax.annotate(f"{value:.3f}", (rate, value), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(FROC_RATES, labels=["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.minorticks_off()
    ax.set(xlim=(FROC_RATES[0] * 0.9, FROC_RATES[-1] * 1.1), ylim=(0, 1.05),
           xlabel="average false positives per scan", ylabel="sensitivity",
           title=f"FROC, CPM {result.cpm:.4f} ({result.n_hit} of {result.n_nodules} nodules hit, "
                 f"{result.n_scans} val scans)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(figure, path)


def plot_training_curves(history: pd.DataFrame, path: str | os.PathLike, chosen_epoch: int | None = None) -> Path:
    """Loss, and precision / recall / F1 at threshold 0.5, per epoch, train dashed and val solid."""
    figure = _figure(11.0, 4.5)
    ax_loss, ax_scores = figure.subplots(1, 2)
    styles = {"train": "--", "val": "-"}
    for split, style in styles.items():
        part = history.loc[history["split"] == split].sort_values("epoch")
        if part.empty:
            continue
        ax_loss.plot(part["epoch"], part["loss_all"], style, marker="o", color="C0", label=f"{split} loss")
        for column, color in (("f1", "C2"), ("recall", "C1"), ("precision", "C4")):
            ax_scores.plot(part["epoch"], part[column], style, marker="o", color=color, label=f"{split} {column}")
    for ax in (ax_loss, ax_scores):
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="0.5", linestyle=":", linewidth=1, label=f"model.pt (epoch {chosen_epoch})")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.set(ylabel="mean cross-entropy loss", title="Loss")
    ax_scores.set(ylabel="score at threshold 0.5", ylim=(0, 1.02), title="F1, recall, precision")
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------

@dataclass
class ValidationResult:
    """What a run wrote and computed (for tests, benchmarks and notebooks)."""

    out_dir: Path
    written: list[Path]
    predictions: pd.DataFrame
    metrics: dict[str, object] | None = None
    froc: FrocResult | None = None
    intervals: dict[str, tuple[float, float]] | None = None
    val_scans: list[str] = field(default_factory=list)
    predict_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def candidates_per_s(self) -> float:
        return len(self.predictions) / self.predict_seconds if self.predict_seconds > 0 else math.nan


class ValidationApp:
    """Validation stage: predict every candidate of the val scans with a trained LunaModel and write
    predictions.tsv, metrics.tsv (metric row + CPM), froc.tsv, submission.csv (LUNA16) and the plots.

    Without class labels in the crop stores and without --annotations it runs predict-only: predictions
    and the submission, no metrics.
    """

    def __init__(self, argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(prog="luna-validate", description=self.__doc__,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        parser.add_argument("--model", required=True, help="model.pt written by luna-train")
        parser.add_argument("--crops", required=True, nargs="+", metavar="H5", help="crop stores (luna-crops)")
        parser.add_argument("--splits", default=None,
                            help="splits.tsv: predict the scans with split val, each of them in the FROC divisor; "
                                 "default: every cropped candidate, every scan of the stores")
        parser.add_argument("--annotations", default=None,
                            help="LUNA16 annotations.csv for FROC/CPM (filtered to the val scans); default: no FROC")
        parser.add_argument("--annotations-excluded", default=None,
                            help="LUNA16 annotations_excluded.csv: candidates on these findings count as neither "
                                 "hit nor false positive")
        parser.add_argument("--history", default=None, help="history.tsv of the training run, for training_curves.png")
        parser.add_argument("--out", required=True, help="output folder")
        parser.add_argument("--batch-size", type=int, default=64, help="candidates per forward pass")
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")
        parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                            help="bf16 autocast; auto: on for a bf16-capable GPU, off on the CPU (see "
                                 "benchmarks/results/validate.md)")
        parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                            help="channels_last_3d memory format; auto: on (CUDA as training, CPU measured faster)")
        parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
        parser.add_argument("--bootstrap", type=int, default=0,
                            help="bootstrap samples (val scans resampled) for metrics_ci.tsv; 0 = off")
        parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
        parser.add_argument("--max-per-scan", type=int, default=100,
                            help="FROC: candidates kept per scan (LUNA16: 100); 0 = all")
        self.args = parser.parse_args(argv)

    def main(self) -> int:
        """Run; on bad input print one line to stderr and return 2."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            self.run()
        except (ValidationError, CheckpointError, StoreError, TableError, MetricsError, DeviceError) as exc:
            print(f"luna-validate: error: {exc}", file=sys.stderr)
            return 2
        return 0

    def run(self) -> ValidationResult:
        """Run the stage; raises a ValueError subclass with a one-line message on bad input."""
        a = self.args
        t0 = time.perf_counter()
        logger.info("Starting %s, %s", type(self).__name__, vars(a))
        if a.batch_size < 1:
            raise ValidationError(f"--batch-size must be >= 1, got {a.batch_size}")
        if a.bootstrap < 0:
            raise ValidationError(f"--bootstrap must be >= 0, got {a.bootstrap}")
        if a.threads < 0:
            raise ValidationError(f"--threads must be >= 0, got {a.threads}")
        if a.threads:
            torch.set_num_threads(a.threads)
        out_dir = Path(a.out)
        device = resolve_device(a.device)
        amp_dtype = resolve_amp(a.amp, device)
        channels_last = use_channels_last(device, a.channels_last)

        # every input is read and checked before the (long) prediction starts
        stores = open_stores(a.crops)
        splits = read_splits(a.splits) if a.splits else None
        val_scans = val_scans_of(splits, a.splits) if splits is not None else None
        annotations = read_annotations(a.annotations)
        excluded = read_annotations(a.annotations_excluded, excluded=True)
        if excluded is not None and annotations is None:
            raise ValidationError("--annotations-excluded needs --annotations (the nodules FROC is measured on)")
        history = read_history(a.history) if a.history else None
        model, checkpoint = load_model(a.model, map_location=device)
        epoch = int(checkpoint["epoch"])
        check_model_input(model, stores[0].crop_shape, device, a.model)

        if val_scans is None:
            val_scans = list(dict.fromkeys(
                [uid for store in stores for uid in store.geometries]
                + [uid for store in stores for uid in store.table["series_uid"].astype(str)]))
            logger.info("no --splits: predicting every cropped candidate; %d scans of the stores", len(val_scans))
        rows = select_candidates(stores, val_scans)
        if splits is not None:
            listed = set(splits["series_uid"])
            n_unlisted = sum(int((~store.table["series_uid"].astype(str).isin(listed)).sum()) for store in stores)
            if n_unlisted:
                logger.warning("%d crops belong to scans that %s does not list; not predicted", n_unlisted, a.splits)
        labels = labels_of(rows, stores)
        self._log_inputs(stores, val_scans, rows, labels, annotations)

        logger.info("predicting %d candidates on %s (batch %d, %s, %s)", len(rows), device, a.batch_size,
                    f"autocast {amp_dtype}".replace("torch.", "") if amp_dtype else "float32",
                    "channels_last_3d" if channels_last else "contiguous")
        prediction = predict(model, stores, rows, labels, batch_size=a.batch_size, device=device,
                             amp_dtype=amp_dtype, channels_last=channels_last)
        predictions = predictions_frame(rows, prediction, labels is not None)
        probabilities = as_written(prediction.probability)

        written: list[Path] = []
        result = ValidationResult(out_dir, written, predictions, val_scans=list(val_scans),
                                  predict_seconds=prediction.seconds)
        written.append(write_table(predictions, out_dir / "predictions.tsv"))
        written.append(write_table(submission_frame(predictions), out_dir / "submission.csv", sep=","))

        if labels is None and annotations is None:
            logger.warning("predict-only: the candidates have no class (is_nodule -1) and no --annotations were "
                           "given, so no metrics.tsv, froc.tsv or plots; wrote predictions and submission")
        else:
            self._evaluate(result, labels, probabilities, prediction, annotations, excluded, epoch)
        if history is not None:
            written.append(plot_training_curves(history, out_dir / "training_curves.png", epoch))
        elif labels is not None or annotations is not None:
            logger.info("no --history: training_curves.png not written")
        self._remove_stale(out_dir, written)
        result.seconds = time.perf_counter() - t0
        self._log_summary(result, prediction)
        return result

    # ---- steps

    def _evaluate(self, result: ValidationResult, labels: np.ndarray | None, probabilities: np.ndarray,
                  prediction: Prediction, annotations: pd.DataFrame | None, excluded: pd.DataFrame | None,
                  epoch: int) -> None:
        a = self.args
        out_dir, written = result.out_dir, result.written
        if labels is not None:
            losses = as_written(prediction.loss if prediction.loss is not None else np.zeros(0))
            row = metric_row(labels, probabilities, losses, epoch=epoch, split="val")
        else:
            logger.warning("the candidates have no class (is_nodule -1): metrics.tsv holds FROC/CPM only, the "
                           "classification columns are NaN; no ROC or precision-recall plot")
            row = unlabelled_metric_row(len(probabilities), epoch)
        froc_result = None
        if annotations is not None:
            frame = result.predictions[["series_uid", "coord_x", "coord_y", "coord_z"]].copy()
            frame["probability"] = probabilities
            max_per_scan = a.max_per_scan if a.max_per_scan > 0 else None
            froc_result = froc(frame, annotations, result.val_scans, excluded, max_per_scan=max_per_scan)
            written.append(write_table(froc_result.curve[FROC_COLUMNS], out_dir / "froc.tsv"))
            written.append(plot_froc(froc_result, out_dir / "froc.png"))
            if a.bootstrap > 0:
                logger.info("bootstrap of CPM: %d samples of the %d val scans, seed %d", a.bootstrap,
                            len(result.val_scans), a.seed)
                result.intervals = froc_bootstrap(frame, annotations, result.val_scans, excluded, max_per_scan,
                                                  n_bootstrap=a.bootstrap, seed=a.seed, confidence=CONFIDENCE)
        else:
            logger.warning("no --annotations: no FROC, froc.tsv and froc.png not written, CPM NaN in metrics.tsv")
            if a.bootstrap > 0:
                logger.warning("--bootstrap %d ignored: the bootstrap is of CPM, which needs --annotations",
                               a.bootstrap)
        combined = combine_metrics(row, froc_result)
        written.append(write_table(pd.DataFrame([combined])[METRICS_COLUMNS], out_dir / "metrics.tsv"))
        if result.intervals is not None:
            written.append(write_table(ci_frame(combined, result.intervals, a.bootstrap, a.seed),
                                       out_dir / "metrics_ci.tsv"))
        if labels is not None:
            written.append(plot_roc(labels, probabilities, row, out_dir / "roc.png"))
            written.append(plot_pr(labels, probabilities, row, out_dir / "pr.png"))
        result.metrics = combined
        result.froc = froc_result

    @staticmethod
    def _log_inputs(stores: Sequence[CropStore], val_scans: Sequence[str], rows: pd.DataFrame,
                    labels: np.ndarray | None, annotations: pd.DataFrame | None) -> None:
        in_stores = {uid for store in stores for uid in store.geometries} | {
            uid for store in stores for uid in store.table["series_uid"].astype(str)}
        n_absent = sum(uid not in in_stores for uid in val_scans)
        n_with = rows["series_uid"].nunique() if len(rows) else 0
        logger.info("%d val scans, %d of them with cropped candidates; %d candidates%s", len(val_scans), n_with,
                    len(rows), "" if labels is None else f" ({int(labels.sum())} positive)")
        if n_absent:
            logger.warning("%d val scans are in none of the given crop stores; they count in the FROC divisor as "
                           "scans without candidates", n_absent)
        if not len(rows):
            logger.warning("no candidate of the val scans is in the crop stores")
        if annotations is not None:
            in_val = annotations["seriesuid"].isin(set(val_scans))
            logger.info("%d annotated nodules in the val scans (%d rows of other scans ignored)", int(in_val.sum()),
                        int((~in_val).sum()))

    @staticmethod
    def _remove_stale(out_dir: Path, written: list[Path]) -> None:
        keep = {path.name for path in written}
        for name in OUTPUT_NAMES:
            path = out_dir / name
            if name not in keep and path.exists():
                logger.info("removing %s of an earlier run (not produced by this one)", path)
                path.unlink()

    @staticmethod
    def _log_summary(result: ValidationResult, prediction: Prediction) -> None:
        n = len(result.predictions)
        logger.info("predicted %d candidates in %.1f s (%.1f candidates/s)", n, prediction.seconds, prediction.rate)
        m = result.metrics
        if m is not None:
            parts = [f"val epoch {m['epoch']}: {n} candidates"]
            if not (isinstance(m["n_pos"], float) and math.isnan(m["n_pos"])):
                parts.append(f"{m['n_pos']} positive")
            parts.append(f"AUC {float(m['auc']):.4f}, recall {float(m['recall']):.4f}, "  # type: ignore[arg-type]
                         f"precision {float(m['precision']):.4f}, F1 {float(m['f1']):.4f}")  # type: ignore[arg-type]
            if result.froc is not None:
                f = result.froc
                ci = ""
                if result.intervals is not None:
                    lo, hi = result.intervals["cpm"]
                    ci = f" (95% CI {lo:.4f}-{hi:.4f})"
                parts.append(f"CPM {f.cpm:.4f}{ci}, {f.n_hit} of {f.n_nodules} nodules hit, {f.n_fp} false "
                             f"positives on {f.n_scans} scans")
            logger.info("; ".join(parts))
        logger.info("wrote %s in %.1f s: %s", result.out_dir, result.seconds,
                    ", ".join(path.name for path in result.written))


def main(argv: list[str] | None = None) -> None:
    """Console script ``luna-validate``."""
    sys.exit(ValidationApp(argv).main())
