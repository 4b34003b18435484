"""Per-sample evaluation metrics as pure functions (numpy only, no I/O); FROC and CPM are in luna.froc.

* the per-epoch **metric row** (history.tsv / metrics.tsv, docs/design.md): the book's Chapter 11 loss and
  percent-correct for all / negative / positive samples at a threshold (0.5 in history.tsv, the model's
  operating point in metrics.tsv), Chapter 12's precision, recall and F1, and the ROC AUC -- all derived
  from per-sample (label, probability of class 1, loss);
* ROC and precision-recall curves, and :func:`choose_threshold`, which picks an operating point on a selection
  set.

Undefined values (a precision with no positive predictions, a positive-class loss with no positives) are
``NaN``, never 0 and never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "CLASSIFICATION_THRESHOLD",
    "HISTORY_COLUMNS",
    "MetricsError",
    "auc_score",
    "choose_threshold",
    "format_row",
    "metric_row",
    "parse_threshold_policy",
    "pr_curve",
    "roc_curve",
]

CLASSIFICATION_THRESHOLD = 0.5
"""A probability strictly above this is a positive prediction; a label above it is a nodule."""

HISTORY_COLUMNS: list[str] = [
    "epoch", "split", "n", "n_pos", "n_neg",
    "loss_all", "loss_neg", "loss_pos",
    "correct_all", "correct_neg", "correct_pos",
    "precision", "recall", "f1", "auc",
]

class MetricsError(ValueError):
    """Input that metrics cannot be computed from; the one-line message names the column/row/value."""


# ----------------------------------------------------------------------------------------------------
# Per-sample classification metrics
# ----------------------------------------------------------------------------------------------------

def _as_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise MetricsError(f"{name}: expected a 1-D array, got shape {array.shape}")
    return array


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN (not 0, not an exception) when the denominator is 0."""
    return float(numerator) / float(denominator) if denominator else math.nan


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks (Mann-Whitney)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # start of each run of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], sorted_values.size]  # exclusive
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc_score(labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score_pos > score_neg) + 0.5 P(equal).

    NaN when one class is absent or a probability is NaN (a diverged model: no ranking exists).
    """
    labels = _as_1d("labels", labels)
    probabilities = _as_1d("probabilities", probabilities)
    if labels.shape != probabilities.shape:
        raise MetricsError(f"labels ({labels.size}) and probabilities ({probabilities.size}) differ in length")
    positive = labels > CLASSIFICATION_THRESHOLD
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(probabilities).any():
        return math.nan
    ranks = _average_ranks(probabilities)
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def metric_row(
    labels: Sequence[float] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    epoch: int | float,
    split: str,
    threshold: float | np.ndarray = CLASSIFICATION_THRESHOLD,
) -> dict[str, int | str | float]:
    """One history.tsv row (keys in :data:`HISTORY_COLUMNS` order) from per-sample values.

    ``labels``: 1 = nodule (a label <= 0.5 is negative); ``probabilities``: of class 1, a positive
    prediction is ``p > threshold`` (0.5 by default; exactly the threshold is negative, as in the book; a NaN
    probability, from a diverged model, is negative here where the book's ``~(p <= 0.5)`` calls it positive;
    ``threshold`` may be one value per sample, e.g. each fold's own); ``losses``: per-sample loss.
    loss_* are means, correct_* percentages; precision = TP/(TP+FP), recall = TP/(TP+FN),
    f1 = 2TP/(2TP+FP+FN) (the harmonic mean of precision and recall; NaN when either is undefined).
    """
    labels = _as_1d("labels", labels)
    probabilities = _as_1d("probabilities", probabilities)
    losses = _as_1d("losses", losses)
    if not labels.size == probabilities.size == losses.size:
        raise MetricsError(
            f"labels ({labels.size}), probabilities ({probabilities.size}) and losses ({losses.size}) "
            "differ in length"
        )
    positive = labels > CLASSIFICATION_THRESHOLD
    negative = ~positive
    predicted_positive = probabilities > np.asarray(threshold, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = int(negative.sum())
    true_pos = int((positive & predicted_positive).sum())
    true_neg = int((negative & ~predicted_positive).sum())
    false_pos = n_neg - true_neg
    false_neg = n_pos - true_pos

    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:  # both defined: 2PR/(P+R) == 2TP/(2TP+FP+FN), which stays defined when P = R = 0
        f1 = _ratio(2 * true_pos, 2 * true_pos + false_pos + false_neg)

    row: dict[str, int | str | float] = {
        "epoch": epoch if isinstance(epoch, float) and math.isnan(epoch) else int(epoch),
        "split": str(split),
        "n": int(labels.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "loss_all": _mean(losses),
        "loss_neg": _mean(losses[negative]),
        "loss_pos": _mean(losses[positive]),
        "correct_all": 100.0 * _ratio(true_pos + true_neg, labels.size),
        "correct_neg": 100.0 * _ratio(true_neg, n_neg),
        "correct_pos": 100.0 * _ratio(true_pos, n_pos),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": auc_score(labels, probabilities),
    }
    return row


def format_row(row: Mapping[str, object]) -> str:
    """The book's epoch log lines folded into one: all, then negatives and positives with "(x of y)".

    ``E1 trn 0.2345 loss,  99.7% correct, 0.1234 precision, 0.5000 recall, 0.2000 f1, 0.9000 auc |
    neg 0.0100 loss, 100.0% correct (397 of 397) | pos 1.5000 loss,   0.2% correct (3 of 1215)``
    """

    def count(percent: object, total: object) -> str:
        percent_value, total_value = float(percent), int(total)  # type: ignore[arg-type]
        correct = 0 if math.isnan(percent_value) else round(percent_value * total_value / 100.0)
        return f"({correct} of {total_value})"

    def fmt(value: object, spec: str) -> str:
        return format(float(value), spec)  # type: ignore[arg-type]

    split = {"train": "trn"}.get(str(row["split"]), str(row["split"]))
    return (
        f"E{row['epoch']} {split} {fmt(row['loss_all'], '.4f')} loss, {fmt(row['correct_all'], '5.1f')}% correct, "
        f"{fmt(row['precision'], '.4f')} precision, {fmt(row['recall'], '.4f')} recall, "
        f"{fmt(row['f1'], '.4f')} f1, {fmt(row['auc'], '.4f')} auc"
        f" | neg {fmt(row['loss_neg'], '.4f')} loss, {fmt(row['correct_neg'], '5.1f')}% correct "
        f"{count(row['correct_neg'], row['n_neg'])}"
        f" | pos {fmt(row['loss_pos'], '.4f')} loss, {fmt(row['correct_pos'], '5.1f')}% correct "
        f"{count(row['correct_pos'], row['n_pos'])}"
    )


def _threshold_counts(
    labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Distinct thresholds (descending) with TP and FP counts of ``p >= threshold`` at each."""
    labels = _as_1d("labels", labels)
    probabilities = _as_1d("probabilities", probabilities)
    if labels.shape != probabilities.shape:
        raise MetricsError(f"labels ({labels.size}) and probabilities ({probabilities.size}) differ in length")
    if np.isnan(probabilities).any():
        raise MetricsError("probabilities: NaN value; a curve needs every probability")
    positive = labels > CLASSIFICATION_THRESHOLD
    order = np.argsort(-probabilities, kind="mergesort")
    scores = probabilities[order]
    true_pos = np.cumsum(positive[order])
    false_pos = np.cumsum(~positive[order])
    last_of_run = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if scores.size else np.array([], int)
    return (scores[last_of_run], true_pos[last_of_run], false_pos[last_of_run],
            int(positive.sum()), int((~positive).sum()))


def roc_curve(
    labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` for plotting: one point per distinct probability, predicted positive
    when ``p >= threshold``, thresholds descending and starting at ``inf`` with the point (0, 0).

    fpr (tpr) is NaN throughout when there are no negatives (positives).
    """
    thresholds, true_pos, false_pos, n_pos, n_neg = _threshold_counts(labels, probabilities)
    true_pos = np.r_[0, true_pos].astype(np.float64)
    false_pos = np.r_[0, false_pos].astype(np.float64)
    fpr = false_pos / n_neg if n_neg else np.full(false_pos.size, np.nan)
    tpr = true_pos / n_pos if n_pos else np.full(true_pos.size, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_curve(
    labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` for plotting: one point per distinct probability, predicted
    positive when ``p >= threshold``, thresholds descending (so recall rises). No artificial end point;
    recall is NaN throughout when there are no positives.
    """
    thresholds, true_pos, false_pos, n_pos, _ = _threshold_counts(labels, probabilities)
    precision = true_pos / (true_pos + false_pos)  # never 0/0: each point has >= 1 prediction
    recall = true_pos / n_pos if n_pos else np.full(true_pos.size, np.nan)
    return precision.astype(np.float64), np.asarray(recall, dtype=np.float64), thresholds


def parse_threshold_policy(policy: str | float) -> tuple[str, float]:
    """``0.5`` -> ("fixed", 0.5); ``max_f1`` -> ("max_f1", nan); ``recall:0.9`` -> ("recall", 0.9);
    ``fp_per_scan:2`` -> ("fp_per_scan", 2.0)."""
    text = str(policy).strip()
    if text == "max_f1":
        return "max_f1", math.nan
    for kind in ("recall", "fp_per_scan"):
        if text.startswith(kind + ":"):
            try:
                target = float(text.split(":", 1)[1])
            except ValueError:
                target = math.nan
            if kind == "recall" and not 0.0 < target <= 1.0:
                raise MetricsError(f"threshold policy {text!r}: recall target must be in (0, 1]")
            if kind == "fp_per_scan" and not (0.0 <= target and math.isfinite(target)):
                raise MetricsError(f"threshold policy {text!r}: false positives per scan must be a number >= 0")
            return kind, target
    try:
        value = float(text)
    except ValueError:
        raise MetricsError(f"threshold policy {text!r}: expected a number in (0, 1), max_f1, recall:R or "
                           "fp_per_scan:F") from None
    if not 0.0 < value < 1.0:
        raise MetricsError(f"threshold policy {text!r}: a fixed threshold must lie in (0, 1)")
    return "fixed", value


def choose_threshold(labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray,
                     policy: str | float, n_scans: int | None = None) -> float:
    """The operating threshold (a positive is ``p > threshold``) that ``policy`` picks on these samples.

    ``fixed`` (a number): that number. ``max_f1``: the cut between two distinct probabilities with the highest
    F1 (the highest such cut on ties). ``recall:R``: the highest cut whose recall is at least R.
    ``fp_per_scan:F``: the lowest cut that calls at most F negatives per scan (``n_scans`` scans): it rests on
    the many negatives rather than on the few positives, so it moves less from one selection set to another.
    A cut lies halfway between the lowest probability called positive and the next lower distinct one (half the
    lowest probability when all are called positive, -0.5 when that is 0; the highest probability when none can
    be). ``recall`` and ``max_f1`` need at least one positive.
    """
    kind, value = parse_threshold_policy(policy)
    if kind == "fixed":
        return value
    thresholds, true_pos, false_pos, n_pos, _ = _threshold_counts(labels, probabilities)
    if kind == "fp_per_scan":
        if not n_scans or n_scans < 1:
            raise MetricsError(f"threshold policy {policy!r}: needs the number of scans the samples come from")
        within = np.flatnonzero(false_pos <= value * n_scans + 1e-9)
        if within.size == 0:
            return float(thresholds[0]) if thresholds.size else 0.5
        k = int(within[-1])
    elif n_pos == 0:
        raise MetricsError(f"threshold policy {policy!r}: the selection set has no positive sample")
    elif kind == "max_f1":
        f1 = 2.0 * true_pos / (true_pos + false_pos + n_pos)
        k = int(np.argmax(f1))
    else:
        k = int(np.flatnonzero(true_pos >= value * n_pos - 1e-9)[0])
    if k + 1 < thresholds.size:
        lower = thresholds[k + 1]
    else:  # every sample called: below the lowest probability (-0.5 when that is exactly 0, as p > t must hold)
        lower = 0.0 if thresholds[k] > 0.0 else -1.0
    return float((thresholds[k] + lower) / 2.0)
