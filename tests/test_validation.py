"""luna-predict / luna-validate / luna-evaluate: predictions, metrics.tsv per fold and pooled, froc.tsv,
submission, plots, predict-only, real CT.

Tiny crop stores are written with StoreWriter; the model is a seeded LunaModel saved with save_checkpoint
(its tail BatchNorm given running statistics of CT, so the probabilities are not saturated at 0/1).
"""

from __future__ import annotations

import logging
import os
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from luna.luna16 import read_annotations_csv
from luna.geometry import Geometry, irc_to_xyz, xyz_to_irc
from luna.evaluation import METRICS_COLUMNS, PREDICTION_COLUMNS, EvaluateApp
from luna.froc import FROC_RATES, SENSITIVITY_COLUMNS, froc, froc_bootstrap
from luna.metrics import HISTORY_COLUMNS, metric_row
from luna.inference import crops_to_tensor
from luna.model import LunaModel, load_model, save_checkpoint
from luna.store import CropStore, StoreWriter
from luna.validation import ValidationApp, main

from conftest import LIDC_DIR, LIDC_MHD, LIDC_UID, symlinked_outputs

CROP_SHAPE = (32, 48, 48)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCH = 7

VAL_A, VAL_B, VAL_EMPTY, TRAIN_A = "1.2.826.0.1.9", "1.2.826.0.1.10", "1.2.826.0.1.11", "1.2.826.0.1.12"

# World = voxel coordinates (identity geometry); crops are synthetic, only FROC looks at the coordinates.
# (candidate_id, series_uid, x, y, z, is_nodule, diameter_mm)
STORE0_ROWS = [
    (0, VAL_A, 100.0, 100.0, 50.0, 1, 10.0),  # on nodule N1 (d 10)
    (1, VAL_A, 102.0, 100.0, 50.0, 1, 10.0),  # 2 mm off N1: a second hit on the same nodule
    (2, VAL_A, 150.0, 150.0, 40.0, 0, 0.0),   # false positive
    (3, VAL_A, 300.0, 300.0, 30.0, 0, 0.0),   # 1 mm from an excluded finding (d -1 -> 10 mm): ignored
    (4, TRAIN_A, 60.0, 60.0, 20.0, 1, 8.0),   # train scan: not predicted
    (5, TRAIN_A, 70.0, 70.0, 20.0, 0, 0.0),
    (6, VAL_A, 50.0, 50.0, 20.0, 0, 0.0),     # false positive
]
STORE1_ROWS = [
    (7, VAL_B, 120.0, 80.0, 40.0, 1, 12.0),   # on nodule N4 (d 12)
    (8, VAL_B, 10.0, 10.0, 10.0, 0, 0.0),     # false positives
    (9, VAL_B, 20.0, 20.0, 20.0, 0, 0.0),
    (10, VAL_B, 30.0, 30.0, 30.0, 0, 0.0),
]
ANNOTATIONS = pd.DataFrame({
    "seriesuid": [VAL_A, VAL_A, VAL_B, TRAIN_A],
    "coordX": [100.0, 400.0, 120.0, 60.0],
    "coordY": [100.0, 400.0, 80.0, 60.0],
    "coordZ": [50.0, 80.0, 40.0, 20.0],
    "diameter_mm": [10.0, 8.0, 12.0, 8.0],  # N1, N3 (never hit), N4, a train-scan nodule (not counted)
})
EXCLUDED = pd.DataFrame({"seriesuid": [VAL_A], "coordX": [300.0], "coordY": [301.0], "coordZ": [30.0],
                         "diameter_mm": [-1.0]})
VAL_CANDIDATE_IDS = [0, 1, 2, 3, 6, 7, 8, 9, 10]  # store order, stores in the order given
N_VAL_SCANS = 3       # VAL_A, VAL_B and VAL_EMPTY (no candidates, still in the FP divisor)
N_VAL_NODULES = 3     # N1, N3, N4
N_FP = 5              # candidates 2, 6, 8, 9, 10


def synthetic_crop(rng: np.random.Generator, nodule: bool) -> np.ndarray:
    """Lung-like noise around -800 HU; a nodule is a soft-tissue sphere (r 5 voxels) at the centre."""
    crop = rng.normal(-800.0, 60.0, CROP_SHAPE)
    if nodule:
        i, r, c = np.ogrid[:CROP_SHAPE[0], :CROP_SHAPE[1], :CROP_SHAPE[2]]
        sphere = (i - 16) ** 2 + (r - 24) ** 2 + (c - 24) ** 2 <= 25
        crop[sphere] = rng.normal(40.0, 20.0, int(sphere.sum()))
    return np.clip(np.rint(crop), -1000, 1000).astype(np.int16)


def write_store(path: Path, rows: list[tuple], seed: int, subset: str, extra_scans: tuple[str, ...] = (),
                crop_shape: tuple[int, int, int] = CROP_SHAPE, unlabelled: bool = False,
                hu_window: tuple[int, int] = (-1000, 1000)) -> Path:
    rng = np.random.default_rng(seed)
    geometry = Geometry(np.zeros(3), np.ones(3))
    shape_irc = (100, 512, 512)
    centers = np.array([row[2:5] for row in rows], dtype=np.float64)
    center_irc = xyz_to_irc(centers, geometry)
    if crop_shape == CROP_SHAPE:
        crops = np.stack([synthetic_crop(rng, bool(row[5])) for row in rows])
    else:
        crops = rng.integers(-1000, 1000, (len(rows), *crop_shape)).astype(np.int16)
    with StoreWriter(path, len(rows), crop_shape, hu_window, subset=subset) as writer:
        for uid in dict.fromkeys([row[1] for row in rows] + list(extra_scans)):
            writer.add_scan(uid, geometry, shape_irc)
        writer.write_rows(np.arange(len(rows)), crops, {
            "candidate_id": np.array([row[0] for row in rows], dtype=np.int64),
            "series_uid": np.array([row[1] for row in rows], dtype=object),
            "center_xyz": centers,
            "center_irc": center_irc,
            "crop_start_irc": center_irc - np.array(crop_shape) // 2,
            "is_nodule": np.array([-1 if unlabelled else row[5] for row in rows], dtype=np.int8),
            "diameter_mm": np.array([row[6] for row in rows], dtype=np.float32),
        })
        writer.commit()
    return path


def ct_model(seed: int = 0) -> LunaModel:
    """A seeded, untrained LunaModel whose tail BatchNorm has running statistics of lung CT."""
    torch.manual_seed(seed)
    model = LunaModel()
    model.tail_batchnorm.running_mean.fill_(-700.0)
    model.tail_batchnorm.running_var.fill_(250.0 ** 2)
    with torch.no_grad():  # a small head: probabilities spread around 0.5 instead of saturating
        model.head_linear.weight.mul_(-0.1)
        model.head_linear.bias.copy_(torch.tensor([0.0, -1.4]))
    return model.eval()


def write_splits(path: Path, folds: dict[str, int], subset: str = "subset0") -> Path:
    pd.DataFrame({"series_uid": list(folds), "subset": subset, "fold": list(folds.values())}).to_csv(
        path, sep="\t", index=False)
    return path


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"series_uid": str})


def assert_row_equal(actual: dict, expected: dict, columns: list[str]) -> None:
    for column in columns:
        a, e = actual[column], expected[column]
        if isinstance(e, str):
            assert a == e, column
        elif isinstance(e, float) and math.isnan(e):
            assert math.isnan(float(a)), f"{column}: {a} is not NaN"
        else:
            assert float(a) == pytest.approx(float(e), rel=1e-9, abs=1e-12), column


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01, f"{path} is blank"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation_inputs")
    paths = {
        "store0": write_store(root / "subset0.h5", STORE0_ROWS, seed=1, subset="subset0"),
        "store1": write_store(root / "subset1.h5", STORE1_ROWS, seed=2, subset="subset1", extra_scans=(VAL_EMPTY,)),
        "model": save_checkpoint(root / "model.pt", ct_model(), epoch=EPOCH),
        "splits": root / "splits.tsv",
        "annotations": root / "annotations.csv",
        "excluded": root / "annotations_excluded.csv",
        "history": root / "history.tsv",
    }
    write_splits(paths["splits"], {VAL_A: 0, VAL_B: 0, VAL_EMPTY: 0, TRAIN_A: 1})
    ANNOTATIONS.to_csv(paths["annotations"], index=False)
    EXCLUDED.to_csv(paths["excluded"], index=False)
    history = []
    for epoch in (1, 2, 3):
        for split, offset in (("train", 0.0), ("selection", 0.05)):
            history.append({"epoch": epoch, "split": split, "n": 10, "n_pos": 3, "n_neg": 7,
                            "loss_all": 0.7 / epoch + offset, "loss_neg": 0.5, "loss_pos": 0.9,
                            "correct_all": 70.0, "correct_neg": 80.0, "correct_pos": 50.0,
                            "precision": 0.3 * epoch - offset, "recall": 0.25 * epoch, "f1": 0.27 * epoch,
                            "auc": 0.8})
    pd.DataFrame(history)[HISTORY_COLUMNS].to_csv(paths["history"], sep="\t", index=False)
    return paths


@pytest.fixture(scope="module")
def labelled_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation_out")
    argv = ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--annotations", str(inputs["annotations"]),
            "--annotations-excluded", str(inputs["excluded"]), "--history", str(inputs["history"]),
            "--out", str(out), "--batch-size", "4", "--device", "cpu", "--bootstrap", "25", "--seed", "3",
            "--fold", "0"]
    result = ValidationApp(argv).run()
    return out, result


def report_argv(inputs, out: Path) -> list[str]:
    """luna-validate of fold 0 with annotations into ``out``, no bootstrap: the report tests' run."""
    return ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--annotations", str(inputs["annotations"]), "--out", str(out),
            "--fold", "0", "--bootstrap", "0"]


def expected_probabilities(inputs) -> tuple[np.ndarray, np.ndarray]:
    """Probability and loss of every val candidate by a plain forward pass of the checkpoint (no app code)."""
    model, _ = load_model(inputs["model"])
    crops, labels = [], []
    for key, rows in (("store0", STORE0_ROWS), ("store1", STORE1_ROWS)):
        store = CropStore(inputs[key])
        for k, row in enumerate(rows):
            if row[0] in VAL_CANDIDATE_IDS:
                crops.append(store.crop(k))
                labels.append(row[5])
    with torch.no_grad():
        logits, probability = model(torch.from_numpy(np.stack(crops).astype(np.float32))[:, None])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="none")
    return probability[:, 1].numpy(), loss.numpy()


# ----------------------------------------------------------------------------------------------------
# labelled run: predictions, metrics, FROC, submission, plots
# ----------------------------------------------------------------------------------------------------

def test_predictions_one_row_per_test_candidate(inputs, labelled_run):
    out, _ = labelled_run
    predictions = read_tsv(out / "predictions.tsv")
    assert list(predictions.columns) == PREDICTION_COLUMNS
    assert predictions["candidate_id"].tolist() == VAL_CANDIDATE_IDS
    by_id = {row[0]: row for row in STORE0_ROWS + STORE1_ROWS}
    for _, p in predictions.iterrows():
        row = by_id[int(p["candidate_id"])]
        assert (p["series_uid"], p["coord_x"], p["coord_y"], p["coord_z"], p["is_nodule"]) == row[1:6]
        assert p["diameter_mm"] == pytest.approx(row[6])
    probability = predictions["probability"].to_numpy()
    assert np.all((probability >= 0.0) & (probability <= 1.0))
    assert probability.std() > 1e-3, "probabilities saturated: the test model does not discriminate inputs"
    expected_probability, expected_loss = expected_probabilities(inputs)
    np.testing.assert_allclose(probability, expected_probability, atol=1e-5)
    np.testing.assert_allclose(predictions["loss"].to_numpy(), expected_loss, rtol=1e-4, atol=1e-5)
    assert predictions["fold"].eq(0).all()


def test_metrics_row_equals_metric_row_of_predictions(inputs, labelled_run):
    out, result = labelled_run
    metrics = read_tsv(out / "metrics.tsv")
    assert list(metrics.columns) == METRICS_COLUMNS
    assert metrics["fold"].astype(str).tolist() == ["0", "all"]  # one fold: its row and the pooled row agree
    predictions = read_tsv(out / "predictions.tsv")
    expected = metric_row(predictions["is_nodule"], predictions["probability"], predictions["loss"],
                          epoch=EPOCH, split="test")
    for _, row in metrics.iterrows():
        assert_row_equal(row.to_dict(), expected, HISTORY_COLUMNS)
        assert (row["epoch"], row["split"], row["n"], row["n_pos"], row["n_neg"]) == (EPOCH, "test", 9, 3, 6)
        assert row["threshold"] == 0.5  # a checkpoint without a recorded threshold: the book's 0.5


def test_froc_consistent_with_metrics_and_hand_counts(inputs, labelled_run):
    out, result = labelled_run
    curve = read_tsv(out / "froc.tsv")
    assert list(curve.columns) == ["threshold", "fp_per_scan", "sensitivity"]
    assert curve["threshold"].iloc[0] == math.inf and curve[["fp_per_scan", "sensitivity"]].iloc[0].tolist() == [0, 0]
    assert np.all(np.diff(curve["threshold"].to_numpy()) < 0)
    # by hand: 5 false positives over 3 val scans (the empty one included); N1 and N4 hit, N3 missed;
    # candidate 3 lies on an excluded finding and counts as neither
    assert curve["fp_per_scan"].iloc[-1] == pytest.approx(N_FP / N_VAL_SCANS)
    assert curve["sensitivity"].iloc[-1] == pytest.approx(2 / N_VAL_NODULES)
    metrics = read_tsv(out / "metrics.tsv").iloc[-1]
    sensitivities = np.interp(FROC_RATES, curve["fp_per_scan"], curve["sensitivity"])
    for name, value in zip(SENSITIVITY_COLUMNS, sensitivities):
        assert metrics[name] == pytest.approx(value, abs=1e-12)
    # 5/3 FPs per scan at most: at 2, 4 and 8 the curve's last value
    for name in ("sens_at_2", "sens_at_4", "sens_at_8"):
        assert metrics[name] == pytest.approx(2 / 3)
    assert metrics["cpm"] == pytest.approx(sensitivities.mean(), abs=1e-12)
    # and the same from predictions.tsv with metrics.froc
    predictions = read_tsv(out / "predictions.tsv")
    again = froc(predictions, read_annotations_csv(inputs["annotations"]), [VAL_A, VAL_B, VAL_EMPTY],
                 read_annotations_csv(inputs["excluded"], allow_negative=True))
    assert (again.n_scans, again.n_nodules, again.n_hit, again.n_fp) == (N_VAL_SCANS, N_VAL_NODULES, 2, N_FP)
    assert again.cpm == pytest.approx(metrics["cpm"], abs=1e-12)
    np.testing.assert_allclose(again.curve.to_numpy(), curve.to_numpy())


def test_bootstrap_interval_file(inputs, labelled_run):
    out, _ = labelled_run
    ci = read_tsv(out / "metrics_ci.tsv")
    assert ci["fold"].astype(str).tolist() == ["0"] * 8 + ["all"] * 8
    assert ci["metric"].tolist() == ["cpm", *SENSITIVITY_COLUMNS] * 2
    ci = ci[ci["fold"].astype(str) == "all"]
    predictions = read_tsv(out / "predictions.tsv")
    expected = froc_bootstrap(predictions, read_annotations_csv(inputs["annotations"]), [VAL_A, VAL_B, VAL_EMPTY],
                              read_annotations_csv(inputs["excluded"], allow_negative=True), n_bootstrap=25, seed=3)
    for _, row in ci.iterrows():
        interval = expected[row["metric"]]
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high), nan_ok=True)
        assert row["n_bootstrap"] == interval.n_samples
    # one of the 25 samples drew only the nodule-free scans: 24 intervals' samples, not the 25 asked for
    assert set(ci["n_bootstrap"]) == {24} and set(ci["seed"]) == {3}
    metrics = read_tsv(out / "metrics.tsv").iloc[-1]
    assert ci.set_index("metric").loc["cpm", "value"] == pytest.approx(metrics["cpm"])


def test_submission_format_exact(labelled_run):
    out, _ = labelled_run
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert len(lines) == 1 + len(VAL_CANDIDATE_IDS)
    predictions = read_tsv(out / "predictions.tsv")
    submission = pd.read_csv(out / "submission.csv", dtype={"seriesuid": str})
    assert submission["seriesuid"].tolist() == predictions["series_uid"].tolist()
    np.testing.assert_array_equal(submission[["coordX", "coordY", "coordZ", "probability"]].to_numpy(),
                                  predictions[["coord_x", "coord_y", "coord_z", "probability"]].to_numpy())
    first = lines[1].split(",")
    assert first[0] == VAL_A and [float(v) for v in first[1:4]] == [100.0, 100.0, 50.0]


def test_plots_are_valid_pngs(labelled_run):
    out, result = labelled_run
    for name in ("roc.png", "pr.png", "froc.png", "training_curves.png"):
        assert_valid_png(out / name)
    assert sorted(p.name for p in result.written) == sorted([
        "predictions.tsv", "submission.csv", "froc.tsv", "froc.png", "metrics.tsv", "metrics_ci.tsv",
        "roc.png", "pr.png", "training_curves.png"])
    assert not list(out.glob(".*.tmp"))


def test_batch_size_and_memory_format_do_not_change_predictions(inputs, labelled_run, tmp_path):
    out, _ = labelled_run
    argv = ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--out", str(tmp_path), "--batch-size", "2",
            "--channels-last", "off", "--device", "cpu", "--fold", "0"]
    assert ValidationApp(argv).main() == 0
    np.testing.assert_allclose(read_tsv(tmp_path / "predictions.tsv")["probability"],
                               read_tsv(out / "predictions.tsv")["probability"], atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# other modes
# ----------------------------------------------------------------------------------------------------

def test_nan_written_as_nan_and_no_froc_without_annotations(inputs, tmp_path, caplog):
    model = ct_model()
    with torch.no_grad():  # every candidate predicted negative: precision and F1 undefined
        model.head_linear.weight.zero_()
        model.head_linear.bias.copy_(torch.tensor([4.0, -4.0]))
    checkpoint = save_checkpoint(tmp_path / "negative.pt", model, epoch=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "froc.tsv").write_text("stale\n")
    argv = ["--model", str(checkpoint), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--out", str(out), "--device", "cpu", "--fold", "0"]
    with caplog.at_level(logging.WARNING, logger="luna"):
        assert ValidationApp(argv).main() == 0
    assert "--bootstrap" not in caplog.text  # the default is not an option given and ignored (it was warned of)
    header, values, _ = (out / "metrics.tsv").read_text().splitlines()
    row = dict(zip(header.split("\t"), values.split("\t")))
    assert row["precision"] == "NaN" and row["f1"] == "NaN" and row["cpm"] == "NaN"
    assert float(row["recall"]) == 0.0 and float(row["correct_neg"]) == 100.0
    p = 1.0 / (1.0 + math.exp(8.0))  # softmax of logits (4, -4)
    assert float(row["loss_neg"]) == pytest.approx(-math.log(1 - p), rel=1e-4)
    assert float(row["loss_pos"]) == pytest.approx(8.0 + math.log1p(math.exp(-8.0)), rel=1e-5)
    assert not (out / "froc.tsv").exists() and not (out / "froc.png").exists()
    for name in ("predictions.tsv", "submission.csv", "roc.png", "pr.png"):
        assert (out / name).exists()


def test_predict_only_store_without_classes(inputs, tmp_path):
    store = write_store(tmp_path / "unlabelled.h5", STORE1_ROWS, seed=2, subset="x", unlabelled=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.tsv").write_text("stale\n")  # from an earlier run: must not survive
    argv = ["--model", str(inputs["model"]), "--crops", str(store), "--out", str(out), "--device", "cpu",
            "--scans", "all"]
    assert ValidationApp(argv).main() == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.tsv", "submission.csv"]
    lines = (out / "predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == PREDICTION_COLUMNS
    assert len(lines) == 1 + len(STORE1_ROWS)
    for line in lines[1:]:
        fields = line.split("\t")
        assert fields[5] == "NaN" and fields[8] == "NaN"  # is_nodule, loss: undefined without classes
        assert 0.0 <= float(fields[7]) <= 1.0
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(submission) == len(STORE1_ROWS)


def test_unlabelled_candidates_with_annotations_give_cpm_only(inputs, tmp_path):
    store = write_store(tmp_path / "unlabelled.h5", STORE1_ROWS, seed=2, subset="x", unlabelled=True)
    out = tmp_path / "out"
    argv = ["--model", str(inputs["model"]), "--crops", str(store), "--annotations", str(inputs["annotations"]),
            "--out", str(out), "--device", "cpu", "--scans", "all"]
    assert ValidationApp(argv).main() == 0
    metrics = read_tsv(out / "metrics.tsv").iloc[0]
    # --scans all: every scan of the stores, which may hold the model's training scans: not "test"
    assert (metrics["epoch"], metrics["split"], metrics["n"]) == (EPOCH, "all", 4)
    assert math.isnan(metrics["auc"]) and math.isnan(metrics["n_pos"])
    # --scans all: the scans of the store are predicted: VAL_B only, its nodule N4 hit, 3 FPs
    curve = read_tsv(out / "froc.tsv")
    assert curve["fp_per_scan"].iloc[-1] == pytest.approx(3.0) and curve["sensitivity"].iloc[-1] == 1.0
    assert not (out / "roc.png").exists() and (out / "froc.png").exists()


def test_test_scan_without_candidates_gives_empty_predictions(inputs, tmp_path):
    splits = write_splits(tmp_path / "splits.tsv", {VAL_A: 1, VAL_EMPTY: 0})
    out = tmp_path / "out"
    argv = ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(splits), "--annotations", str(inputs["annotations"]), "--out", str(out), "--device", "cpu",
            "--fold", "0"]
    assert ValidationApp(argv).main() == 0
    assert len(read_tsv(out / "predictions.tsv")) == 0
    assert (out / "submission.csv").read_text() == "seriesuid,coordX,coordY,coordZ,probability\n"
    metrics = read_tsv(out / "metrics.tsv").iloc[0]
    assert metrics["n"] == 0 and math.isnan(metrics["loss_all"]) and math.isnan(metrics["cpm"])  # no nodules
    curve = read_tsv(out / "froc.tsv")  # only the start point; sensitivity undefined without nodules
    assert len(curve) == 1 and curve["threshold"].iloc[0] == math.inf and curve["fp_per_scan"].iloc[0] == 0.0
    assert math.isnan(curve["sensitivity"].iloc[0])
    for name in ("roc.png", "pr.png", "froc.png"):
        assert_valid_png(out / name)


def test_evaluate_pools_folds_each_at_its_own_threshold(inputs, tmp_path):
    """Two folds (VAL_A and VAL_B + VAL_EMPTY) predicted by two models with other thresholds and epochs: the fold
    rows, and a pooled row that equals an independent recomputation from the pooled predictions."""
    splits = write_splits(tmp_path / "splits.tsv", {VAL_A: 3, VAL_B: 5, VAL_EMPTY: 5, TRAIN_A: 1})
    folds = []
    for fold, threshold, epoch, seed in ((3, 0.3, 4, 0), (5, 0.6, 6, 1)):
        folder = tmp_path / "folds" / str(fold)
        save_checkpoint(folder / "model.pt", ct_model(seed), epoch=epoch,
                        extra={"test_fold": fold, "threshold": threshold})
        argv = ["--model", str(folder / "model.pt"), "--crops", str(inputs["store0"]), str(inputs["store1"]),
                "--splits", str(splits), "--out", str(folder / "predictions.tsv"), "--device", "cpu"]
        from luna.validation import PredictApp

        assert PredictApp(argv).main() == 0
        folds.append(folder)
    out = tmp_path / "validation"
    assert EvaluateApp(["--folds", *map(str, folds), "--splits", str(splits), "--annotations",
                        str(inputs["annotations"]), "--annotations-excluded", str(inputs["excluded"]),
                        "--out", str(out), "--bootstrap", "20"]).main() == 0
    pooled = read_tsv(out / "predictions.tsv")
    assert list(pooled.columns) == PREDICTION_COLUMNS
    assert pooled["fold"].tolist() == [3] * 5 + [5] * 4 and sorted(set(pooled["series_uid"])) == sorted([VAL_A, VAL_B])
    metrics = read_tsv(out / "metrics.tsv")
    assert metrics["fold"].astype(str).tolist() == ["3", "5", "all"]
    assert metrics["threshold"].tolist()[:2] == [0.3, 0.6] and math.isnan(metrics["threshold"].iloc[2])
    assert metrics["epoch"].tolist()[:2] == [4, 6] and math.isnan(metrics["epoch"].iloc[2])
    # independent recomputation of the pooled row: each prediction at its own fold's threshold
    thresholds = pooled["fold"].map({3: 0.3, 5: 0.6}).to_numpy()
    positive = pooled["probability"].to_numpy() > thresholds
    label = pooled["is_nodule"].to_numpy() == 1
    tp, fp = int((positive & label).sum()), int((positive & ~label).sum())
    row = metrics.iloc[2]
    assert row["precision"] == pytest.approx(tp / (tp + fp)) and row["recall"] == pytest.approx(tp / label.sum())
    assert row["n"] == 9 and row["n_pos"] == 3
    # LUNA16's FROC over every test scan of the folds run (VAL_EMPTY in the divisor)
    again = froc(pooled, read_annotations_csv(inputs["annotations"]), [VAL_A, VAL_B, VAL_EMPTY],
                 read_annotations_csv(inputs["excluded"], allow_negative=True))
    assert row["cpm"] == pytest.approx(again.cpm, abs=1e-12)
    fold5 = froc(pooled[pooled["fold"] == 5], read_annotations_csv(inputs["annotations"]), [VAL_B, VAL_EMPTY])
    assert metrics.iloc[1]["cpm"] == pytest.approx(fold5.cpm, abs=1e-12)
    ci = read_tsv(out / "metrics_ci.tsv")
    assert ci["fold"].astype(str).unique().tolist() == ["3", "5", "all"]
    assert (out / "training_curves.png").exists() is False  # no history.tsv in these fold folders
    # the folds in another order: the same report, bootstrap intervals included (the pooled draws are in fold order)
    again_out = tmp_path / "reversed"
    assert EvaluateApp(["--folds", *map(str, folds[::-1]), "--splits", str(splits), "--annotations",
                        str(inputs["annotations"]), "--annotations-excluded", str(inputs["excluded"]),
                        "--out", str(again_out), "--bootstrap", "20"]).main() == 0
    for name in ("metrics.tsv", "metrics_ci.tsv", "predictions.tsv", "submission.csv"):
        assert (again_out / name).read_bytes() == (out / name).read_bytes(), name
    # a fold given twice, or predictions of another fold, is refused in one line
    assert EvaluateApp(["--folds", str(folds[0]), str(folds[0]), "--splits", str(splits), "--out",
                        str(tmp_path / "twice")]).main() == 2
    assert not (tmp_path / "twice" / "metrics.tsv").exists()


def test_a_write_that_fails_midway_leaves_no_report(inputs, labelled_run, tmp_path, monkeypatch, capsys):
    """A full disk at the FROC plot: one line naming the file, exit 2, and no report file at all in --out (an
    earlier run's metrics.tsv included), so nothing there mixes two runs."""
    from luna import plots
    from luna.io import OutputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.tsv").write_text("an earlier run\n")

    def full_disk(figure, path):
        raise OutputError(f"{path}: cannot write (no space left on device)")

    monkeypatch.setattr(plots, "save_figure", full_disk)
    argv = report_argv(inputs, out)
    assert ValidationApp(argv).main() == 2
    assert capsys.readouterr().err.strip() == (f"luna-validate: error: {out / 'froc.png'}: cannot write (no space "
                                               "left on device)")
    assert sorted(p.name for p in out.iterdir()) == []


def test_sigterm_midway_leaves_no_report(inputs, labelled_run, tmp_path, monkeypatch, capsys):
    """SIGTERM (Snakemake stopping its jobs, SLURM's time limit) at the FROC plot: one line, exit status 143, and no
    report file nor temp file in --out, an earlier run's included (killed by default, it left the earlier run's
    files beside this run's first ones)."""
    import signal

    from luna import plots

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.tsv").write_text("an earlier run\n")
    (out / "roc.png").write_bytes(b"an earlier run")

    def terminated(figure, path):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(plots, "save_figure", terminated)
    argv = report_argv(inputs, out)
    assert ValidationApp(argv).main() == 143
    assert capsys.readouterr().err.strip() == "luna-validate: terminated"
    assert sorted(p.name for p in out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the run


def test_one_report_writer_per_folder_and_killed_runs_swept(inputs, labelled_run, tmp_path, capsys,
                                                              lock_held_elsewhere):
    """Two runs on one --out mixed their files: the second is refused in one line while the first holds the
    folder's lock. A killed run's temp files are removed by the next run (with the lock held, no live run writes
    them); other hidden files are left alone, and the lock file does not outlive the run."""
    out = tmp_path / "out"
    out.mkdir()
    argv = report_argv(inputs, out)
    (out / "metrics.tsv").write_text("an earlier run\n")
    with lock_held_elsewhere(out / ".luna-evaluate.lock"):
        assert ValidationApp(argv).main() == 2
    assert capsys.readouterr().err.strip() == (
        f"luna-validate: error: {out}: another luna-evaluate run is writing its report there "
        f"({out / '.luna-evaluate.lock'} is locked); wait for it, or give this run its own --out")
    assert (out / "metrics.tsv").read_text() == "an earlier run\n"  # the running one's, left as it was
    stale = [out / ".metrics.tsv.999999.tmp", out / ".froc.png.12.tmp"]
    for path in stale:
        path.write_text("half")
    (out / ".notes.tmp").write_text("mine")
    assert ValidationApp(argv).main() == 0
    names = sorted(p.name for p in out.iterdir())
    assert ".notes.tmp" in names and "metrics.tsv" in names and "froc.png" in names
    assert not [name for name in names if name.startswith((".metrics", ".froc", ".luna-evaluate"))]
    assert (out / "metrics.tsv").read_text().startswith("fold\t")


def test_symlinked_report_files_are_written_through_and_unlinked_when_not_written(inputs, labelled_run, tmp_path):
    """A report file that is a symlink is written through (the link stays); one this run does not write
    (metrics_ci.tsv with --bootstrap 0) loses its link, and its target outside --out is left alone."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    symlinked_outputs(out, elsewhere, ("metrics.tsv", "metrics_ci.tsv"), "an earlier run\n")
    argv = report_argv(inputs, out)
    assert ValidationApp(argv).main() == 0
    assert (out / "metrics.tsv").is_symlink() and (elsewhere / "metrics.tsv").read_text().startswith("fold\t")
    assert not (out / "metrics_ci.tsv").exists() and not (out / "metrics_ci.tsv").is_symlink()
    assert (elsewhere / "metrics_ci.tsv").read_text() == "an earlier run\n"


# ----------------------------------------------------------------------------------------------------
# bad input: one line, exit 2
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing_model", "no_test_scans", "mixed_labels", "wrong_crop_shape", "bad_history",
                                  "no_fold", "fold_not_in_stores", "fold_without_candidates", "negative_seed",
                                  "fold_store_forgotten",
                                  "fold_with_selection_scans",
                                  "wrong_hu_window",
                                  "mixed_hu_windows", "mixed_crop_shapes"])
def test_bad_input_one_line_exit_2(inputs, tmp_path, capsys, case):
    argv = {"--model": str(inputs["model"]), "--crops": [str(inputs["store0"])], "--splits": str(inputs["splits"]),
            "--out": str(tmp_path / "out"), "--device": "cpu", "--fold": "0"}
    if case == "missing_model":
        argv["--model"] = str(tmp_path / "nope.pt")
        expected = "nope.pt"
    elif case == "no_test_scans":
        argv["--splits"] = str(write_splits(tmp_path / "s.tsv", {VAL_A: 1}))
        expected = "s.tsv: fold 0 has no scans"
    elif case == "no_fold":
        del argv["--fold"]
        expected = "model.pt: no test fold recorded; give --fold N"
    elif case == "fold_not_in_stores":
        argv["--splits"] = str(write_splits(tmp_path / "s.tsv", {"9.9.9": 0, VAL_A: 1}, subset="subset7"))
        expected = "subset0.h5: none of the 1 test scans (fold 0) is in these crop stores"
    elif case == "fold_store_forgotten":  # one of the fold's two subsets: its scans counted as without candidates
        splits = tmp_path / "s.tsv"
        pd.DataFrame({"series_uid": [VAL_A, "9.9.9", TRAIN_A], "subset": ["subset0", "subset1", "subset0"],
                      "fold": [0, 0, 1]}).to_csv(splits, sep="\t", index=False)
        argv["--splits"] = str(splits)
        expected = ("1 of the 2 test scans (fold 0) are in subset(s) subset1, whose crop store was not given; give "
                    "the stores of every subset of the fold")
    elif case == "fold_without_candidates":  # its subset's store is given and holds none of its candidates
        argv["--splits"] = str(write_splits(tmp_path / "s.tsv", {"9.9.9": 0, VAL_A: 1}))
        expected = (f"{inputs['store0']}: none of the 1 test scans (fold 0) has a candidate in the stores of its "
                    "subset: nothing to predict")
    elif case == "fold_with_selection_scans":  # --fold was ignored in silence there
        argv["--scans"] = "selection"
        argv["--fold"] = "1"
        expected = (f"--fold 1 does not apply to --scans selection (the scans that chose {inputs['model']}'s epoch "
                    "and threshold, recorded in it)")
    elif case == "negative_seed":  # numpy's bootstrap generator refused it with a traceback, after predicting
        argv["--seed"] = "-1"
        expected = "--seed must be >= 0, got -1"
    elif case == "mixed_labels":
        unlabelled = write_store(tmp_path / "u.h5", STORE1_ROWS, seed=2, subset="x", unlabelled=True)
        argv["--crops"].append(str(unlabelled))
        expected = "u.h5: row 0 (candidate_id 7) has no class label"
    elif case == "wrong_crop_shape":
        small = write_store(tmp_path / "small.h5", STORE1_ROWS, seed=2, subset="x", crop_shape=(8, 8, 8))
        argv["--crops"] = [str(small)]
        expected = "model.pt: the model was trained on crops of shape [32, 48, 48], " \
                   f"{tmp_path / 'small.h5'} holds [8, 8, 8]"
    elif case == "wrong_hu_window":  # the same HU values would mean other tissue: probabilities silently wrong
        argv["--model"] = str(save_checkpoint(tmp_path / "model.pt", ct_model(), epoch=EPOCH,
                                              extra={"test_fold": 0, "hu_window": [-500, 500]}))
        expected = (f"{tmp_path / 'model.pt'}: the model was trained on crops of HU window [-500, 500], "
                    f"{inputs['store0']} holds [-1000, 1000]")
    elif case == "mixed_crop_shapes":  # a second store of another shape: one line before any batch is read
        small = write_store(tmp_path / "s.h5", STORE1_ROWS, seed=2, subset="x", crop_shape=(8, 8, 8))
        argv["--crops"].append(str(small))
        expected = f"{small}: crop shape [8, 8, 8] differs from {inputs['store0']}'s [32, 48, 48]"
    elif case == "mixed_hu_windows":
        narrow = write_store(tmp_path / "n.h5", STORE1_ROWS, seed=2, subset="x", hu_window=(-500, 500))
        argv["--crops"].append(str(narrow))
        expected = f"{narrow}: HU window [-500, 500] differs from {inputs['store0']}'s [-1000, 1000]"
    else:
        (tmp_path / "h.tsv").write_text("epoch\tsplit\n1\ttrain\n")
        argv["--history"] = str(tmp_path / "h.tsv")
        expected = "h.tsv:1: missing column(s) loss_all"
    flat = [str(v) for key, value in argv.items() for v in ([key] + (value if isinstance(value, list) else [value]))]
    with pytest.raises(SystemExit) as exit_info:
        main(flat)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("luna-validate: error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ValidationApp(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--crops", "--splits", "--scans", "--fold", "--annotations", "--annotations-excluded",
                   "--history", "--out", "--batch-size", "--device", "--channels-last", "--threads", "--bootstrap",
                   "--seed", "--max-per-scan"):
        assert option in text


def test_crops_to_tensor_matches_training_dataset():
    crops = np.array([[[[-1000, 5], [300, 1000]]]], dtype=np.int16)  # (1, 1, 2, 2)
    tensor = crops_to_tensor(crops)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (1, 1, 1, 2, 2)
    assert tensor.flatten().tolist() == [-1000.0, 5.0, 300.0, 1000.0]


# ----------------------------------------------------------------------------------------------------
# end to end on real CT
# ----------------------------------------------------------------------------------------------------

# voxel positions (i, r, c) elsewhere in the LIDC slab (512 x 512 x 16): lung, mediastinum, body wall, air;
# all farther than 20 mm from the nodule (d 23.35 mm, so never a hit)
LIDC_OTHERS_IRC = [(7, 256, 256), (3, 200, 150), (12, 300, 380), (8, 150, 360), (5, 380, 160),
                   (10, 250, 100), (2, 420, 256), (14, 120, 250), (6, 330, 200), (9, 60, 60)]


@pytest.fixture(scope="module")
def lidc_case(tmp_path_factory) -> dict:
    """Crops of the real LIDC slab: the official nodule + 10 candidates elsewhere, cut by luna.crops."""
    from luna.cropping import cut_scan_crops
    from luna.ct import read_scan

    root = tmp_path_factory.mktemp("lidc")
    volume, geometry = read_scan(LIDC_MHD)
    nodule = read_annotations_csv(LIDC_DIR / "annotations.csv").iloc[0]
    nodule_xyz = nodule[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
    centers = np.vstack([nodule_xyz, irc_to_xyz(np.array(LIDC_OTHERS_IRC, dtype=np.float64), geometry)])
    assert np.all(np.linalg.norm(centers[1:] - nodule_xyz, axis=1) > 20.0)
    crops, center_irc, start_irc, inside = cut_scan_crops(volume, geometry, centers, CROP_SHAPE, (-1000, 1000))
    assert inside.all()
    n = len(centers)
    labels = np.r_[1, np.zeros(n - 1)].astype(np.int8)
    store = root / "lidc.h5"
    with StoreWriter(store, n, CROP_SHAPE, (-1000, 1000), subset="lidc") as writer:
        writer.add_scan(LIDC_UID, geometry, volume.shape)
        writer.write_rows(np.arange(n), crops, {
            "candidate_id": np.arange(100, 100 + n), "series_uid": np.array([LIDC_UID] * n, dtype=object),
            "center_xyz": centers, "center_irc": center_irc, "crop_start_irc": start_irc, "is_nodule": labels,
            "diameter_mm": np.r_[nodule["diameter_mm"], np.zeros(n - 1)].astype(np.float32)})
        writer.commit()
    splits = write_splits(root / "splits.tsv", {LIDC_UID: 0})

    # independent crop of the nodule: clip, pad the 16-slice slab with air, slice around the voxel
    nodule_irc = xyz_to_irc(nodule_xyz, geometry)
    padded = np.pad(np.clip(volume, -1000, 1000), ((16, 16), (0, 0), (0, 0)), constant_values=-1000)
    i0 = 16 + max(min(nodule_irc[0] - 16, 0), 16 - 32)  # border rule, scan smaller than the crop in z
    r0, c0 = nodule_irc[1] - 24, nodule_irc[2] - 24
    nodule_crop = padded[i0:i0 + 32, r0:r0 + 48, c0:c0 + 48]
    return {"store": store, "splits": splits, "crops": crops, "labels": labels, "nodule_crop": nodule_crop,
            "n": n, "root": root}


def train_head(crops: np.ndarray, labels: np.ndarray, steps: int = 200) -> LunaModel:
    """The book's model, seeded, with its tail BatchNorm statistics taken from the crops and its head trained
    (Adam, positive class weighted by the imbalance) on the frozen convolutional features: a trained model
    in a fraction of a second, where backpropagating through the 3-D convolutions takes minutes on 2 cores."""
    torch.manual_seed(0)
    model = LunaModel().eval()
    x = crops_to_tensor(crops)
    with torch.no_grad():
        model.tail_batchnorm.running_mean.fill_(float(x.mean()))
        model.tail_batchnorm.running_var.fill_(float(x.var()))
        features = x
        for block in (model.tail_batchnorm, model.block1, model.block2, model.block3, model.block4):
            features = block(features)
        features = features.reshape(len(x), -1)
    y = torch.from_numpy(labels.astype(np.int64))
    weight = torch.tensor([1.0, float((labels == 0).sum())])
    optimizer = torch.optim.Adam(model.head_linear.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.head_linear(features), y, weight=weight).backward()
        optimizer.step()
    return model


def test_lidc_end_to_end(lidc_case, tmp_path):
    crops, labels = lidc_case["crops"], lidc_case["labels"]
    np.testing.assert_array_equal(crops[0], lidc_case["nodule_crop"])
    assert crops[0].min() == -1000 and crops[0].max() > 0  # air padding in z, soft tissue of the nodule
    model = train_head(crops, labels)
    checkpoint = save_checkpoint(tmp_path / "model.pt", model, epoch=1)
    out = tmp_path / "out"
    argv = ["--model", str(checkpoint), "--crops", str(lidc_case["store"]), "--splits", str(lidc_case["splits"]),
            "--annotations", str(LIDC_DIR / "annotations.csv"), "--out", str(out), "--device", "cpu", "--fold", "0"]
    assert ValidationApp(argv).main() == 0

    predictions = read_tsv(out / "predictions.tsv")
    assert predictions["candidate_id"].tolist() == list(range(100, 100 + lidc_case["n"]))
    assert (predictions["series_uid"] == LIDC_UID).all()
    assert predictions["is_nodule"].tolist() == labels.tolist()
    with torch.no_grad():
        _, probability = model(crops_to_tensor(np.stack([lidc_case["nodule_crop"], *crops[1:]])))
    np.testing.assert_allclose(predictions["probability"], probability[:, 1].numpy(), atol=1e-5)

    metrics = read_tsv(out / "metrics.tsv").iloc[0]
    assert (metrics["n"], metrics["n_pos"], metrics["n_neg"], metrics["epoch"]) == (11, 1, 10, 1)
    # the briefly trained model ranks the real nodule above the 10 other places of the slab
    nodule_p = predictions["probability"].iloc[0]
    assert nodule_p > predictions["probability"].iloc[1:].max()
    assert metrics["auc"] == 1.0
    # one scan, one nodule, hit first (no FP above it): sensitivity 1 at every rate, CPM 1
    assert metrics["cpm"] == 1.0
    curve = read_tsv(out / "froc.tsv")
    assert curve["fp_per_scan"].iloc[-1] == pytest.approx(10.0)
    assert curve.iloc[1]["threshold"] == pytest.approx(nodule_p) and curve.iloc[1]["sensitivity"] == 1.0
    for name in ("roc.png", "pr.png", "froc.png"):
        assert_valid_png(out / name)


def test_tta_averages_the_mirror_views():
    from luna.inference import TTA_FLIPS, tta_probabilities

    model = ct_model(3)
    batch = torch.from_numpy(np.stack([synthetic_crop(np.random.default_rng(k), k % 2 == 0) for k in range(3)])
                             .astype(np.float32))[:, None]
    with torch.no_grad():
        views = [torch.softmax(model(torch.flip(batch, d) if d else batch)[0], 1) for d in TTA_FLIPS["flip4"]]
        expected = torch.stack(views).mean(0)
        torch.testing.assert_close(tta_probabilities(model, batch, "flip4"), expected)
        torch.testing.assert_close(tta_probabilities(model, batch, "none"), views[0])
        # flip2: the crop and its 180-degree in-plane rotation (rows and columns mirrored), the last flip4 view
        torch.testing.assert_close(tta_probabilities(model, batch, "flip2"), (views[0] + views[3]) / 2)
        # flip4z: flip2's two views and their depth (slice-order) mirrors
        depth = [torch.softmax(model(torch.flip(batch, d))[0], 1) for d in ((2,), (2, 3, 4))]
        assert not torch.allclose(depth[0], views[0])  # the crops are not symmetric in depth
        torch.testing.assert_close(tta_probabilities(model, batch, "flip4z"),
                                   (views[0] + views[3] + depth[0] + depth[1]) / 4)
        # flip2z: the crop and its point mirror (all three axes), flip4z's first and last views
        torch.testing.assert_close(tta_probabilities(model, batch, "flip2z"), (views[0] + depth[1]) / 2)
    assert len(TTA_FLIPS["flip8"]) == 8 and len(set(TTA_FLIPS["flip8"])) == 8


def test_a_test_fold_the_model_trained_or_chose_on_is_refused(inputs, tmp_path, caplog):
    """model.pt records its training and selection scans: predicting them as a test fold (another splits.tsv, or
    --fold of a trained-on fold) would report numbers that are not held out."""
    from luna.validation import PredictApp

    model = save_checkpoint(tmp_path / "model.pt", ct_model(), epoch=1,
                            extra={"test_fold": 0, "train_series_uids": [TRAIN_A, VAL_B],
                                   "selection_series_uids": []})
    argv = ["--model", str(model), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--out", str(tmp_path / "p.tsv"), "--device", "cpu"]
    with pytest.raises(ValueError) as info:
        PredictApp(argv).run()
    assert str(info.value) == (f"{inputs['splits']}: 1 of the 3 scans of fold 0 are in {model}'s train scans (e.g. "
                               f"{VAL_B}); predict with the splits.tsv the model was trained with")
    assert not (tmp_path / "p.tsv").exists()
    # --scans all predicts them, says so, and labels the numbers "all", never "test"
    out = tmp_path / "all"
    argv_all = ["--model", str(model), "--crops", str(inputs["store0"]), str(inputs["store1"]),
                "--annotations", str(inputs["annotations"]), "--out", str(out), "--device", "cpu", "--scans", "all",
                "--bootstrap", "0"]
    with caplog.at_level(logging.WARNING, logger="luna"):
        assert ValidationApp(argv_all).main() == 0
    assert f"--scans all: 2 of the 4 scans are {model}'s training or selection scans" in caplog.text
    assert read_tsv(out / "metrics.tsv")["split"].tolist() == ["all", "all"]
    held_out = save_checkpoint(tmp_path / "held_out.pt", ct_model(), epoch=1,
                               extra={"test_fold": 0, "train_series_uids": [TRAIN_A], "selection_series_uids": [],
                                      "args": {"tta": "flip99"}})
    argv[1] = str(held_out)
    with pytest.raises(ValueError, match=r"test-time augmentation 'flip99', which this version does not know"):
        PredictApp(argv).run()


def test_predict_takes_the_test_fold_under_luna_trains_name(inputs, tmp_path):
    """luna-train names the held-out fold --test-fold; luna-predict takes that name as well as --fold, with the
    same result (the fixture's model records no test fold, so without either it is refused)."""
    from luna.validation import PredictApp

    base = ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]), "--splits",
            str(inputs["splits"]), "--device", "cpu"]
    written = {}
    for option in ("--fold", "--test-fold"):
        out = tmp_path / f"{option.strip('-')}.tsv"
        result = PredictApp([*base, option, "0", "--out", str(out)]).run()
        assert result.fold == 0 and sorted(result.scans) == sorted([VAL_A, VAL_B, VAL_EMPTY])
        written[option] = out.read_bytes()
    assert written["--fold"] == written["--test-fold"]
    assert len(pd.read_csv(tmp_path / "test-fold.tsv", sep="\t")) > 0
    with pytest.raises(ValueError, match="no test fold recorded; give --fold N"):
        PredictApp([*base, "--out", str(tmp_path / "none.tsv")]).run()


def test_evaluate_refuses_a_test_fold_the_model_trained_on(inputs, tmp_path):
    """luna-predict refuses a splits.tsv whose test fold holds the model's training scans; luna-evaluate took one
    (stale or edited) and reported its numbers as held out."""
    from luna.validation import PredictApp

    folder = tmp_path / "folds" / "0"
    model = save_checkpoint(folder / "model.pt", ct_model(), epoch=1,
                            extra={"test_fold": 0, "train_series_uids": [TRAIN_A], "selection_series_uids": []})
    assert PredictApp(["--model", str(model), "--crops", str(inputs["store0"]), str(inputs["store1"]), "--splits",
                       str(inputs["splits"]), "--out", str(folder / "predictions.tsv"), "--device", "cpu"]).main() == 0
    argv = ["--folds", str(folder), "--annotations", str(inputs["annotations"]), "--out", str(tmp_path / "v"),
            "--bootstrap", "0", "--splits"]
    assert EvaluateApp([*argv, str(inputs["splits"])]).main() == 0  # the splits.tsv it was trained with
    stale = write_splits(tmp_path / "stale.tsv", {VAL_A: 0, VAL_B: 0, VAL_EMPTY: 0, TRAIN_A: 0})
    with pytest.raises(ValueError) as info:
        EvaluateApp([*argv, str(stale)]).run()
    assert str(info.value) == (f"{stale}: 1 of the 4 scans of test fold 0 are in {model}'s train scans (e.g. "
                               f"{TRAIN_A}); evaluate with the splits.tsv the model was trained with")


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    from luna.app import StageApp

    class Interrupted(StageApp):
        prog = "luna-demo"

        def add_arguments(self, parser):
            pass

        def run(self):
            raise KeyboardInterrupt

    assert Interrupted([]).main() == 130
    assert capsys.readouterr().err == "luna-demo: interrupted\n"


def test_predict_out_that_is_a_folder_is_refused_before_predicting(inputs, tmp_path, capsys):
    """--out names the predictions.tsv file: a folder there is found before the model runs (on a LUNA16 fold that
    is tens of minutes of CPU), in one line."""
    from luna.validation import main_predict

    folder = tmp_path / "fold0"
    folder.mkdir()
    argv = ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--out", str(folder), "--device", "cpu", "--fold", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main_predict(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == (f"luna-predict: error: {folder}: is a folder; --out names the predictions.tsv file to "
                            "write\n")
    assert "predicted" not in captured.err + captured.out and list(folder.iterdir()) == []


def test_froc_plot_draws_the_interpolation_the_sensitivities_are_read_from():
    """A tied threshold that gains hits and false positives at once is a diagonal segment in linear FP space; on
    the plot's log axis it is drawn subdivided, so the curve passes through the reported sensitivities."""
    from luna.plots import froc_plot_points

    fp = np.array([0.0625, 0.1, 1.0, 1.0, 6.0])
    sensitivity = np.array([0.0, 0.1, 0.5, 0.6, 0.9])
    x, y = froc_plot_points(fp, sensitivity)
    assert np.all(np.diff(x) >= 0) and x[0] == fp[0] and x[-1] == fp[-1] and len(x) == 5 + 3 * 30
    for rate in FROC_RATES:  # what the drawn polyline shows at each rate, read on the log axis
        drawn = np.interp(np.log(rate), np.log(x), y)
        assert drawn == pytest.approx(np.interp(rate, fp, sensitivity), abs=2e-3), rate
    # the vertical step at FP 1.0 stays vertical (both of its points, in order)
    at_one = np.flatnonzero(x == 1.0)
    assert y[at_one].tolist() == [0.5, 0.6]


def test_nodules_on_scans_not_on_disk_are_said(caplog) -> None:
    """A partial download: the CPM counts the scans on disk only, where LUNA16's script counts every scan of
    seriesuids.csv (a missing scan's nodules as missed); luna-evaluate says so, with the counts."""
    from luna.evaluation import note_nodules_off_disk

    annotations = pd.DataFrame({"seriesuid": ["1.1", "1.1", "2.2", "3.3"]})
    splits = pd.DataFrame({"series_uid": ["1.1", "4.4"], "subset": "subset0", "fold": [0, 0]})
    with caplog.at_level(logging.WARNING, logger="luna.evaluation"):
        note_nodules_off_disk(annotations, splits, "annotations.csv", "splits.tsv")
    assert ("2 of the 4 nodules of annotations.csv lie on 2 scans not in splits.tsv (not on disk): no FROC here "
            "counts them") in caplog.text
    caplog.clear()
    note_nodules_off_disk(annotations.iloc[:2], splits, "annotations.csv", "splits.tsv")
    assert caplog.text == ""


def test_folds_of_different_luna_sources_are_said(caplog) -> None:
    """Snakemake does not rerun a fold when the package changes: a pooled report of models made by two versions
    of luna is said, naming each fold's source hash."""
    from luna.evaluation import FoldPredictions, note_mixed_code

    def fold(k: int, code: str) -> FoldPredictions:
        return FoldPredictions(k, pd.DataFrame(), [], 0.5, 1, code=code)

    with caplog.at_level(logging.WARNING, logger="luna.evaluation"):
        note_mixed_code([fold(1, "b" * 64), fold(0, "a" * 64)])
    assert ("the pooled folds' models were trained with 2 different luna sources (model.pt provenance.source_sha256: "
            f"fold 0 {'a' * 12}, fold 1 {'b' * 12})") in caplog.text
    caplog.clear()
    note_mixed_code([fold(0, "a" * 64), fold(1, "a" * 64), fold(2, "")])
    assert caplog.text == ""


def two_predicted_folds(inputs, tmp_path) -> tuple[Path, list[Path]]:
    """Folds 3 and 5 of the inputs, each predicted by its own model: (splits.tsv, fold folders)."""
    from luna.validation import PredictApp

    splits = write_splits(tmp_path / "splits.tsv", {VAL_A: 3, VAL_B: 5, VAL_EMPTY: 5, TRAIN_A: 1})
    folds = []
    for fold in (3, 5):
        folder = tmp_path / "folds" / str(fold)
        save_checkpoint(folder / "model.pt", ct_model(fold), epoch=2, extra={"test_fold": fold, "threshold": 0.5})
        assert PredictApp(["--model", str(folder / "model.pt"), "--crops", str(inputs["store0"]), str(inputs["store1"]),
                           "--splits", str(splits), "--out", str(folder / "predictions.tsv"),
                           "--device", "cpu"]).main() == 0
        folds.append(folder)
    return splits, folds


def test_refused_inputs_leave_an_earlier_report_and_every_input_alone(inputs, tmp_path, capsys):
    """A refused input (labelled and unlabelled folds pooled, a bad loss) is found before --out is touched: the
    earlier report stays whole. An output that is an input (--out one of the fold folders; luna-predict --out its
    own model) is refused in one line and the input stays as it was."""
    splits, folds = two_predicted_folds(inputs, tmp_path)
    out = tmp_path / "report"
    base = ["--splits", str(splits), "--annotations", str(inputs["annotations"]), "--bootstrap", "0"]
    assert EvaluateApp(["--folds", *map(str, folds), *base, "--out", str(out)]).main() == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "metrics.tsv" in before
    # fold 5's candidates without a class (a predict-only candidate list) pooled with fold 3's labelled ones
    unlabelled = tmp_path / "u" / "5"
    unlabelled.mkdir(parents=True)
    (unlabelled / "model.pt").write_bytes((folds[1] / "model.pt").read_bytes())
    frame = pd.read_csv(folds[1] / "predictions.tsv", sep="\t")
    frame["is_nodule"], frame["loss"] = np.nan, np.nan
    frame.to_csv(unlabelled / "predictions.tsv", sep="\t", index=False, na_rep="NaN")
    assert EvaluateApp(["--folds", str(folds[0]), str(unlabelled), *base, "--out", str(out)]).main() == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"luna-evaluate: error: {unlabelled / 'predictions.tsv'}: the candidates have no class, those of "
                   f"{folds[0] / 'predictions.tsv'} have one; pool the predictions of one candidate list")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a loss that is not a finite number >= 0 on a labelled row
    for value in ("-5", "inf", "NaN"):
        bad = tmp_path / f"loss{value}" / "5"
        bad.mkdir(parents=True)
        (bad / "model.pt").write_bytes((folds[1] / "model.pt").read_bytes())
        frame = pd.read_csv(folds[1] / "predictions.tsv", sep="\t")
        frame["loss"] = frame["loss"].astype(object)
        frame.loc[1, "loss"] = value
        frame.to_csv(bad / "predictions.tsv", sep="\t", index=False)
        assert EvaluateApp(["--folds", str(bad), *base, "--out", str(out)]).main() == 2
        assert f"{bad / 'predictions.tsv'}:3: loss = " in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a header-only predictions.tsv (truncated, emptied) was a report: CPM 0 over the fold's scans, exit 0
    empty = tmp_path / "empty" / "5"
    empty.mkdir(parents=True)
    (empty / "model.pt").write_bytes((folds[1] / "model.pt").read_bytes())
    header = (folds[1] / "predictions.tsv").read_text().splitlines()[0]
    (empty / "predictions.tsv").write_text(header + "\n")
    n_scans = int((pd.read_csv(splits, sep="\t")["fold"] == 5).sum())
    assert EvaluateApp(["--folds", str(empty), *base, "--out", str(out)]).main() == 2
    assert capsys.readouterr().err.strip() == (f"luna-evaluate: error: {empty / 'predictions.tsv'}: no rows, for test "
                                               f"fold 5's {n_scans} scans (a truncated file? rerun luna-predict)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --out one of the folds: its predictions.tsv would become the pooled rows
    fold_bytes = (folds[1] / "predictions.tsv").read_bytes()
    assert EvaluateApp(["--folds", *map(str, folds), *base, "--out", str(folds[1])]).main() == 2
    assert capsys.readouterr().err.strip() == (
        f"luna-evaluate: error: the report file {folds[1] / 'predictions.tsv'} is the input --folds "
        f"{folds[1] / 'predictions.tsv'}; write the output elsewhere")
    assert (folds[1] / "predictions.tsv").read_bytes() == fold_bytes
    from luna.validation import PredictApp

    model_bytes = (folds[0] / "model.pt").read_bytes()
    assert PredictApp(["--model", str(folds[0] / "model.pt"), "--crops", str(inputs["store0"]), "--splits",
                       str(splits), "--out", str(folds[0] / "model.pt"), "--device", "cpu"]).main() == 2
    assert capsys.readouterr().err.strip() == (
        f"luna-predict: error: --out {folds[0] / 'model.pt'} is the input --model {folds[0] / 'model.pt'}; write "
        "the output elsewhere")
    assert (folds[0] / "model.pt").read_bytes() == model_bytes
    # a bootstrap past the cap: one line (it was a MemoryError traceback), before --out is touched
    assert EvaluateApp(["--folds", *map(str, folds), *base[:-2], "--bootstrap", "1000000000000",
                        "--out", str(out)]).main() == 2
    assert "--bootstrap must be >= 0 and <= 100000, got 1000000000000" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("case", ["negative_fold", "selection_without_test_fold", "unknown_tta", "nan_threshold",
                                  "damaged_store", "missing_store", "threads"])
def test_more_bad_inputs_one_line_exit_2_and_no_output_folder(inputs, tmp_path, capsys, case):
    """Each was a traceback, a fold luna-evaluate refuses later, or an output folder made for a refused input."""
    argv = ["--model", str(inputs["model"]), "--crops", str(inputs["store0"]), str(inputs["store1"]),
            "--splits", str(inputs["splits"]), "--out", str(tmp_path / "out"), "--device", "cpu", "--fold", "0"]
    if case == "negative_fold":
        argv[argv.index("--fold") + 1] = "-3"
        expected = "--fold must be >= 0, got -3"
    elif case == "threads":  # 99999 OpenMP threads crashed the process (segfault)
        import os

        argv += ["--threads", "99999"]
        expected = f"--threads must be from 0 to {4 * (os.cpu_count() or 1)} (4 per CPU of this machine), got 99999"
    elif case == "selection_without_test_fold":
        model = save_checkpoint(tmp_path / "m.pt", ct_model(), epoch=1, extra={"selection_series_uids": [VAL_A]})
        argv = [*argv[:argv.index("--fold")], "--model", str(model), "--scans", "selection"]
        expected = f"{model}: no test fold recorded (the fold column of its selection rows)"
    elif case == "unknown_tta":
        model = save_checkpoint(tmp_path / "m.pt", ct_model(), epoch=1, extra={"test_fold": 0,
                                                                               "args": {"tta": "flip99"}})
        argv += ["--model", str(model)]
        expected = "the model's selection pass used test-time augmentation 'flip99'"
    elif case == "nan_threshold":
        model = save_checkpoint(tmp_path / "m.pt", ct_model(), epoch=1, extra={"test_fold": 0,
                                                                               "threshold": float("nan")})
        argv += ["--model", str(model)]
        expected = "checkpoint field threshold = nan, expected a finite number"
    elif case == "damaged_store":  # a chunk of a compressed store zeroed: h5py's filter fails on read
        import h5py

        damaged = tmp_path / "subset0.h5"
        damaged.write_bytes(inputs["store0"].read_bytes())
        with h5py.File(inputs["store0"], "r") as f:
            crops = f["crops"][:]
        with h5py.File(damaged, "r+") as f:
            del f["crops"]
            f.create_dataset("crops", data=crops, chunks=(1, *CROP_SHAPE), compression="gzip")
        with h5py.File(damaged, "r") as f:
            offset = f["crops"].id.get_chunk_info(0).byte_offset
        with open(damaged, "r+b") as fh:
            fh.seek(offset)
            fh.write(b"\0" * 64)
        argv[argv.index(str(inputs["store0"]))] = str(damaged)
        expected = f"{damaged}: cannot read the crops of row"
    else:
        argv[argv.index(str(inputs["store0"]))] = str(tmp_path / "nope.h5")
        expected = f"{tmp_path / 'nope.h5'}: no such crop store"
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    if case == "damaged_store":  # found while predicting, once the output folder was checked: left empty
        assert list((tmp_path / "out").iterdir()) == []
    else:
        assert not (tmp_path / "out").exists()
