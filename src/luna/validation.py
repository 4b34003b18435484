"""Predicting with a trained model: ``luna-predict`` (one fold's predictions.tsv) and ``luna-validate``
(predict, then the evaluation report of luna.evaluation, for one model in one call).

``luna-predict --model results/folds/0/model.pt --crops results/crops/*.h5 --splits results/splits.tsv
--out results/folds/0/predictions.tsv`` predicts every cropped candidate of the model's test fold (``--scans
test``, the default), of the scans that chose its epoch and threshold (``--scans selection``: the same
probabilities the training stage's selection rows were computed from, to 1e-5), or of every scan in the stores
(``--scans all``). Inference is luna.inference's (float32, the model's memory format); model.pt's crop shape
must match the stores'. predictions.tsv has one row per cropped candidate, stores in the order given, rows in
store order: candidate_id, series_uid, coord_x, coord_y, coord_z, is_nodule, diameter_mm, probability, loss,
fold (is_nodule and loss empty for a candidate list without classes).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from luna.app import StageApp, add_switch, thread_limit
from luna.cpu_speed import tune_allocator
from luna.device import DeviceError, resolve_device
from luna.evaluation import (
    PREDICTION_COLUMNS,
    EvaluationError,
    EvaluationResult,
    FoldPredictions,
    add_report_options,
    check_report_not_an_input,
    check_report_options,
    read_history,
    write_report,
)
from luna.inference import TTA_FLIPS, Prediction, predict, rows_of_scans
from luna.io import OutputError, check_not_an_input, check_writable_dir, named_output, write_tsv
from luna.luna16 import TableError
from luna.metrics import MetricsError
from luna.model import CheckpointError, checkpoint_crop_shape, load_model, not_held_out, seen_scans
from luna.splits import SplitsError, read_splits_tsv
from luna.store import CropStore, StoreError, check_distinct_stores, stores_mismatch

logger = logging.getLogger(__name__)

SCAN_CHOICES = ("test", "selection", "all")


class ValidationError(ValueError):
    """Input the predict stage cannot use; the one-line message names the file, row or value."""


ERRORS = (ValidationError, EvaluationError, CheckpointError, StoreError, TableError, MetricsError, DeviceError,
          SplitsError, OutputError)


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

def open_stores(paths: Sequence[str | os.PathLike]) -> list[CropStore]:
    """Open the crop stores (StoreError names an unreadable one); the same file twice, two crop shapes or two HU
    windows is an error."""
    check_distinct_stores(paths)
    stores = [CropStore(path) for path in paths]
    mismatch = stores_mismatch(stores)
    if mismatch:
        raise ValidationError(mismatch)
    return stores


def scans_to_predict(scans: str, checkpoint: dict[str, Any], model_path: str, splits: pd.DataFrame | None,
                     splits_path: str | None, fold: int | None, stores: Sequence[CropStore]) -> tuple[list[str], int]:
    """The scans to predict (each one in the FROC divisor) and the fold label of the rows."""
    model_fold = checkpoint.get("test_fold")
    seen = seen_scans(checkpoint)  # the scans the model learned or chose on: never held out
    if scans == "selection":
        if fold is not None:  # it was ignored in silence
            raise ValidationError(f"--fold {fold} does not apply to --scans selection (the scans that chose "
                                  f"{model_path}'s epoch and threshold, recorded in it)")
        if "selection_series_uids" not in checkpoint:
            raise ValidationError(f"{model_path}: no selection scans recorded (a model from luna-train is needed)")
        uids = list(checkpoint["selection_series_uids"])
        if not uids:
            raise ValidationError(f"{model_path}: the model was trained without a selection set")
        if model_fold is None:
            raise ValidationError(f"{model_path}: no test fold recorded (the fold column of its selection rows)")
        return uids, int(model_fold)
    if scans == "all":
        uids = list(dict.fromkeys([uid for store in stores for uid in store.geometries]
                                  + [uid for store in stores for uid in store.table["series_uid"].astype(str)]))
        label = fold if fold is not None else (int(model_fold) if model_fold is not None else 0)
        n_seen = sum(str(uid) in seen for uid in uids)
        if n_seen:
            logger.warning("--scans all: %d of the %d scans are %s's training or selection scans: these numbers are "
                           "not held out (metrics.tsv says split all)", n_seen, len(uids), model_path)
        return uids, label
    if splits is None:
        raise ValidationError("--scans test needs --splits (which scans form the test fold)")
    chosen = fold if fold is not None else model_fold
    if chosen is None:
        raise ValidationError(f"{model_path}: no test fold recorded; give --fold N")
    uids = splits.loc[splits["fold"] == int(chosen), "series_uid"].tolist()
    if not uids:
        raise ValidationError(f"{splits_path}: fold {chosen} has no scans")
    leak = not_held_out(uids, checkpoint, model_path=model_path, splits_path=str(splits_path),
                        fold_name=f"fold {chosen}", verb="predict")
    if leak:  # a test fold the model learned or chose on: its numbers would not be held-out numbers
        raise ValidationError(leak)
    if model_fold is not None and int(chosen) != int(model_fold):
        logger.warning("predicting fold %s with a model whose test fold is %s (none of its scans was trained or "
                       "chosen on)", chosen, model_fold)
    return uids, int(chosen)


def labels_of(rows: pd.DataFrame, stores: Sequence[CropStore]) -> np.ndarray | None:
    """int64 labels (1 = nodule) when every row has a class, None when none has (predict-only candidate list);
    a mix is an error naming the first unlabelled row."""
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


def as_written(values: np.ndarray) -> np.ndarray:
    """float32 values as float64 parsed from their shortest decimal form, i.e. as predictions.tsv holds them,
    so metrics computed from them equal metrics recomputed from the file."""
    values = np.asarray(values, dtype=np.float32)
    return np.array([float(v) for v in values.astype(str)], dtype=np.float64) if values.size else np.zeros(0)


def predictions_frame(rows: pd.DataFrame, prediction: Prediction, labels: np.ndarray | None, fold: int) -> pd.DataFrame:
    """predictions.tsv rows (probability and loss :func:`as_written`); is_nodule and loss NaN when the candidates
    have no class."""
    n = len(rows)
    labelled = labels is not None and prediction.loss is not None
    frame = pd.DataFrame({
        "candidate_id": rows["candidate_id"].to_numpy(dtype=np.int64),
        "series_uid": rows["series_uid"].astype(str).to_numpy(),
        "coord_x": rows["coord_x"].to_numpy(dtype=np.float64),
        "coord_y": rows["coord_y"].to_numpy(dtype=np.float64),
        "coord_z": rows["coord_z"].to_numpy(dtype=np.float64),
        "is_nodule": labels.astype(np.int64) if labels is not None else np.full(n, np.nan),
        "diameter_mm": rows["diameter_mm"].to_numpy(dtype=np.float32),
        "probability": as_written(prediction.probability),
        "loss": as_written(prediction.loss) if labelled else np.full(n, np.nan),  # type: ignore[arg-type]
        "fold": np.full(n, int(fold), dtype=np.int64),
    })
    return frame[PREDICTION_COLUMNS]


def use_channels_last(mode: str, checkpoint: dict[str, Any]) -> bool:
    """``auto``: the memory format the model was trained and selected with (model.pt's args; on by default)."""
    if mode != "auto":
        return mode == "on"
    return bool(checkpoint.get("args", {}).get("channels_last", True))


# ----------------------------------------------------------------------------------------------------
# the apps
# ----------------------------------------------------------------------------------------------------

@dataclass
class PredictResult:
    """What luna-predict computed: the predictions (as written), the scans predicted and the checkpoint."""

    predictions: pd.DataFrame
    scans: list[str]
    fold: int
    checkpoint: dict[str, Any]
    seconds: float = 0.0


def add_predict_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model.pt written by luna-train")
    parser.add_argument("--crops", required=True, nargs="+", metavar="H5", help="crop stores (luna-crops)")
    parser.add_argument("--splits", default=None, help="splits.tsv (luna-split): which scans form a fold; needed "
                        "with --scans test")
    parser.add_argument("--scans", choices=SCAN_CHOICES, default="test",
                        help="test: the scans of the test fold (model.pt's, or --fold); selection: the scans that chose "
                             "the model's epoch and threshold (as recorded in model.pt); all: every scan of the stores")
    parser.add_argument("--fold", "--test-fold", dest="fold", type=int, default=None, metavar="N",
                        help="with --scans test: predict this fold instead of model.pt's test fold; with --scans "
                             "all: the fold column's value (default: model.pt's test fold, or 0 for a model without "
                             "one); --test-fold is the same option under luna-train's name")
    parser.add_argument("--batch-size", type=int, default=64, help="candidates per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else the CPU")
    add_switch(parser, "--channels-last", "channels_last_3d memory format; auto: as the model was trained and "
               "selected (model.pt's args)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--tta", choices=("auto", *TTA_FLIPS), default="auto",
                        help="test-time augmentation; auto: as the model's selection pass (model.pt's args)")


def predict_inputs(args: argparse.Namespace) -> dict[str, list[str | None]]:
    """The input files of a prediction, by option (for :func:`luna.io.check_not_an_input`)."""
    return {"--model": [args.model], "--crops": list(args.crops), "--splits": [args.splits]}


def run_predict(args: argparse.Namespace, out_dir: str | os.PathLike) -> PredictResult:
    """Read and check every input and that ``out_dir`` can be written, then predict; raises a ValueError
    subclass (or OutputError) with a one-line message."""
    t0 = time.perf_counter()
    if args.batch_size < 1:
        raise ValidationError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.threads <= thread_limit():
        raise ValidationError(f"--threads must be from 0 to {thread_limit()} (4 per CPU of this machine), got "
                              f"{args.threads}")
    if args.fold is not None and args.fold < 0:
        raise ValidationError(f"--fold must be >= 0, got {args.fold}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu":
        logger.info(tune_allocator())
    stores = open_stores(args.crops)
    splits = read_splits_tsv(args.splits) if args.splits else None
    model, checkpoint = load_model(args.model, map_location=device)
    trained_on = checkpoint_crop_shape(checkpoint)
    if tuple(stores[0].crop_shape) != trained_on:
        raise ValidationError(f"{args.model}: the model was trained on crops of shape {list(trained_on)}, "
                              f"{stores[0].path} holds {list(stores[0].crop_shape)}")
    trained_window = checkpoint.get("hu_window")  # absent in models saved before it was recorded
    if trained_window is not None and list(stores[0].hu_window) != list(trained_window):
        raise ValidationError(f"{args.model}: the model was trained on crops of HU window {list(trained_window)}, "
                              f"{stores[0].path} holds {list(stores[0].hu_window)}")
    scans, fold = scans_to_predict(args.scans, checkpoint, args.model, splits, args.splits, args.fold, stores)
    rows = rows_of_scans(stores, scans)
    duplicated = rows.duplicated(["series_uid", "candidate_id"])
    if duplicated.any():
        first = rows.loc[duplicated].iloc[0]
        raise ValidationError(f"{stores[int(first['store'])].path}: candidate_id {int(first['candidate_id'])} of "
                              f"{first['series_uid']} is also in another store; give each store once")
    labels = labels_of(rows, stores)
    in_stores = {uid for store in stores for uid in store.geometries} | set(rows["series_uid"])
    n_absent = sum(uid not in in_stores for uid in scans)
    if n_absent == len(scans) and scans:
        given = {store.subset: store.path for store in stores}
        subsets = set(splits.loc[splits["series_uid"].isin(scans), "subset"]) if splits is not None else set()
        if subsets and subsets <= set(given):  # their subsets' stores are here and hold none of them
            raise ValidationError(f"{', '.join(str(given[s]) for s in sorted(subsets))}: none of the {len(scans)} "
                                  f"{args.scans} scans (fold {fold}) has a candidate in the stores of its subset: "
                                  "nothing to predict")
        raise ValidationError(f"{', '.join(str(s.path) for s in stores)}: none of the {len(scans)} {args.scans} scans "
                              f"(fold {fold}) is in these crop stores; give the stores of their subsets")
    if n_absent and splits is not None:
        # a forgotten store: its scans counted as scans without candidates, and the CPM dropped without an error
        absent = [uid for uid in scans if uid not in in_stores]
        subset_of = dict(zip(splits["series_uid"], splits["subset"]))
        given = {store.subset for store in stores}
        forgotten = sorted({str(subset_of[uid]) for uid in absent if uid in subset_of} - given)
        if forgotten:
            n = sum(str(subset_of.get(uid)) in forgotten for uid in absent)
            raise ValidationError(f"{n} of the {len(scans)} {args.scans} scans (fold {fold}) are in subset(s) "
                                  f"{', '.join(forgotten)}, whose crop store was not given; give the stores of every "
                                  "subset of the fold")
    if n_absent:
        logger.warning("%d of the %d scans to predict have no candidate in the crop stores of their subsets (none "
                       "cropped); they count in the FROC divisor as scans without candidates", n_absent, len(scans))
    trained_tta = str(checkpoint.get("args", {}).get("tta", "none"))
    if trained_tta not in TTA_FLIPS:
        raise ValidationError(f"{args.model}: the model's selection pass used test-time augmentation {trained_tta!r}, "
                              f"which this version does not know ({', '.join(TTA_FLIPS)})")
    channels_last = use_channels_last(args.channels_last, checkpoint)
    check_writable_dir(out_dir, "output folder")  # the inputs are good: before the long part, the output
    logger.info("predicting %d candidates of %d %s scans (fold %d, %s) with %s (epoch %d) on %s, float32, %s",
                len(rows), len(scans), args.scans, fold,
                "unlabelled" if labels is None else f"{int(labels.sum())} positive", args.model,
                int(checkpoint["epoch"]), device, "channels_last_3d" if channels_last else "contiguous")
    if args.tta not in ("auto", trained_tta):
        logger.warning("--tta %s differs from the model's selection pass (%s): these probabilities are not the ones "
                       "its threshold was chosen on", args.tta, trained_tta)
    tta = trained_tta if args.tta == "auto" else args.tta
    prediction = predict(model, stores, rows, labels, batch_size=args.batch_size, device=device,
                         channels_last=channels_last, tta=tta)
    frame = predictions_frame(rows, prediction, labels, fold)
    return PredictResult(frame, list(scans), fold, checkpoint, time.perf_counter() - t0)


class PredictApp(StageApp):
    """Predict every cropped candidate of a model's test fold (or its selection scans, or all scans) and write
    predictions.tsv (float32 inference, the training stage's evaluation path)."""

    prog = "luna-predict"
    errors = ERRORS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_predict_options(parser)
        parser.add_argument("--out", required=True, help="output predictions.tsv")

    def run(self) -> PredictResult:
        named_output(self.args.out, "--out", "predictions.tsv file to write")
        if Path(self.args.out).is_dir():  # found now, not after predicting every candidate
            raise ValidationError(f"{self.args.out}: is a folder; --out names the predictions.tsv file to write")
        check_not_an_input(self.args.out, predict_inputs(self.args))
        result = run_predict(self.args, Path(self.args.out).parent)
        write_tsv(result.predictions, self.args.out)
        logger.info("wrote %s: %d candidates of %d scans in %.1f s", self.args.out, len(result.predictions),
                    len(result.scans), result.seconds)
        return result


class ValidationApp(StageApp):
    """Validate one model: predict its test fold (or --scans selection / all), then write the evaluation report
    (predictions.tsv, metrics.tsv, submission.csv, plots; with --annotations also the CPM, froc.tsv and
    metrics_ci.tsv) into --out."""

    prog = "luna-validate"
    errors = ERRORS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_predict_options(parser)
        add_report_options(parser)
        parser.add_argument("--history", default=None, help="history.tsv of the training run, for training_curves.png")
        parser.add_argument("--out", required=True, help="output folder")

    def run(self) -> EvaluationResult:
        a = self.args
        inputs = {**predict_inputs(a), "--history": [a.history], "--annotations": [a.annotations],
                  "--annotations-excluded": [a.annotations_excluded]}
        named_output(a.out, "--out", "report folder")
        check_report_not_an_input(a.out, inputs)
        annotations, excluded = check_report_options(a)
        history = read_history(a.history) if a.history else None
        predicted = run_predict(a, a.out)
        threshold = float(predicted.checkpoint.get("threshold", 0.5))
        fold = FoldPredictions(predicted.fold, predicted.predictions, predicted.scans, threshold,
                               int(predicted.checkpoint["epoch"]), history, a.model, split=a.scans)
        return write_report([fold], a.out, annotations, excluded, max_per_scan=a.max_per_scan, bootstrap=a.bootstrap,
                            seed=a.seed)


main_predict = PredictApp.console
main = ValidationApp.console
