"""The evaluation stage: the test-fold predictions of every fold run, pooled into one report.

``luna-evaluate --folds results/folds/0 results/folds/1 ... --splits results/splits.tsv --annotations
annotations.csv --out results/validation`` reads each fold folder's ``model.pt`` (its test fold, kept epoch
and operating threshold), ``predictions.tsv`` and ``history.tsv``, and writes into ``--out`` (each file
atomically; docs/design.md has the contracts):

* ``predictions.tsv`` — every fold's predictions, in fold order (whatever the ``--folds`` order): the predict
  columns plus ``fold``;
* ``metrics.tsv`` — one row per fold (``fold`` = N: its epoch, its threshold, FROC/CPM over its test scans)
  and one pooled row (``fold`` = ``all``: every prediction at its own fold's threshold, FROC/CPM over every
  test scan run; ``epoch`` and ``threshold`` NaN there when the folds differ);
* ``metrics_ci.tsv`` — bootstrap confidence intervals (scans resampled, as LUNA16's script) of CPM and the
  seven sensitivities, per fold and pooled;
* ``froc.tsv`` — the pooled FROC curve, every test scan in the FP-per-scan divisor;
* ``submission.csv`` — LUNA16's ``seriesuid,coordX,coordY,coordZ,probability`` over all scans run;
* ``roc.png``, ``pr.png``, ``froc.png`` (pooled) and ``training_curves.png`` (one row of panels per fold).

Three modes follow from the inputs: labelled candidates give the classification metrics, ROC and PR;
annotations give FROC/CPM; with neither only the pooled predictions and the submission are written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from luna.luna16 import TableError, read_annotations_csv
from luna.io import (NA_REP, OutputError, check_not_an_input, check_writable_dir, locked, named_output,
                     temp_files_of, write_tsv)
from luna.app import StageApp
from luna.froc import SENSITIVITY_COLUMNS, BootstrapInterval, FrocResult, froc, froc_bootstrap
from luna.metrics import HISTORY_COLUMNS, MetricsError, metric_row
from luna.model import CheckpointError, load_checkpoint, not_held_out
from luna.splits import SplitsError, read_splits_tsv
from luna.tables import file_line, numeric_column, read_tsv

logger = logging.getLogger(__name__)

METRICS_COLUMNS: list[str] = ["fold"] + HISTORY_COLUMNS + ["threshold", "cpm"] + SENSITIVITY_COLUMNS
"""metrics.tsv: one row per test fold (``fold`` = N) and one pooled row (``fold`` = ``all``); ``threshold`` is
the operating point its threshold metrics use (NaN in the pooled row when the folds' thresholds differ)."""
PREDICTION_COLUMNS = ["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z", "is_nodule", "diameter_mm",
                      "probability", "loss", "fold"]
"""predictions.tsv, per fold and pooled: one row per cropped candidate of the scans predicted."""
SUBMISSION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
FROC_COLUMNS = ["threshold", "fp_per_scan", "sensitivity"]
DEFAULT_BOOTSTRAP = 1000  # resamples of the test scans for metrics_ci.tsv
MAX_BOOTSTRAP = 100_000  # each resample recomputes every fold's FROC: 1,000 take seconds, this many hours
CI_COLUMNS = ["fold", "metric", "value", "ci_low", "ci_high", "confidence", "n_bootstrap", "seed"]
HISTORY_REQUIRED = ["epoch", "split", "loss_all", "precision", "recall", "f1"]
LOCK_NAME = ".luna-evaluate.lock"
OUTPUT_NAMES = ("predictions.tsv", "metrics.tsv", "froc.tsv", "submission.csv", "metrics_ci.tsv",
                "roc.png", "pr.png", "froc.png", "training_curves.png")
"""Every file evaluation may write; one that a run does not write is removed, so no stale result survives."""
CONFIDENCE = 0.95


class EvaluationError(ValueError):
    """Input the evaluation cannot use; the one-line message names the file, row or value."""


@dataclass
class FoldPredictions:
    """One fold's share of the report: its predictions, its test scans (the FROC divisor), its model's
    operating threshold and kept epoch, and its training history (optional)."""

    fold: int
    predictions: pd.DataFrame
    scans: list[str]
    threshold: float
    epoch: int
    history: pd.DataFrame | None = None
    source: str = ""
    split: str = "test"  # what the rows are: the test fold, or (luna-validate --scans) "selection" / "all"
    code: str = ""  # the luna sources the model was trained with (model.pt provenance.source_sha256)


@dataclass
class EvaluationResult:
    """What a run wrote and computed (for tests, benchmarks and notebooks)."""

    out_dir: Path
    written: list[Path]
    predictions: pd.DataFrame
    metrics: pd.DataFrame | None = None
    froc: dict[str, FrocResult] = field(default_factory=dict)
    intervals: dict[str, dict[str, BootstrapInterval]] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

def read_predictions_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """A predictions.tsv, checked: its columns, numbers where numbers belong (is_nodule and loss may be empty
    together, for a candidate list without classes)."""
    missing = {column: [""] for column in PREDICTION_COLUMNS}  # an empty cell; a written "nan" is a bad value
    missing.update({"is_nodule": ["", NA_REP], "loss": ["", NA_REP]})  # no class: luna writes NaN there
    frame = read_tsv(path, what="predictions file", error=EvaluationError, required=PREDICTION_COLUMNS,
                     dtype={"series_uid": str}, keep_default_na=False, na_values=missing)
    for column in ("candidate_id", "coord_x", "coord_y", "coord_z", "diameter_mm", "probability", "fold"):
        frame[column] = numeric_column(frame, column, path, EvaluationError)
    for column in ("is_nodule", "loss"):
        frame[column] = numeric_column(frame, column, path, EvaluationError, allow_missing=True)
    _check_prediction_values(frame, path)
    frame["candidate_id"] = frame["candidate_id"].astype(np.int64)
    frame["fold"] = frame["fold"].astype(np.int64)
    return frame[PREDICTION_COLUMNS]


def _check_prediction_values(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Values the metrics can use: probabilities in [0, 1], finite coordinates, whole ids and folds, classes 0/1,
    each candidate_id once (the key of the pooled predictions and the submission)."""
    def first_bad(column: str, bad: np.ndarray, expected: str) -> None:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EvaluationError(f"{path}:{file_line(path, i)}: {column} = {frame[column].iloc[i]:g}, "
                                  f"expected {expected}")

    unlabelled = frame["is_nodule"].isna().to_numpy()
    if unlabelled.any() and not unlabelled.all():  # within one file: name its line (across files: _labelled)
        i = int(np.flatnonzero(unlabelled != unlabelled[0])[0])  # the first row unlike the first
        raise EvaluationError(f"{path}:{file_line(path, i)}: is_nodule is {'empty' if unlabelled[i] else 'given'} "
                              f"here but not on line {file_line(path, 0)}; a file holds the predictions of one "
                              "candidate list")
    probability = frame["probability"].to_numpy(dtype=np.float64)
    first_bad("probability", ~((probability >= 0.0) & (probability <= 1.0)), "a number in [0, 1]")
    for column in ("coord_x", "coord_y", "coord_z", "diameter_mm"):
        first_bad(column, ~np.isfinite(frame[column].to_numpy(dtype=np.float64)), "a finite number")
    for column in ("candidate_id", "fold"):
        values = frame[column].to_numpy(dtype=np.float64)
        first_bad(column, ~((values == np.floor(values)) & (values >= 0) & (values < 2**62)),
                  "a whole number >= 0")
    is_nodule = frame["is_nodule"].to_numpy(dtype=np.float64)
    first_bad("is_nodule", ~(np.isin(is_nodule, (0.0, 1.0)) | np.isnan(is_nodule)), "0, 1 or empty")
    loss = frame["loss"].to_numpy(dtype=np.float64)
    first_bad("loss", ~np.isnan(is_nodule) & ~(np.isfinite(loss) & (loss >= 0.0)),
              "a finite number >= 0 (it may be empty only where is_nodule is)")
    repeated = frame["candidate_id"].duplicated().to_numpy()
    if repeated.any():
        i = int(np.flatnonzero(repeated)[0])
        first = int(np.flatnonzero((frame["candidate_id"] == frame["candidate_id"].iloc[i]).to_numpy())[0])
        raise EvaluationError(f"{path}:{file_line(path, i)}: candidate_id {int(frame['candidate_id'].iloc[i])} "
                              f"repeats line {file_line(path, first)}; candidate ids must be unique")


def check_disjoint_folds(folds: Sequence[FoldPredictions]) -> None:
    """No candidate_id in two folds' predictions (they come from one candidate list, each scan in one fold)."""
    seen: dict[int, tuple[str, int]] = {}
    for fold in folds:
        where = Path(fold.source) / "predictions.tsv"
        for row, candidate_id in enumerate(fold.predictions["candidate_id"].tolist()):
            if candidate_id in seen:
                other, other_row = seen[candidate_id]
                raise EvaluationError(f"{where}:{file_line(where, row)}: candidate_id {candidate_id} is also in "
                                      f"{other}:{file_line(other, other_row)}; the folds must come from one "
                                      "candidate list")
            seen[candidate_id] = (str(where), row)


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """history.tsv for the training-curves plot (columns checked)."""
    history = read_tsv(path, what="history file", error=EvaluationError, required=HISTORY_REQUIRED)
    for column in HISTORY_REQUIRED:
        if column != "split":
            history[column] = numeric_column(history, column, path, EvaluationError, allow_missing=True)
    return history


def read_annotations(path: str | os.PathLike | None, excluded: bool = False) -> pd.DataFrame | None:
    """A LUNA16 annotations(_excluded).csv, checked (TableError names file and line); None without a path."""
    if path is None:
        return None
    return read_annotations_csv(path, allow_negative=excluded)


def read_fold_dir(folder: str | os.PathLike, splits: pd.DataFrame, splits_path: str | os.PathLike) -> FoldPredictions:
    """One fold folder (model.pt, predictions.tsv, history.tsv if present), checked against splits.tsv."""
    folder = Path(folder)
    checkpoint = load_checkpoint(folder / "model.pt")
    if "test_fold" not in checkpoint:
        raise EvaluationError(f"{folder / 'model.pt'}: no test fold recorded (a model from luna-train with --test-fold "
                              "is needed)")
    fold = int(checkpoint["test_fold"])
    predictions = read_predictions_tsv(folder / "predictions.tsv")
    other = predictions["fold"] != fold
    if other.any():
        line = file_line(folder / "predictions.tsv", int(np.flatnonzero(other.to_numpy())[0]))
        raise EvaluationError(f"{folder / 'predictions.tsv'}:{line}: fold "
                              f"{int(predictions['fold'][other].iloc[0])}, but model.pt was trained for test fold {fold}")
    scans = splits.loc[splits["fold"] == fold, "series_uid"].tolist()
    if not scans:
        raise EvaluationError(f"{splits_path}: test fold {fold} of {folder} has no scans")
    if predictions.empty:  # luna-predict writes every candidate of the fold and refuses a fold without any
        raise EvaluationError(f"{folder / 'predictions.tsv'}: no rows, for test fold {fold}'s {len(scans)} scans (a "
                              "truncated file? rerun luna-predict)")
    outside = ~predictions["series_uid"].isin(set(scans))
    if outside.any():
        line = file_line(folder / "predictions.tsv", int(np.flatnonzero(outside.to_numpy())[0]))
        uid = predictions["series_uid"][outside].iloc[0]
        if pd.isna(uid):
            raise EvaluationError(f"{folder / 'predictions.tsv'}:{line}: series_uid is empty")
        raise EvaluationError(f"{folder / 'predictions.tsv'}:{line}: scan {uid} is not in test fold {fold} of "
                              f"{splits_path}")
    leak = not_held_out(scans, checkpoint, model_path=folder / "model.pt", splits_path=splits_path,
                        fold_name=f"test fold {fold}", verb="evaluate")  # a stale or edited splits.tsv
    if leak:
        raise EvaluationError(leak)
    history_path = folder / "history.tsv"
    history = read_history(history_path) if history_path.is_file() else None
    return FoldPredictions(fold, predictions, scans, float(checkpoint.get("threshold", 0.5)), int(checkpoint["epoch"]),
                           history, str(folder), code=str(checkpoint.get("provenance", {}).get("source_sha256", "")))


# ----------------------------------------------------------------------------------------------------
# the computation
# ----------------------------------------------------------------------------------------------------

def _folds_labelled(folds: Sequence[FoldPredictions], pooled: pd.DataFrame) -> bool:
    """True when every fold's candidates have a class, False when none has; a mix names the first fold unlike the
    first (each file is all one or the other: _check_prediction_values). ``pooled``: the folds' rows together."""
    given = [(f, not f.predictions["is_nodule"].isna().all()) for f in folds if not f.predictions.empty]
    for fold, kind in given[1:]:
        first, first_kind = given[0]
        if kind != first_kind:
            raise EvaluationError(
                f"{Path(fold.source) / 'predictions.tsv'}: the candidates {'have a class' if kind else 'have no class'}"
                f", those of {Path(first.source) / 'predictions.tsv'} {'have one' if first_kind else 'have none'}; "
                "pool the predictions of one candidate list")
    return _labelled(pooled, "predictions")


def _labelled(predictions: pd.DataFrame, what: str) -> bool:
    """True when every row has a class, False when none has; a mix is an error naming the first unlabelled row."""
    missing = predictions["is_nodule"].isna().to_numpy()
    if missing.all() and len(predictions):
        return False
    if missing.any():
        raise EvaluationError(f"{what}: candidate_id {int(predictions['candidate_id'][missing].iloc[0])} has no class "
                              "while other candidates have one; use one candidate list")
    return True


def _shared(values: Sequence[float]) -> float:
    """The one value all folds share, NaN when they differ."""
    distinct = set(float(v) for v in values)
    return distinct.pop() if len(distinct) == 1 else math.nan


def _unlabelled_row(n: int, epoch: float, split: str) -> dict[str, object]:
    row: dict[str, object] = {column: math.nan for column in HISTORY_COLUMNS}
    row.update({"epoch": epoch, "split": split, "n": int(n)})
    return row


def evaluate_rows(folds: Sequence[FoldPredictions], annotations: pd.DataFrame | None,
                  excluded: pd.DataFrame | None, *, max_per_scan: int | None, bootstrap: int = 0,
                  seed: int = 0) -> tuple[pd.DataFrame, dict[str, FrocResult], dict[str, dict[str, tuple[float, float]]]]:
    """metrics.tsv rows (one per fold, then the pooled ``all``), the FROC results and the bootstrap intervals,
    keyed by the fold as written (``"0"``, ..., ``"all"``)."""
    pooled = pd.concat([f.predictions for f in folds], ignore_index=True)
    labelled = _labelled(pooled, "predictions")
    groups: list[tuple[str, pd.DataFrame, list[str], np.ndarray, float, float, str]] = []
    for f in folds:
        groups.append((str(f.fold), f.predictions, f.scans, np.full(len(f.predictions), f.threshold), f.threshold,
                       float(f.epoch), f.split))
    thresholds = np.concatenate([np.full(len(f.predictions), f.threshold) for f in folds])
    splits = sorted({f.split for f in folds})
    groups.append(("all", pooled, [uid for f in folds for uid in f.scans], thresholds,
                   _shared([f.threshold for f in folds]), _shared([f.epoch for f in folds]), "+".join(splits)))
    rows, frocs, intervals = [], {}, {}
    for name, frame, scans, per_row_threshold, threshold, epoch, split in groups:
        if labelled:
            row = metric_row(frame["is_nodule"].to_numpy(), frame["probability"].to_numpy(), frame["loss"].to_numpy(),
                             epoch=epoch, split=split, threshold=per_row_threshold)
        else:
            row = _unlabelled_row(len(frame), epoch, split)
        result = None
        if annotations is not None:
            cut = max_per_scan if max_per_scan and max_per_scan > 0 else None
            result = froc(frame, annotations, scans, excluded, max_per_scan=cut)
            frocs[name] = result
            if bootstrap > 0:
                intervals[name] = froc_bootstrap(frame, annotations, scans, excluded, cut, n_bootstrap=bootstrap,
                                                 seed=seed, confidence=CONFIDENCE)
                used = intervals[name]["cpm"].n_samples
                if result.n_nodules and used < bootstrap:
                    logger.warning("fold %s: %d of %d bootstrap samples drew no nodule and are left out of its "
                                   "intervals (metrics_ci.tsv n_bootstrap %d)", name, bootstrap - used, bootstrap, used)
        rows.append(combine_metrics(row, result, fold=name, threshold=threshold))
    metrics = pd.DataFrame(rows)[METRICS_COLUMNS]
    metrics["epoch"] = metrics["epoch"].astype("Int64")  # whole numbers; NaN in a pooled row of differing folds
    return metrics, frocs, intervals


def combine_metrics(row: Mapping[str, object], froc_result: FrocResult | None, *, fold: int | str = "all",
                    threshold: float = 0.5) -> dict[str, object]:
    """One metrics.tsv row (keys in :data:`METRICS_COLUMNS` order): the fold, the metric row, its threshold,
    then CPM and the seven sensitivities (NaN when ``froc_result`` is None, e.g. without annotations)."""
    combined: dict[str, object] = {"fold": fold}
    combined.update({column: row[column] for column in HISTORY_COLUMNS})
    combined["threshold"] = float(threshold)
    combined["cpm"] = froc_result.cpm if froc_result is not None else math.nan
    for column in SENSITIVITY_COLUMNS:
        combined[column] = froc_result.sensitivities[column] if froc_result is not None else math.nan
    return combined


def submission_frame(predictions: pd.DataFrame) -> pd.DataFrame:
    """LUNA16's submission table (seriesuid, coordX, coordY, coordZ, probability) from predictions."""
    return pd.DataFrame({
        "seriesuid": predictions["series_uid"].to_numpy(),
        "coordX": predictions["coord_x"].to_numpy(),
        "coordY": predictions["coord_y"].to_numpy(),
        "coordZ": predictions["coord_z"].to_numpy(),
        "probability": predictions["probability"].to_numpy(),
    })[SUBMISSION_COLUMNS]


def ci_frame(metrics: pd.DataFrame, intervals: dict[str, dict[str, BootstrapInterval]], seed: int) -> pd.DataFrame:
    """metrics_ci.tsv: per fold and pooled, one row per FROC metric (cpm, sens_at_*) with its bootstrap interval
    and the number of samples it rests on (``n_bootstrap``: those that drew a nodule)."""
    records = []
    for _, row in metrics.iterrows():
        fold = str(row["fold"])
        for name in ["cpm", *SENSITIVITY_COLUMNS]:
            interval = intervals[fold][name]
            records.append({"fold": fold, "metric": name, "value": float(row[name]), "ci_low": interval.low,
                            "ci_high": interval.high, "confidence": CONFIDENCE, "n_bootstrap": interval.n_samples,
                            "seed": int(seed)})
    return pd.DataFrame(records, columns=CI_COLUMNS)


def write_report(folds: Sequence[FoldPredictions], out_dir: str | os.PathLike, annotations: pd.DataFrame | None,
                 excluded: pd.DataFrame | None, *, max_per_scan: int | None = 100, bootstrap: int = 0,
                 seed: int = 0) -> EvaluationResult:
    """Pool the folds and write every report file into ``out_dir`` (see the module docstring). Each file is written
    atomically, and the earlier report's files are removed before the first is written: on a failure (a full disk,
    SIGTERM) no report file is left in ``out_dir``, and a run killed outright leaves some of this run's files but
    none of an earlier one, so nothing there mixes two runs (a symlinked report file is written through and its
    link kept; one this run does not write is unlinked, its target left alone). One run at a time per ``out_dir``
    (a lock file)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    seen: dict[int, str] = {}
    for f in folds:
        if f.fold in seen:
            raise EvaluationError(f"{f.source}: test fold {f.fold} given twice (also {seen[f.fold]})")
        seen[f.fold] = f.source
    check_disjoint_folds(folds)
    folds = sorted(folds, key=lambda f: f.fold)  # the pooled rows, and so the bootstrap draws, in one order
    pooled = pd.concat([f.predictions for f in folds], ignore_index=True)[PREDICTION_COLUMNS]
    result = EvaluationResult(out_dir, [], pooled)
    # every input check and every number before the output folder is touched: a refused input leaves an earlier
    # report as it was
    labelled = _folds_labelled(folds, pooled)
    if labelled or annotations is not None:
        result.metrics, result.froc, result.intervals = evaluate_rows(
            folds, annotations, excluded, max_per_scan=max_per_scan, bootstrap=bootstrap, seed=seed)
    check_writable_dir(out_dir, "output folder")
    lock = out_dir / LOCK_NAME
    with locked(lock, f"{out_dir}: another luna-evaluate run is writing its report there ({lock} is locked); wait "
                      "for it, or give this run its own --out"):
        _sweep_temp_files(out_dir)
        if _remove_report(out_dir, links=False):  # a kill -9 midway leaves this run's files only
            logger.info("removed the earlier report's files from %s", out_dir)
        try:
            _write_files(result, folds, labelled, annotations, bootstrap=bootstrap, seed=seed)
        except BaseException:
            _remove_report(out_dir)  # no half report: none at all
            raise
        if _remove_report(out_dir, keep=result.written):  # symlinks to an earlier run's files this run did not write
            logger.info("removed the earlier report's links this run does not write from %s", out_dir)
    result.seconds = time.perf_counter() - t0
    _log_summary(result, folds)
    return result


def _remove_report(out_dir: Path, *, keep: Sequence[Path] = (), links: bool = True) -> int:
    """Remove the report files of ``out_dir`` but those in ``keep``; a symlink is removed itself (its target
    outside the folder is left alone), and with ``links`` False it is kept: the new file is written through it, as
    :func:`luna.io.atomic_path` does. Returns how many were removed."""
    kept = {Path(path).name for path in keep}
    removed = 0
    for name in OUTPUT_NAMES:
        path = out_dir / name
        if name in kept or (path.is_symlink() and not links) or not (path.is_symlink() or path.is_file()):
            continue
        path.unlink()
        removed += 1
    return removed


def _sweep_temp_files(out_dir: Path) -> None:
    """Remove the temp files a killed run left (``.<name>.<pid>.tmp``, :func:`luna.io.tmp_path_for`): with the
    folder's lock held no other run is writing them."""
    for name in OUTPUT_NAMES:
        for tmp in temp_files_of(out_dir / name):
            logger.info("removing %s, left by a run that was killed", tmp)
            tmp.unlink()


def _write_files(result: EvaluationResult, folds: Sequence[FoldPredictions], labelled: bool,
                 annotations: pd.DataFrame | None, *, bootstrap: int, seed: int) -> None:
    from luna import plots

    out_dir, pooled, written = result.out_dir, result.predictions, result.written
    written.append(write_tsv(pooled, out_dir / "predictions.tsv"))
    written.append(write_tsv(submission_frame(pooled), out_dir / "submission.csv", sep=","))
    if not labelled and annotations is None:
        logger.warning("predict-only: the candidates have no class and no annotations were given, so no "
                       "metrics.tsv, froc.tsv or plots; wrote predictions and submission")
    else:
        if annotations is None:
            logger.warning("no annotations: no FROC, CPM NaN in metrics.tsv")
        if not labelled:
            logger.warning("the candidates have no class: metrics.tsv holds FROC/CPM only, the classification "
                           "columns are NaN; no ROC or precision-recall plot")
        metrics, frocs, intervals = result.metrics, result.froc, result.intervals
        written.append(write_tsv(metrics, out_dir / "metrics.tsv"))
        if intervals:
            written.append(write_tsv(ci_frame(metrics, intervals, seed), out_dir / "metrics_ci.tsv"))
        pooled_row = metrics.iloc[-1].to_dict()
        if "all" in frocs:
            written.append(write_tsv(frocs["all"].curve[FROC_COLUMNS], out_dir / "froc.tsv"))
            written.append(plots.plot_froc(frocs["all"], out_dir / "froc.png", split=str(pooled_row["split"])))
        if labelled:
            labels = pooled["is_nodule"].to_numpy()
            probabilities = pooled["probability"].to_numpy()
            written.append(plots.plot_roc(labels, probabilities, pooled_row, out_dir / "roc.png"))
            written.append(plots.plot_pr(labels, probabilities, pooled_row, out_dir / "pr.png"))
        curves = [(f.fold, f.history, f.epoch) for f in folds if f.history is not None]
        if curves:
            written.append(plots.plot_training_curves(curves, out_dir / "training_curves.png"))


def _log_summary(result: EvaluationResult, folds: Sequence[FoldPredictions]) -> None:
    if result.metrics is not None:
        for _, m in result.metrics.iterrows():
            name = "pooled" if m["fold"] == "all" else f"fold {m['fold']}"
            parts = [f"{name}: {int(m['n'])} candidates"]
            if not math.isnan(float(m["n_pos"])):
                parts.append(f"{int(m['n_pos'])} positive, AUC {m['auc']:.4f}, at threshold {m['threshold']:.4g} "
                             f"recall {m['recall']:.4f} precision {m['precision']:.4f}")
            fr = result.froc.get(str(m["fold"]))
            if fr is not None:
                ci = result.intervals.get(str(m["fold"]), {}).get("cpm")
                parts.append(f"CPM {fr.cpm:.4f}" + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
                             + f", {fr.n_hit} of {fr.n_nodules} nodules hit, {fr.n_fp} false positives on "
                             f"{fr.n_scans} scans")
            logger.info("; ".join(parts))
    logger.info("wrote %s in %.1f s (%d fold(s)): %s", result.out_dir, result.seconds, len(folds),
                ", ".join(path.name for path in result.written))


# ----------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------

def add_report_options(parser: argparse.ArgumentParser) -> None:
    """The options evaluation shares with luna-validate: annotations, bootstrap, FROC cut."""
    parser.add_argument("--annotations", default=None,
                        help="LUNA16 annotations.csv for FROC/CPM (filtered to the test scans); default: no FROC")
    parser.add_argument("--annotations-excluded", default=None,
                        help="LUNA16 annotations_excluded.csv: candidates on these findings count as neither hit nor "
                             "false positive")
    parser.add_argument("--bootstrap", type=int, default=None,  # None: not given (no warning without annotations)
                        help="bootstrap samples (test scans resampled) for the CPM intervals in metrics_ci.tsv; "
                             f"0 = off, at most {MAX_BOOTSTRAP}; default: {DEFAULT_BOOTSTRAP}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--max-per-scan", type=int, default=100,
                        help="FROC: candidates kept per scan (LUNA16: 100); 0 = all")


def check_report_not_an_input(out_dir: str | os.PathLike,
                              inputs: dict[str, Sequence[str | os.PathLike | None]]) -> None:
    """No report file in ``out_dir`` may be one of the ``inputs`` (option -> paths): --out a fold folder would
    replace its predictions.tsv by the pooled rows (:func:`luna.io.check_not_an_input`)."""
    for name in OUTPUT_NAMES:
        check_not_an_input(Path(out_dir) / name, inputs, what="the report file")


def check_report_options(args: argparse.Namespace) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Check the shared options and read the annotation tables (before any long work)."""
    given = args.bootstrap is not None
    if not given:
        args.bootstrap = DEFAULT_BOOTSTRAP
    if not 0 <= args.bootstrap <= MAX_BOOTSTRAP:
        raise EvaluationError(f"--bootstrap must be >= 0 and <= {MAX_BOOTSTRAP}, got {args.bootstrap}")
    if args.max_per_scan < 0:
        raise EvaluationError(f"--max-per-scan must be >= 0, got {args.max_per_scan}")
    if args.seed < 0:
        raise EvaluationError(f"--seed must be >= 0, got {args.seed}")
    annotations = read_annotations(args.annotations)
    excluded = read_annotations(args.annotations_excluded, excluded=True)
    if excluded is not None and annotations is None:
        raise EvaluationError("--annotations-excluded needs --annotations (the nodules FROC is measured on)")
    if given and args.bootstrap and annotations is None:
        logger.warning("--bootstrap %d ignored: the bootstrap is of CPM, which needs --annotations", args.bootstrap)
    return annotations, excluded


def note_mixed_code(folds: Sequence[FoldPredictions]) -> None:
    """Warn when the pooled folds' models were trained with different luna sources: Snakemake reruns nothing
    when the package changes, so a fold added later may come from newer code than the others."""
    codes = {f.code for f in folds if f.code}
    if len(codes) > 1:
        logger.warning("the pooled folds' models were trained with %d different luna sources (model.pt "
                       "provenance.source_sha256: %s): rerun the older folds to report one version", len(codes),
                       ", ".join(f"fold {f.fold} {f.code[:12]}" for f in sorted(folds, key=lambda f: f.fold)))


def note_nodules_off_disk(annotations: pd.DataFrame, splits: pd.DataFrame, annotations_path: str,
                          splits_path: str) -> None:
    """Warn of annotated nodules on scans not in splits.tsv (not on disk): no FROC here counts them, where
    LUNA16's own script, dividing by the 888 scans of seriesuids.csv, counts them as missed; a CPM over part of
    the data set is not the literature's number."""
    off_disk = ~annotations["seriesuid"].isin(set(splits["series_uid"]))
    if off_disk.any():
        logger.warning("%d of the %d nodules of %s lie on %d scans not in %s (not on disk): no FROC here counts "
                       "them (LUNA16's script, dividing by all 888 scans of seriesuids.csv, counts them as missed)",
                       int(off_disk.sum()), len(annotations), annotations_path,
                       annotations.loc[off_disk, "seriesuid"].nunique(), splits_path)


class EvaluateApp(StageApp):
    """Pool the test-fold predictions of the folds run into one report: per-fold and pooled metrics.tsv (with
    each operating threshold), predictions, LUNA16 submission, plots; with --annotations pooled FROC/CPM with
    bootstrap intervals."""

    prog = "luna-evaluate"
    errors = (EvaluationError, CheckpointError, TableError, MetricsError, SplitsError, OutputError)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--folds", required=True, nargs="+", metavar="DIR",
                            help="fold folders, each with model.pt and predictions.tsv, and history.tsv for "
                                 "training_curves.png where present (results/folds/N)")
        parser.add_argument("--splits", required=True, help="splits.tsv: each fold's test scans (the FROC divisor)")
        parser.add_argument("--out", required=True, help="output folder")
        add_report_options(parser)

    def run(self) -> EvaluationResult:
        a = self.args
        inputs = {"--folds": [Path(folder) / name for folder in a.folds
                              for name in ("predictions.tsv", "model.pt", "history.tsv")],
                  "--splits": [a.splits], "--annotations": [a.annotations],
                  "--annotations-excluded": [a.annotations_excluded]}
        named_output(a.out, "--out", "report folder")
        check_report_not_an_input(a.out, inputs)
        annotations, excluded = check_report_options(a)
        splits = read_splits_tsv(a.splits)
        folds = [read_fold_dir(folder, splits, a.splits) for folder in a.folds]
        if annotations is not None:
            note_nodules_off_disk(annotations, splits, a.annotations, a.splits)
        note_mixed_code(folds)
        return write_report(folds, a.out, annotations, excluded, max_per_scan=a.max_per_scan, bootstrap=a.bootstrap,
                            seed=a.seed)


main = EvaluateApp.console
