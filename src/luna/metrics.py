"""Evaluation metrics as pure functions (numpy and pandas only, no I/O).

Two families:

* the per-epoch **metric row** (history.tsv / metrics.tsv, docs/design.md): the book's Chapter 11 loss and
  percent-correct for all / negative / positive samples at a threshold (0.5 in history.tsv, the model's
  operating point in metrics.tsv), Chapter 12's precision, recall and F1, and the ROC AUC -- all derived
  from per-sample (label, probability of class 1, loss); :func:`choose_threshold` picks an operating point
  on a selection set;
* **FROC and CPM** exactly as the official LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``)
  defines them, vectorised per scan so that LUNA16's 750k candidates take seconds, not minutes.

Undefined values (a precision with no positive predictions, a positive-class loss with no positives,
a sensitivity with no nodules) are ``NaN``, never 0 and never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "CLASSIFICATION_THRESHOLD",
    "FROC_RATES",
    "HISTORY_COLUMNS",
    "METRICS_COLUMNS",
    "SENSITIVITY_COLUMNS",
    "FrocResult",
    "MetricsError",
    "auc_score",
    "choose_threshold",
    "combine_metrics",
    "format_row",
    "froc",
    "froc_bootstrap",
    "metric_row",
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

FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which LUNA16 reads the sensitivity; CPM is the mean of the seven."""

SENSITIVITY_COLUMNS: list[str] = [f"sens_at_{rate:g}" for rate in FROC_RATES]
METRICS_COLUMNS: list[str] = ["fold"] + HISTORY_COLUMNS + ["threshold", "cpm"] + SENSITIVITY_COLUMNS
"""metrics.tsv: one row per test fold (``fold`` = N) and one pooled row (``fold`` = ``all``); ``threshold`` is
the operating point its threshold metrics use (NaN in the pooled row when the folds' thresholds differ)."""

PREDICTION_COLUMNS = ("series_uid", "coord_x", "coord_y", "coord_z", "probability")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
"""The official script replaces a negative diameter (``-1`` on most excluded findings) by 10 mm."""


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
    prediction is ``p > threshold`` (0.5 by default; exactly the threshold is negative, as in the book;
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
    """``0.5`` -> ("fixed", 0.5); ``max_f1`` -> ("max_f1", nan); ``recall:0.9`` -> ("recall", 0.9)."""
    text = str(policy).strip()
    if text == "max_f1":
        return "max_f1", math.nan
    if text.startswith("recall:"):
        try:
            target = float(text.split(":", 1)[1])
        except ValueError:
            target = math.nan
        if not 0.0 < target <= 1.0:
            raise MetricsError(f"threshold policy {text!r}: recall target must be in (0, 1]")
        return "recall", target
    try:
        value = float(text)
    except ValueError:
        raise MetricsError(f"threshold policy {text!r}: expected a number in (0, 1), max_f1 or recall:R") from None
    if not 0.0 < value < 1.0:
        raise MetricsError(f"threshold policy {text!r}: a fixed threshold must lie in (0, 1)")
    return "fixed", value


def choose_threshold(labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray,
                     policy: str | float) -> float:
    """The operating threshold (a positive is ``p > threshold``) that ``policy`` picks on these samples.

    ``fixed`` (a number): that number. ``max_f1``: the cut between two distinct probabilities with the highest
    F1 (the highest such cut on ties). ``recall:R``: the highest cut whose recall is at least R. A cut lies
    halfway between the lowest probability called positive and the next lower distinct one (half the lowest
    probability when all are called positive). Needs at least one positive unless fixed.
    """
    kind, value = parse_threshold_policy(policy)
    if kind == "fixed":
        return value
    thresholds, true_pos, false_pos, n_pos, _ = _threshold_counts(labels, probabilities)
    if n_pos == 0:
        raise MetricsError(f"threshold policy {policy!r}: the selection set has no positive sample")
    if kind == "max_f1":
        f1 = 2.0 * true_pos / (true_pos + false_pos + n_pos)
        k = int(np.argmax(f1))
    else:
        k = int(np.flatnonzero(true_pos >= value * n_pos - 1e-9)[0])
    lower = thresholds[k + 1] if k + 1 < thresholds.size else 0.0
    return float((thresholds[k] + lower) / 2.0)


# ----------------------------------------------------------------------------------------------------
# FROC and CPM (LUNA16)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrocResult:
    """The FROC analysis of one prediction set.

    ``curve``: columns threshold, fp_per_scan, sensitivity; the first row is (inf, 0, 0), then one row
    per distinct threshold, descending. ``sensitivities``: keyed ``sens_at_0.125`` ... ``sens_at_8``.
    ``n_nodules``: nodules of the val scans (hit or not); ``n_hit``: nodules hit by a kept candidate;
    ``n_scans``: val scans (the FP divisor); ``n_fp``: kept candidates that hit nothing;
    ``n_candidates``: candidates of val scans after the top-``max_per_scan`` cut;
    ``n_ignored_excluded``: kept candidates dropped because they hit an excluded finding only.
    """

    curve: pd.DataFrame
    sensitivities: dict[str, float]
    cpm: float
    n_nodules: int
    n_hit: int
    n_scans: int
    n_fp: int
    n_candidates: int = 0
    n_ignored_excluded: int = 0


@dataclass(frozen=True)
class _FrocEntries:
    """Per-scan FROC entries: what the official script puts into its FROC lists, as arrays.

    Hit nodules (score = best hit probability) and false positives, each with its scan index;
    ``nodules_per_scan`` also counts the nodules never hit.
    """

    scan: np.ndarray       # int, index into the val scan list
    score: np.ndarray      # float
    is_hit: np.ndarray     # bool: True = hit nodule (best score), False = false positive
    nodules_per_scan: np.ndarray  # int, per val scan
    n_candidates: int
    n_ignored_excluded: int


def _check_frame(frame: pd.DataFrame, name: str, columns: Sequence[str], numeric: Sequence[str]) -> pd.DataFrame:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        present = ", ".join(map(str, frame.columns))
        raise MetricsError(f"{name}: missing column(s) {', '.join(missing)} (has {present})")
    frame = frame.loc[:, list(columns)].copy()
    for column in numeric:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna()  # a missing or non-numeric value
        if bad.any():
            position = int(np.flatnonzero(bad.to_numpy())[0])
            raise MetricsError(
                f"{name}: row {position}: {column} = {frame[column].iloc[position]!r} is not a number"
            )
        frame[column] = values.astype(np.float64)
    first = list(columns)[0]
    frame[first] = frame[first].astype(str)
    return frame


def _prepare_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    if "series_uid" not in predictions.columns and "seriesuid" in predictions.columns:
        # a LUNA16 submission file (seriesuid, coordX, coordY, coordZ, probability) is accepted too
        predictions = predictions.rename(
            columns={"seriesuid": "series_uid", "coordX": "coord_x", "coordY": "coord_y", "coordZ": "coord_z"}
        )
    return _check_frame(predictions, "predictions", PREDICTION_COLUMNS, PREDICTION_COLUMNS[1:])


def _prepare_annotations(annotations: pd.DataFrame | None, name: str) -> pd.DataFrame:
    if annotations is None:
        return pd.DataFrame({column: pd.Series(dtype=object if column == "seriesuid" else np.float64)
                             for column in ANNOTATION_COLUMNS})
    return _check_frame(annotations, name, ANNOTATION_COLUMNS, ANNOTATION_COLUMNS[1:])


def _top_candidates(predictions: pd.DataFrame, max_per_scan: int | None) -> pd.DataFrame:
    """Per scan, the candidates strictly above the ``max_per_scan + 1``-th highest probability.

    That is the official script's cut: with ties at the 101st place fewer than 100 survive.
    """
    if max_per_scan is None or max_per_scan <= 0 or predictions.empty:
        return predictions
    ordered = predictions.sort_values(["series_uid", "probability"], ascending=[True, False], kind="mergesort")
    position = ordered.groupby("series_uid", sort=False).cumcount().to_numpy()
    cut_rows = ordered.loc[position == max_per_scan, ["series_uid", "probability"]]
    cut = pd.Series(cut_rows["probability"].to_numpy(), index=cut_rows["series_uid"].to_numpy())
    threshold = predictions["series_uid"].map(cut).fillna(-np.inf).to_numpy()
    return predictions.loc[predictions["probability"].to_numpy() > threshold]


def _hits(candidates_xyz: np.ndarray, centres_xyz: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
    """(candidates, findings) bool: squared distance < squared radius, as the official script compares."""
    diameters = np.where(diameters_mm < 0.0, EXCLUDED_DEFAULT_DIAMETER_MM, diameters_mm)
    radius_squared = (diameters / 2.0) ** 2
    delta = candidates_xyz[:, None, :] - centres_xyz[None, :, :]
    return np.einsum("cfk,cfk->cf", delta, delta) < radius_squared[None, :]


def _froc_entries(
    predictions: pd.DataFrame,
    annotations: pd.DataFrame,
    val_series_uids: Iterable[str],
    annotations_excluded: pd.DataFrame | None,
    max_per_scan: int | None,
) -> tuple[list[str], _FrocEntries]:
    """Match the kept candidates of every val scan to its nodules and excluded findings."""
    scans = list(dict.fromkeys(str(uid) for uid in val_series_uids))
    if not scans:
        raise MetricsError("val_series_uids: no val scans, FROC needs at least one (FP-per-scan divisor)")
    scan_index = {uid: i for i, uid in enumerate(scans)}

    predictions = _prepare_predictions(predictions)
    predictions = predictions.loc[predictions["series_uid"].isin(scan_index)]
    predictions = _top_candidates(predictions, max_per_scan)

    nodules = _prepare_annotations(annotations, "annotations")
    nodules = nodules.loc[nodules["seriesuid"].isin(scan_index)]
    excluded = _prepare_annotations(annotations_excluded, "annotations_excluded")
    excluded = excluded.loc[excluded["seriesuid"].isin(scan_index)]

    nodules_per_scan = np.bincount(nodules["seriesuid"].map(scan_index).to_numpy(dtype=np.int64),
                                   minlength=len(scans))

    xyz_columns = ["coord_x", "coord_y", "coord_z"]
    annotation_xyz = ["coordX", "coordY", "coordZ"]
    nodule_groups = {uid: frame for uid, frame in nodules.groupby("seriesuid", sort=False)}
    excluded_groups = {uid: frame for uid, frame in excluded.groupby("seriesuid", sort=False)}

    scan_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    hit_parts: list[np.ndarray] = []
    n_ignored = 0

    # Scans without any finding: every kept candidate is a false positive, in one vectorised step.
    uids = predictions["series_uid"]
    has_finding = uids.isin(list(nodule_groups) + list(excluded_groups))
    plain = predictions.loc[~has_finding.to_numpy()]
    scan_parts.append(plain["series_uid"].map(scan_index).to_numpy(dtype=np.int64))
    score_parts.append(plain["probability"].to_numpy())
    hit_parts.append(np.zeros(len(plain), dtype=bool))

    for uid, group in predictions.loc[has_finding.to_numpy()].groupby("series_uid", sort=False):
        candidates_xyz = group[xyz_columns].to_numpy()
        scores = group["probability"].to_numpy()
        index = scan_index[uid]
        hit_any = np.zeros(len(group), dtype=bool)
        if uid in nodule_groups:
            found = nodule_groups[uid]
            hit_matrix = _hits(candidates_xyz, found[annotation_xyz].to_numpy(), found["diameter_mm"].to_numpy())
            hit_any = hit_matrix.any(axis=1)
            was_hit = hit_matrix.any(axis=0)
            best = np.where(hit_matrix, scores[:, None], -np.inf).max(axis=0)[was_hit]
            scan_parts.append(np.full(best.size, index, dtype=np.int64))
            score_parts.append(best)
            hit_parts.append(np.ones(best.size, dtype=bool))
        on_excluded = np.zeros(len(group), dtype=bool)
        if uid in excluded_groups:
            found = excluded_groups[uid]
            on_excluded = _hits(candidates_xyz, found[annotation_xyz].to_numpy(),
                                found["diameter_mm"].to_numpy()).any(axis=1) & ~hit_any
            n_ignored += int(on_excluded.sum())
        false_pos = ~hit_any & ~on_excluded
        scan_parts.append(np.full(int(false_pos.sum()), index, dtype=np.int64))
        score_parts.append(scores[false_pos])
        hit_parts.append(np.zeros(int(false_pos.sum()), dtype=bool))

    entries = _FrocEntries(
        scan=np.concatenate(scan_parts),
        score=np.concatenate(score_parts).astype(np.float64),
        is_hit=np.concatenate(hit_parts),
        nodules_per_scan=nodules_per_scan,
        n_candidates=len(predictions),
        n_ignored_excluded=n_ignored,
    )
    return scans, entries


def _sorted_entries(entries: _FrocEntries) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entries by descending score, with the index of the last entry of each run of equal scores."""
    order = np.argsort(-entries.score, kind="mergesort")
    scores = entries.score[order]
    last_of_run = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if scores.size else np.array([], int)
    return order, scores, last_of_run, entries.is_hit[order]


def _curve_points(
    is_hit: np.ndarray, weights: np.ndarray, last_of_run: np.ndarray, n_scans: int, n_nodules: float
) -> tuple[np.ndarray, np.ndarray]:
    """fp_per_scan and sensitivity at (0, 0) and at every distinct threshold (entries pre-sorted).

    ``weights`` counts each entry (1, or how often its scan was drawn in a bootstrap sample).
    """
    hits = np.cumsum(np.where(is_hit, weights, 0))[last_of_run]
    false_pos = np.cumsum(np.where(is_hit, 0, weights))[last_of_run]
    fp_per_scan = np.r_[0.0, false_pos / n_scans]
    if n_nodules > 0:
        sensitivity = np.r_[0.0, hits / n_nodules]
    else:
        sensitivity = np.full(fp_per_scan.size, np.nan)
    return fp_per_scan, sensitivity


def _sensitivities(fp_per_scan: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """The seven LUNA16 sensitivities: linear interpolation, past the curve's end its last value."""
    return np.interp(np.asarray(FROC_RATES), fp_per_scan, sensitivity)


def froc(
    predictions: pd.DataFrame,
    annotations: pd.DataFrame,
    val_series_uids: Iterable[str],
    annotations_excluded: pd.DataFrame | None = None,
    max_per_scan: int | None = 100,
) -> FrocResult:
    """The LUNA16 FROC curve, the sensitivities at 1/8 ... 8 FPs per scan, and CPM (their mean).

    ``predictions``: series_uid, coord_x, coord_y, coord_z (world mm), probability (a LUNA16 submission's
    seriesuid/coordX/... names are accepted too). ``annotations`` / ``annotations_excluded``: LUNA16's
    seriesuid, coordX, coordY, coordZ, diameter_mm. Only rows of ``val_series_uids`` count, and every val
    scan divides the FP count, with or without candidates. Rules (official script): per scan the
    candidates strictly above the ``max_per_scan + 1``-th highest probability (``None``: no cut); a hit is
    distance < diameter / 2 (negative diameter: 10 mm); a candidate may hit several nodules; each nodule
    scores once with its best hit; a candidate hitting no nodule but an excluded finding is dropped;
    every other candidate is a false positive.
    """
    scans, entries = _froc_entries(predictions, annotations, val_series_uids, annotations_excluded, max_per_scan)
    n_scans = len(scans)
    n_nodules = int(entries.nodules_per_scan.sum())
    _, scores, last_of_run, is_hit = _sorted_entries(entries)
    fp_per_scan, sensitivity = _curve_points(is_hit, np.ones(scores.size), last_of_run, n_scans, n_nodules)
    curve = pd.DataFrame({
        "threshold": np.r_[np.inf, scores[last_of_run]],
        "fp_per_scan": fp_per_scan,
        "sensitivity": sensitivity,
    })
    values = _sensitivities(fp_per_scan, sensitivity)
    return FrocResult(
        curve=curve,
        sensitivities={name: float(value) for name, value in zip(SENSITIVITY_COLUMNS, values)},
        cpm=float(values.mean()),
        n_nodules=n_nodules,
        n_hit=int(entries.is_hit.sum()),
        n_scans=n_scans,
        n_fp=int((~entries.is_hit).sum()),
        n_candidates=entries.n_candidates,
        n_ignored_excluded=entries.n_ignored_excluded,
    )


def froc_bootstrap(
    predictions: pd.DataFrame,
    annotations: pd.DataFrame,
    val_series_uids: Iterable[str],
    annotations_excluded: pd.DataFrame | None = None,
    max_per_scan: int | None = 100,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Bootstrap confidence intervals of CPM and the seven sensitivities, resampling val scans.

    As the official script: each sample draws the val scans with replacement (a scan drawn twice brings
    its nodules and false positives twice); the FP divisor stays the number of val scans. Deterministic
    for a given ``seed``. Returns ``{"cpm": (low, high), "sens_at_0.125": (low, high), ...}``, the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles (2.5 / 97.5 by default); NaN where
    every sample lacks nodules.
    """
    if n_bootstrap < 1:
        raise MetricsError(f"n_bootstrap: must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"confidence: must lie in (0, 1), got {confidence}")
    scans, entries = _froc_entries(predictions, annotations, val_series_uids, annotations_excluded, max_per_scan)
    n_scans = len(scans)
    order, _, last_of_run, is_hit = _sorted_entries(entries)
    entry_scan = entries.scan[order]
    rng = np.random.default_rng(seed)
    values = np.empty((n_bootstrap, len(FROC_RATES)), dtype=np.float64)
    for sample in range(n_bootstrap):
        draws = np.bincount(rng.integers(0, n_scans, size=n_scans), minlength=n_scans).astype(np.float64)
        n_nodules = float(draws @ entries.nodules_per_scan)
        fp_per_scan, sensitivity = _curve_points(is_hit, draws[entry_scan], last_of_run, n_scans, n_nodules)
        values[sample] = _sensitivities(fp_per_scan, sensitivity)
    cpm = values.mean(axis=1)
    percentiles = [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)]
    result: dict[str, tuple[float, float]] = {}
    for name, column in [("cpm", cpm)] + [(n, values[:, i]) for i, n in enumerate(SENSITIVITY_COLUMNS)]:
        finite = column[~np.isnan(column)]
        if finite.size:
            low, high = np.percentile(finite, percentiles)
            result[name] = (float(low), float(high))
        else:
            result[name] = (math.nan, math.nan)
    return result


def combine_metrics(row: Mapping[str, object], froc_result: FrocResult | None, *, fold: int | str = "all",
                    threshold: float = CLASSIFICATION_THRESHOLD) -> dict[str, object]:
    """One metrics.tsv row (keys in :data:`METRICS_COLUMNS` order): the fold, the metric row, its threshold,
    then CPM and the seven sensitivities (NaN when ``froc_result`` is None, e.g. without annotations)."""
    combined: dict[str, object] = {"fold": fold}
    combined.update({column: row[column] for column in HISTORY_COLUMNS})
    combined["threshold"] = float(threshold)
    combined["cpm"] = froc_result.cpm if froc_result is not None else math.nan
    for column in SENSITIVITY_COLUMNS:
        combined[column] = froc_result.sensitivities[column] if froc_result is not None else math.nan
    return combined
