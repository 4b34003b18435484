"""The evaluation plots: ROC, precision-recall, FROC and the training curves of every fold.

matplotlib's object API with the Agg canvas (no pyplot, no global backend state); each PNG is written
atomically (luna.io) without a timestamp in its metadata.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from luna.io import atomic_path
from luna.froc import FROC_RATES, SENSITIVITY_COLUMNS, FrocResult
from luna.metrics import pr_curve, roc_curve


def _figure(width_in: float = 6.0, height_in: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
    return path


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"})


def _operating_point(row: dict[str, object]) -> str:
    threshold = float(row.get("threshold", 0.5))  # type: ignore[arg-type]
    return "each fold's operating point" if math.isnan(threshold) else f"threshold {threshold:.3g}"


def _subject(row: dict[str, object]) -> str:
    """What the numbers are on: the test fold(s), or (luna-validate --scans) the model's selection scans or every
    scan, training scans included."""
    fold, split = row.get("fold", ""), str(row.get("split", "test"))
    if split == "test":
        return "test, all folds run" if str(fold) == "all" else f"test fold {fold}"
    scans = {"selection": "selection scans", "all": "all scans, training scans included"}.get(split, f"{split} scans")
    return f"{scans} (not held out)" if str(fold) == "all" else f"{scans} of fold {fold}'s model (not held out)"


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, row: dict[str, object], path: str | os.PathLike) -> Path:
    """ROC curve with the AUC and the row's operating point (its threshold)."""
    figure = _figure()
    ax = figure.add_subplot()
    n_pos, n_neg = int(row["n_pos"]), int(row["n_neg"])  # type: ignore[arg-type]
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    if n_pos and n_neg:
        fpr, tpr, _ = roc_curve(labels, probabilities)
        ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"ROC, AUC {float(row['auc']):.4f}")  # type: ignore[arg-type]
        ax.plot([1.0 - float(row["correct_neg"]) / 100.0], [float(row["recall"])], "o", color="C3",  # type: ignore[arg-type]
                label=_operating_point(row))
    else:
        _note(ax, f"ROC undefined: {n_pos} positive, {n_neg} negative candidates")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="false positive rate", ylabel="true positive rate (recall)",
           title=f"ROC, {_subject(row)} ({n_pos} positive / {n_neg} negative)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(figure, path)


def plot_pr(labels: np.ndarray, probabilities: np.ndarray, row: dict[str, object], path: str | os.PathLike) -> Path:
    """Precision-recall curve with the prevalence baseline and the row's operating point."""
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
                    label=f"{_operating_point(row)}, F1 {float(row['f1']):.4f}")  # type: ignore[arg-type]
        ax.legend(loc="best")  # lower left covered the operating point when recall is low
    else:
        _note(ax, "precision-recall undefined: no positive candidates")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall, {_subject(row)}")
    ax.grid(True, alpha=0.3)
    return save_figure(figure, path)


def froc_plot_points(fp: np.ndarray, sensitivity: np.ndarray, steps: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The FROC points with each diagonal segment (hits and false positives gained at one tied threshold)
    subdivided on a log scale: a straight line between two points on the log FP axis is not the linear
    interpolation LUNA16's sensitivities are read from, so the drawn curve would disagree with them."""
    xs, ys = [fp[:1]], [sensitivity[:1]]
    diagonal = np.flatnonzero((np.diff(fp) > 0) & (np.diff(sensitivity) != 0))
    start = 1
    for i in diagonal:  # segment i -> i + 1
        xs.append(fp[start:i + 1])
        ys.append(sensitivity[start:i + 1])
        t = np.geomspace(fp[i], fp[i + 1], steps)[1:-1]
        xs.append(t)
        ys.append(sensitivity[i] + (sensitivity[i + 1] - sensitivity[i]) * (t - fp[i]) / (fp[i + 1] - fp[i]))
        start = i + 1
    xs.append(fp[start:])
    ys.append(sensitivity[start:])
    return np.concatenate(xs), np.concatenate(ys)


def plot_froc(result: FrocResult, path: str | os.PathLike, split: str = "test") -> Path:
    """The FROC curve on a log FP-per-scan axis (1/8 ... 8) with the seven LUNA16 operating points; ``split``
    names the scans (metrics.tsv's split column)."""
    figure = _figure(6.5, 5.0)
    ax = figure.add_subplot()
    curve = result.curve
    # the (0, 0) start cannot sit on a log axis; the first real point is drawn from the axis' left edge
    fp = curve["fp_per_scan"].to_numpy()
    sensitivity = curve["sensitivity"].to_numpy()
    shown = fp > 0
    left = FROC_RATES[0] / 2
    if shown.any():
        x, y = froc_plot_points(np.r_[left, fp[shown]], np.r_[np.interp(left, fp, sensitivity), sensitivity[shown]])
    else:
        x, y = np.array([left, FROC_RATES[-1] * 2]), np.full(2, sensitivity[-1])
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
                 f"{result.n_scans} {split} scans{'' if split == 'test' else ', not held out'})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(figure, path)


def plot_training_curves(folds: Sequence[tuple[int, pd.DataFrame, int | None]], path: str | os.PathLike) -> Path:
    """Per fold (one row of panels each): loss, and precision / recall / F1 at threshold 0.5, per epoch, train
    dashed with squares and selection solid with dots, with the epoch model.pt keeps. ``folds``: (fold, history,
    kept epoch)."""
    figure = _figure(11.0, 3.6 * max(1, len(folds)))
    axes = figure.subplots(max(1, len(folds)), 2, squeeze=False)
    styles = {"train": ("--", "s"), "selection": ("-", "o")}  # line and marker: both show in the legend
    for (fold, history, chosen_epoch), (ax_loss, ax_scores) in zip(folds, axes):
        for split, (style, marker) in styles.items():
            part = history.loc[history["split"] == split].sort_values("epoch")
            if part.empty:
                continue
            ax_loss.plot(part["epoch"], part["loss_all"], style, marker=marker, markersize=4, color="C0",
                         label=f"{split} loss")
            for column, color in (("f1", "C2"), ("recall", "C1"), ("precision", "C4")):
                ax_scores.plot(part["epoch"], part[column], style, marker=marker, markersize=4, color=color,
                               label=f"{split} {column}")
        for ax in (ax_loss, ax_scores):
            if chosen_epoch is not None:
                ax.axvline(chosen_epoch, color="0.5", linestyle=":", linewidth=1,
                           label=f"model.pt (epoch {chosen_epoch})")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="best", handlelength=4)  # long enough to show the dashes past the marker
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_loss.set(ylabel="mean cross-entropy loss", title=f"Fold {fold}: loss")
        ax_scores.set(ylabel="score at threshold 0.5", ylim=(0, 1.02), title=f"Fold {fold}: F1, recall, precision")
    return save_figure(figure, path)
