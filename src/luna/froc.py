"""FROC and CPM exactly as the official LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``) defines them,
pure functions (numpy and pandas, no I/O), vectorised per scan so that LUNA16's 750k candidates take seconds.

The rules (docs/design.md, "froc.tsv"): every evaluated scan counts in the FP-per-scan divisor, the top 100
candidates per scan (strictly above the 101st probability), a hit is distance < radius (a negative diameter
means 10 mm), a candidate inside two nodules hits both, each nodule scores once with its best probability,
candidates on excluded findings that hit no nodule are dropped; the seven sensitivities at 1/8 ... 8 FPs per
scan are linear interpolations (past the end: the last value) and CPM is their mean. A sensitivity with no
nodules is ``NaN``, never 0. Departures:

* when there are nodules but no candidate hits any, the sensitivities and CPM are 0, where the official
  script's ``roc_curve`` divides 0 by 0 and reports NaN;
* FPs per scan are counted exactly (false positives / scans): where the curve steps up at exactly one of the
  seven rates, the top of the step is read. The official script's ``fpr * negatives / scans`` lands a float
  rounding off the rate for some counts and then reads the step's bottom (~1e-4 of CPM on LUNA16);
* the official script reads its sensitivities off a 10,001-point grid (its forks compute CPM from it); the
  seven rates are interpolated directly here;
* bootstrap samples that draw no nodule are left out and counted (:func:`froc_bootstrap`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from luna.metrics import MetricsError

__all__ = ["FROC_RATES", "SENSITIVITY_COLUMNS", "BootstrapInterval", "FrocResult", "froc", "froc_bootstrap",
           "froc_bootstrap_samples", "on_findings"]

FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which LUNA16 reads the sensitivity; CPM is the mean of the seven."""

SENSITIVITY_COLUMNS: list[str] = [f"sens_at_{rate:g}" for rate in FROC_RATES]

FROC_PREDICTION_COLUMNS = ("series_uid", "coord_x", "coord_y", "coord_z", "probability")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
"""The official script replaces a negative diameter (``-1`` on most excluded findings) by 10 mm."""


@dataclass(frozen=True)
class FrocResult:
    """The FROC analysis of one prediction set.

    ``curve``: columns threshold, fp_per_scan, sensitivity; the first row is (inf, 0, 0) (NaN without nodules),
    then one row per distinct threshold, descending. ``sensitivities``: keyed ``sens_at_0.125`` ... ``sens_at_8``.
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
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))  # missing, non-numeric, NaN or infinite
        if bad.any():
            position = int(np.flatnonzero(bad)[0])
            value = frame[column].iloc[position]
            shown = repr(value) if isinstance(value, str) else str(value)  # 'abc', nan, inf (not np.float64(nan))
            raise MetricsError(f"{name}: row {position}: {column} = {shown} is not a finite number")
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
    return _check_frame(predictions, "predictions", FROC_PREDICTION_COLUMNS, FROC_PREDICTION_COLUMNS[1:])


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
    # x^2 + y^2 + z^2 summed left to right, as the official script (its math.pow may round a square one ulp
    # away from the exact product: the side of a point within a rounding step of the sphere can depend on libm)
    squared = delta**2
    return (squared[..., 0] + squared[..., 1]) + squared[..., 2] < radius_squared[None, :]


def on_findings(candidates: pd.DataFrame, findings: pd.DataFrame) -> np.ndarray:
    """Per candidate (series_uid, coord_x/y/z), whether it lies on one of the findings (a LUNA16 annotations
    table: seriesuid, coordX/Y/Z, diameter_mm) by FROC's own rule: distance < radius, a negative diameter
    meaning 10 mm. What luna-train's ``--skip-excluded`` leaves out of training."""
    on = np.zeros(len(candidates), dtype=bool)
    if candidates.empty or findings.empty:
        return on
    xyz = candidates[["coord_x", "coord_y", "coord_z"]].to_numpy(dtype=np.float64)
    rows_of = candidates.groupby(candidates["series_uid"].astype(str).to_numpy(), sort=False).indices
    for uid, found in findings.groupby(findings["seriesuid"].astype(str), sort=False):
        rows = rows_of.get(uid)
        if rows is not None:
            centres = found[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
            on[rows] = _hits(xyz[rows], centres, found["diameter_mm"].to_numpy(dtype=np.float64)).any(axis=1)
    return on


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


class BootstrapInterval(NamedTuple):
    """One metric's bootstrap interval and the number of samples it rests on."""

    low: float
    high: float
    n_samples: int
    """Samples in which the metric is defined: those that drew at least one nodule (a sample of nodule-free
    scans has no sensitivity); fewer than requested only when some test scans have no nodules."""


def froc_bootstrap_samples(
    predictions: pd.DataFrame,
    annotations: pd.DataFrame,
    val_series_uids: Iterable[str],
    annotations_excluded: pd.DataFrame | None = None,
    max_per_scan: int | None = 100,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """(n_bootstrap, 7): the seven sensitivities of each scan-bootstrap sample of :func:`froc_bootstrap` (NaN in a
    sample that drew no nodule); CPM is a row's mean. The draws depend only on ``seed`` and the number of val
    scans, so two sets of predictions for the same scans get the same samples: their differences are paired."""
    if n_bootstrap < 1:
        raise MetricsError(f"n_bootstrap: must be >= 1, got {n_bootstrap}")
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
    return values


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
) -> dict[str, BootstrapInterval]:
    """Bootstrap confidence intervals of CPM and the seven sensitivities, resampling val scans.

    As the official script: each sample draws the val scans with replacement (a scan drawn twice brings
    its nodules and false positives twice); the FP divisor stays the number of val scans. Deterministic
    for a given ``seed``. Returns ``{"cpm": (low, high, n_samples), "sens_at_0.125": ..., ...}``: the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles (2.5 / 97.5 by default, numpy's linear
    interpolation) of the samples that drew a nodule, and their number. Unlike the official script, which
    sorts the undefined sensitivities of nodule-free samples last and reads fixed positions, such samples
    are left out (the interval is conditional on drawing a nodule) and ``n_samples`` says how many remain;
    NaN when none does.
    """
    if n_bootstrap < 1:  # checked first, as before froc_bootstrap_samples took the loop
        raise MetricsError(f"n_bootstrap: must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"confidence: must lie in (0, 1), got {confidence}")
    values = froc_bootstrap_samples(predictions, annotations, val_series_uids, annotations_excluded, max_per_scan,
                                    n_bootstrap=n_bootstrap, seed=seed)
    cpm = values.mean(axis=1)
    percentiles = [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)]
    result: dict[str, BootstrapInterval] = {}
    for name, column in [("cpm", cpm)] + [(n, values[:, i]) for i, n in enumerate(SENSITIVITY_COLUMNS)]:
        finite = column[~np.isnan(column)]
        if finite.size:
            low, high = np.percentile(finite, percentiles)
            result[name] = BootstrapInterval(float(low), float(high), int(finite.size))
        else:
            result[name] = BootstrapInterval(math.nan, math.nan, 0)
    return result
