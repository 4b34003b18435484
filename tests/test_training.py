"""LunaTrainingApp: one test fold held out, selection-only choices, outputs per docs/design.md, determinism,
kill -9 + resume, code-version fingerprint, DDP under torchrun (gloo), errors."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import symlinked_outputs
from hooks import hook_env
from luna.evaluation import PREDICTION_COLUMNS
from luna.metrics import HISTORY_COLUMNS
from luna.model import LunaModel, load_model
from luna.recipe import ema_decay_at, ema_update, make_optimizer, warmup_lr
from luna.train_state import default_state_dir
from luna.training import LunaTrainingApp, main
from luna.training_options import build_parser, resolve_workers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import make_store, write_splits  # noqa: E402

BIN = Path(sys.executable).parent
EPOCHS, SAMPLES, BATCH = 2, 32, 8
SELECTION = 0.3  # with folds k % 4 and test fold 0: test scans .0 .4, selection .1 .3, train .2 .5 .6 .7
BASE = ["--crops", "a", "--splits", "b", "--out", "c", "--test-fold", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    uids = make_store(root / "subset0.h5", n=40, n_pos=8, n_scans=8, seed=0)
    return {"root": root, "crops": root / "subset0.h5", "splits": write_splits(root / "splits.tsv", uids)}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--crops", str(data["crops"]), "--splits", str(data["splits"]), "--out", str(out),
            "--test-fold", "0", "--selection-fraction", str(SELECTION),
            "--epochs", str(EPOCHS), "--samples-per-epoch", str(SAMPLES), "--batch-size", str(BATCH),
            "--threads", "2", "--tb-dir", "none", "--lr-warmup-steps", "6", "--clip-grad-norm", "5", *extra]


@pytest.fixture(scope="module")
def reference(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted in-process run (seed 0) whose outputs the other tests compare against."""
    out = tmp_path_factory.mktemp("reference") / "model"
    assert LunaTrainingApp(argv(data, out, "--tb-dir", str(out.parent / "tb"))).main() == 0
    return out


def test_help_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        LunaTrainingApp(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--crops", "--splits", "--out", "--state", "--resume", "--tb-dir", "--comment", "--epochs",
                 "--test-fold", "--selection-fraction", "--keep", "--threshold", "--selection-interval",
                 "--samples-per-epoch", "--batch-size", "--lr", "--momentum", "--balanced",
                 "--seed", "--augment-flip", "--augment-offset", "--augment-scale", "--augment-rotate",
                 "--augment-noise", "--device", "--amp", "--channels-last", "--no-channels-last",
                 "--num-workers", "--threads", "--lr-warmup-steps", "--clip-grad-norm", "--ema-decay",
                 "--optimizer", "--weight-decay", "--balanced-schedule"]:
        assert flag in text, flag
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    assert "(default: 0.001)" in text and "(default: 0.99)" in text


def test_loader_workers_auto_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args(BASE).num_workers == "auto"
    assert resolve_workers("auto", torch.device("cpu")) == 0  # workers only compete with the model on a CPU
    assert resolve_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", torch.device("cuda")) == 8
    assert resolve_workers("auto", torch.device("cuda"), processes=4) == 3  # 4 GPUs share the 15 cores: was 8 each
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert resolve_workers("auto", torch.device("cuda")) == 1
    # --threads (the rule's threads in the workflow) caps them: a local run with 16 cores and the rule's 2
    # threads starts 1 worker, as a 2-CPU SLURM job would, not 8 beside the jobs Snakemake gave the other cores
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", torch.device("cuda"), cores=2) == 1
    assert resolve_workers("auto", torch.device("cuda"), processes=4, cores=4) == 3  # --threads is per process
    assert resolve_workers("auto", torch.device("cuda"), cores=32) == 8
    assert resolve_workers("auto", torch.device("cuda"), cores=1) == 0
    assert resolve_workers("auto", torch.device("cpu"), cores=8) == 0
    assert resolve_workers(5, torch.device("cuda"), cores=2) == 5  # a number given is taken as it is
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--num-workers", "-1"])


def test_warmup_schedule_is_a_pure_function_of_the_step() -> None:
    assert [warmup_lr(0.001, step, 4) for step in range(6)] == pytest.approx(
        [0.00025, 0.0005, 0.00075, 0.001, 0.001, 0.001])
    assert warmup_lr(0.001, 0, 0) == 0.001  # 0 = off: the book's constant rate from the first step


def test_cosine_schedule_decays_to_zero_after_the_warmup() -> None:
    from luna.recipe import scheduled_lr

    rates = [scheduled_lr(0.002, step, 4, "cosine", 20) for step in range(21)]
    assert rates[:4] == pytest.approx([0.0005, 0.001, 0.0015, 0.002])  # the warm-up
    assert rates[12] == pytest.approx(0.001) and rates[20] == pytest.approx(0.0)  # half-way, the end
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert scheduled_lr(0.002, 15, 4, "constant", 20) == 0.002


def test_warmup_sets_the_rate_and_clipping_bounds_the_step(data: dict[str, Path], tmp_path: Path) -> None:
    app = LunaTrainingApp(argv(data, tmp_path / "w"))
    app.setup()
    app._train_epoch(1)  # steps 0..3 of a 6-step warm-up
    assert app.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 4 / 6)
    # a clip far below the gradient's norm, no momentum: 4 steps move the weights by at most 4 * lr * max
    app = LunaTrainingApp(argv(data, tmp_path / "c", "--clip-grad-norm", "1e-6", "--momentum", "0"))
    app.setup()
    before = torch.cat([q.detach().flatten().clone() for q in app.model.parameters()])
    app._train_epoch(1)
    after = torch.cat([q.detach().flatten() for q in app.model.parameters()])
    assert 0 < float((after - before).norm()) <= 4 * 0.001 * 1e-6 * 1.001


def test_optimizer_is_the_books_sgd_unless_asked() -> None:
    base = BASE
    model = torch.nn.Linear(3, 2)
    sgd = make_optimizer(build_parser().parse_args(base), model)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["lr"] == 0.001 and sgd.defaults["momentum"] == 0.99
    adam = make_optimizer(build_parser().parse_args([*base, "--optimizer", "adam", "--lr", "0.0003"]), model)
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["lr"] == 0.0003 and adam.defaults["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in adam.param_groups] == [0.0]  # the book: no weight decay
    model = LunaModel()
    adamw = make_optimizer(build_parser().parse_args([*base, "--optimizer", "adamw", "--weight-decay", "0.05"]), model)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 0.001
    decayed, rest = adamw.param_groups
    assert decayed["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    # conv and linear weights decay; biases and BatchNorm's scale and shift do not
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == sorted(
        n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    assert any("batchnorm" in names[id(p)] for p in rest["params"])
    assert len(decayed["params"]) + len(rest["params"]) == len(list(model.parameters()))
    sgd_wd = make_optimizer(build_parser().parse_args([*base, "--weight-decay", "1e-4"]), model)
    assert [g["weight_decay"] for g in sgd_wd.param_groups] == [1e-4, 0.0]
    # decoupled: one AdamW step on zero gradients shrinks a decayed weight by lr * wd and leaves a bias alone
    layer = torch.nn.Linear(3, 2)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = make_optimizer(build_parser().parse_args([*base, "--optimizer", "adamw", "--weight-decay", "0.5"]), layer)
    layer.weight.grad, layer.bias.grad = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    opt.step()
    assert torch.allclose(layer.weight, before_w * (1 - 0.001 * 0.5)) and torch.equal(layer.bias, before_b)
    for bad in (["--optimizer", "lbfgs"], ["--weight-decay", "-0.1"], ["--weight-decay", "nan"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])


def test_balanced_schedule_option_parses_epoch_ratio_pairs(data: dict[str, Path], tmp_path: Path) -> None:
    base = BASE
    assert build_parser().parse_args(base).balanced_schedule == []
    assert build_parser().parse_args([*base, "--balanced-schedule", "7:8", "3:2"]).balanced_schedule == [(7, 8), (3, 2)]
    for bad in ("7", "0:3", "2:-1", "a:b"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--balanced-schedule", bad])
    # ratios may be fractions (0.5: two positives per negative); whole ones stay ints
    assert build_parser().parse_args([*base, "--balanced", "0.5", "--balanced-schedule", "7:0.25"]).balanced_schedule \
        == [(7, 0.25)]
    assert build_parser().parse_args([*base, "--balanced", "0.5"]).balanced == 0.5
    ratio = build_parser().parse_args([*base, "--balanced", "3.0"]).balanced
    assert ratio == 3 and isinstance(ratio, int)
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--balanced", bad])
    # epoch 2 of the run trains at 1:3 (8 of 32 samples positive) instead of --balanced's 1:1
    out = tmp_path / "sched"
    assert LunaTrainingApp(argv(data, out, "--balanced-schedule", "2:3")).main() == 0
    train = pd.read_csv(out / "history.tsv", sep="\t").query("split == 'train'")
    assert train.n_pos.tolist() == [SAMPLES // 2, SAMPLES // 4]


def test_hard_negatives_are_mined_from_epoch_2_and_resumed(data: dict[str, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert LunaTrainingApp(argv(data, whole, "--hard-negatives", "0.5")).main() == 0
    state = torch.load(default_state_dir(whole) / "last.pt", weights_only=True)
    item_loss = state["sampler_state"]["item_loss"].numpy()
    assert np.isfinite(item_loss).sum() >= 8 and (item_loss[np.isfinite(item_loss)] >= 0).all()
    # epoch 1 is the book's order; epoch 2 differs from the unmined run's
    plain = pd.read_csv(tmp_path / "whole" / "history.tsv", sep="\t").query("split == 'train'")
    assert LunaTrainingApp(argv(data, tmp_path / "plain")).main() == 0
    other = pd.read_csv(tmp_path / "plain" / "history.tsv", sep="\t").query("split == 'train'")
    assert plain.loss_all.iloc[0] == other.loss_all.iloc[0]
    assert plain.loss_all.iloc[1] != other.loss_all.iloc[1]
    # one epoch, then a resumed second (the losses come back with the state): the uninterrupted run's history
    part = tmp_path / "part"
    assert LunaTrainingApp(argv(data, part, "--hard-negatives", "0.5", "--epochs", "1")).main() == 0
    assert LunaTrainingApp(argv(data, part, "--hard-negatives", "0.5", "--resume")).main() == 0
    assert (part / "history.tsv").read_bytes() == (whole / "history.tsv").read_bytes()
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--hard-negatives", "1"])


def test_flip_only_last_epochs_change_only_those_epochs(reference: Path, data: dict[str, Path], tmp_path: Path,
                                                        caplog) -> None:
    from luna.data import AugmentConfig
    from luna.recipe import augment_config

    args = build_parser().parse_args([*BASE, "--epochs", "8", "--augment-flip-only-epochs", "2",
                                      "--augment-noise", "10"])
    book = AugmentConfig(flip=True, offset=0.1, scale=0.2, rotate=True, noise_hu=10.0)
    flips = AugmentConfig(flip=True, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)
    assert [augment_config(args, e) for e in range(1, 9)] == [book] * 6 + [flips] * 2
    assert augment_config(args) == book  # the run's settings
    assert not augment_config(build_parser().parse_args([*BASE, "--no-augment", "--augment-flip-only-epochs", "1"]),
                              1).enabled
    # two epochs, the last flip-only: the first is the reference's step for step, the second is not
    out = tmp_path / "model"
    assert LunaTrainingApp(argv(data, out, "--augment-flip-only-epochs", "1")).main() == 0
    assert "E2: augmentation flips only (the last 1 epoch(s), --augment-flip-only-epochs)" in caplog.text
    assert "E1: augmentation flips only" not in caplog.text
    ours = pd.read_csv(out / "history.tsv", sep="\t")
    theirs = pd.read_csv(reference / "history.tsv", sep="\t")
    assert ours.iloc[:2].equals(theirs.iloc[:2])
    assert ours.loss_all.iloc[2] != theirs.loss_all.iloc[2]
    # which epochs are flip-only depends on the run's length: a resume to more epochs is another run
    part, state = tmp_path / "part", tmp_path / "state"
    assert LunaTrainingApp(argv(data, part, "--state", str(state), "--epochs", "1",
                                "--augment-flip-only-epochs", "1")).main() == 0
    caplog.clear()
    assert LunaTrainingApp(argv(data, part, "--state", str(state), "--resume",
                                "--augment-flip-only-epochs", "1")).main() == 0
    assert "written with other settings, inputs or code (epochs 1 -> 2); starting at epoch 1" in caplog.text
    assert (part / "history.tsv").read_bytes() == (out / "history.tsv").read_bytes()


def test_ema_update_averages_weights_and_statistics() -> None:
    ema, model = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
        model.running_mean.fill_(10.0)
        model.num_batches_tracked.fill_(7)
    ema_update(ema, model, 0.75)
    assert ema.weight.tolist() == [1.5, 1.5]  # 0.75 * 1 + 0.25 * 3
    assert ema.running_mean.tolist() == [2.5, 2.5]  # 0.75 * 0 + 0.25 * 10
    assert int(ema.num_batches_tracked) == 7  # integer buffers are copied
    assert model.weight.tolist() == [3.0, 3.0]
    # the decay starts low so the random init is forgotten quickly, then holds at the asked value
    assert [ema_decay_at(0.99, s) for s in (0, 1, 10, 1000)] == pytest.approx([0.1, 2 / 11, 0.55, 0.99])
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--ema-decay", "1"])


def test_ema_weights_are_validated_kept_and_resumed(data: dict[str, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert LunaTrainingApp(argv(data, whole, "--ema-decay", "0.9")).main() == 0
    state = torch.load(default_state_dir(whole) / "last.pt", weights_only=True)
    assert any(not torch.equal(state["ema_state"][k], state["model_state"][k]) for k in state["model_state"])
    # one epoch, then a resumed second: the same history and averaged weights as the uninterrupted run
    part = tmp_path / "part"
    assert LunaTrainingApp(argv(data, part, "--ema-decay", "0.9", "--epochs", "1")).main() == 0
    first = torch.load(default_state_dir(part) / "last.pt", weights_only=True)
    kept = torch.load(part / "model.pt", weights_only=True)  # epoch 1: model.pt holds the averaged weights
    for key, value in first["ema_state"].items():
        torch.testing.assert_close(kept["model_state"][key], value, rtol=0, atol=0)
    assert LunaTrainingApp(argv(data, part, "--ema-decay", "0.9", "--resume")).main() == 0
    assert (part / "history.tsv").read_bytes() == (whole / "history.tsv").read_bytes()
    resumed = torch.load(default_state_dir(part) / "last.pt", weights_only=True)
    for key, value in state["ema_state"].items():
        torch.testing.assert_close(resumed["ema_state"][key], value, rtol=0, atol=0)
    # and the averaged weights change what is validated
    plain = pd.read_csv(tmp_path / "whole" / "history.tsv", sep="\t")
    assert LunaTrainingApp(argv(data, tmp_path / "plain")).main() == 0
    other = pd.read_csv(tmp_path / "plain" / "history.tsv", sep="\t")
    train_cols = ["loss_all", "auc"]
    pd.testing.assert_frame_equal(plain[plain.split == "train"][train_cols].reset_index(drop=True),
                                  other[other.split == "train"][train_cols].reset_index(drop=True))
    assert not np.allclose(plain[plain.split == "selection"].loss_all, other[other.split == "selection"].loss_all)


def test_outputs_follow_the_design(reference: Path, data: dict[str, Path]) -> None:
    history = pd.read_csv(reference / "history.tsv", sep="\t")
    assert list(history.columns) == HISTORY_COLUMNS
    assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [1, "selection"], [2, "train"],
                                                           [2, "selection"]]
    train, selection = history[history.split == "train"], history[history.split == "selection"]
    assert (train.n == SAMPLES).all() and (train.n_pos == SAMPLES // 2).all()  # balanced 1:1
    assert (selection.n == 10).all() and (selection.n_pos == 4).all()  # every selection crop (scans .1 .3)

    raw = torch.load(reference / "model.pt", weights_only=True)
    best = selection.assign(key=selection.f1.fillna(-1)).sort_values(["key", "epoch"], ascending=[False, True]).iloc[0]
    assert raw["epoch"] == int(best.epoch)  # --keep f1 at the fixed threshold 0.5
    assert raw["val_metrics"]["epoch"] == raw["epoch"] and raw["val_metrics"]["split"] == "selection"
    assert raw["threshold"] == 0.5 and raw["threshold_policy"] == "0.5" and raw["keep"] == "f1"
    assert raw["hu_window"] == [-1000, 1000]  # luna-predict refuses stores cut with another window
    # provenance of the held-out fold: nothing of test fold 0 was trained or chosen on
    assert raw["test_fold"] == 0 and raw["crop_shape"] == [32, 48, 48]
    assert raw["train_series_uids"] == ["1.2.3.2", "1.2.3.5", "1.2.3.6", "1.2.3.7"]
    assert raw["selection_series_uids"] == ["1.2.3.1", "1.2.3.3"]
    assert isinstance(raw["args"], dict) and raw["args"]["lr"] == 0.001 and raw["args"]["momentum"] == 0.99
    assert raw["provenance"]["device"] == "cpu" and raw["provenance"]["torch_version"] == str(torch.__version__)
    assert len(raw["provenance"]["source_sha256"]) == 64
    assert not [k for k in raw["model_state"] if k.startswith(("module.", "_orig_mod."))]
    model, _ = load_model(reference / "model.pt")
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 48, 48))[1].shape == (2, 2)
    chosen = pd.read_csv(reference / "selection_predictions.tsv", sep="\t", dtype={"series_uid": str})
    assert sorted(chosen.series_uid.unique()) == raw["selection_series_uids"] and len(chosen) == 10
    assert chosen.fold.eq(0).all() and chosen.is_nodule.sum() == 4
    state = default_state_dir(reference)
    assert state == reference.parent / ".model.train_state"
    assert sorted(p.name for p in state.iterdir()) == [".lock", f"best_model.e{raw['epoch']}.pt",
                                                       f"best_selection.e{raw['epoch']}.tsv", "last.pt"]
    assert not list(reference.glob(".*tmp"))


def test_selection_rows_equal_luna_predict_on_the_selection_scans(reference: Path, data: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """One precision policy: the kept epoch's selection row and luna-predict's probabilities agree (1e-5)."""
    from luna.metrics import metric_row
    from luna.validation import PredictApp

    out = tmp_path / "selection.tsv"
    assert PredictApp(["--model", str(reference / "model.pt"), "--crops", str(data["crops"]), "--scans", "selection",
                       "--out", str(out), "--batch-size", "3"]).main() == 0
    predicted = pd.read_csv(out, sep="\t", dtype={"series_uid": str})
    chosen = pd.read_csv(reference / "selection_predictions.tsv", sep="\t", dtype={"series_uid": str})
    assert predicted.candidate_id.tolist() == chosen.candidate_id.tolist()
    np.testing.assert_allclose(predicted.probability, chosen.probability, rtol=0, atol=1e-5)
    np.testing.assert_allclose(predicted.loss, chosen.loss, rtol=1e-5, atol=1e-5)
    raw = torch.load(reference / "model.pt", weights_only=True)
    row = metric_row(predicted.is_nodule, predicted.probability, predicted.loss, epoch=raw["epoch"], split="selection")
    history = pd.read_csv(reference / "history.tsv", sep="\t")
    kept = history[(history.split == "selection") & (history.epoch == raw["epoch"])].iloc[0]
    for column in ("loss_all", "loss_neg", "loss_pos", "correct_all", "precision", "recall", "auc"):
        assert float(row[column]) == pytest.approx(float(kept[column]), rel=1e-5, abs=1e-5, nan_ok=True), column


def test_keep_and_threshold_policies_choose_on_the_selection_set_only(data: dict[str, Path], tmp_path: Path) -> None:
    from luna.metrics import choose_threshold

    out = tmp_path / "last"
    assert LunaTrainingApp(argv(data, out, "--keep", "last", "--threshold", "max_f1", "--epochs", "3",
                                "--selection-interval", "2")).main() == 0
    history = pd.read_csv(out / "history.tsv", sep="\t")
    # selection every 2nd epoch and after the last
    assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [2, "train"], [2, "selection"],
                                                           [3, "train"], [3, "selection"]]
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["epoch"] == 3 and raw["keep"] == "last" and raw["threshold_policy"] == "max_f1"
    chosen = pd.read_csv(out / "selection_predictions.tsv", sep="\t")
    assert raw["threshold"] == pytest.approx(choose_threshold(chosen.is_nodule, chosen.probability, "max_f1"))
    assert raw["selection_metrics"]["f1"] >= history.iloc[-1]["f1"] - 1e-12  # max F1 >= F1 at 0.5
    # fp_per_scan counts the selection set's scans: at most 1 negative per scan above the recorded cut
    fp = tmp_path / "fp"
    assert LunaTrainingApp(argv(data, fp, "--keep", "last", "--threshold", "fp_per_scan:1", "--epochs", "1")).main() == 0
    raw = torch.load(fp / "model.pt", weights_only=True)
    chosen = pd.read_csv(fp / "selection_predictions.tsv", sep="\t")
    n_scans = chosen.series_uid.nunique()
    assert raw["threshold_policy"] == "fp_per_scan:1" and n_scans > 1
    assert raw["threshold"] == pytest.approx(choose_threshold(chosen.is_nodule, chosen.probability, "fp_per_scan:1",
                                                              n_scans=n_scans))
    negatives = chosen.probability[chosen.is_nodule == 0]
    below = negatives[negatives <= raw["threshold"]]  # the lowest cut: calling the next one would exceed 1 a scan
    assert (negatives > raw["threshold"]).sum() <= n_scans < (negatives >= below.max()).sum()
    # nothing to choose on: only the last epoch and a fixed threshold make sense
    none = tmp_path / "none"
    assert LunaTrainingApp(argv(data, none, "--selection-fraction", "0", "--keep", "last")).main() == 0
    assert pd.read_csv(none / "history.tsv", sep="\t").split.tolist() == ["train", "train"]
    raw = torch.load(none / "model.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["selection_series_uids"] == [] and raw["threshold"] == 0.5
    assert len(pd.read_csv(none / "selection_predictions.tsv", sep="\t")) == 0  # the header: the rule declares it


def test_tensorboard_uses_the_books_tags(reference: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((reference.parent / "tb").iterdir())
    assert [r.name[-7:] for r in runs] == ["trn_cls", "val_cls"]  # <time>-trn_cls, <time>-val_cls
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0}).Reload()
        tags = acc.Tags()
        for tag in ["loss/all", "loss/neg", "loss/pos", "correct/all", "correct/neg", "correct/pos",
                    "pr/precision", "pr/recall", "pr/f1_score"]:
            assert tag in tags["scalars"], tag
        assert [e.step for e in acc.Scalars("loss/all")] == [SAMPLES, 2 * SAMPLES]  # samples seen
        assert "is_neg" in tags["histograms"] or "is_pos" in tags["histograms"]
        assert any("pr" in t for t in tags.get("tensors", []))


def test_resident_and_streamed_data_give_identical_history(data: dict[str, Path], tmp_path: Path, caplog) -> None:
    import logging

    runs = {}
    for mode in ("always", "never"):
        out = tmp_path / mode
        with caplog.at_level(logging.INFO, logger="luna.training"):
            assert LunaTrainingApp(argv(data, out, "--data-on-device", mode)).main() == 0
        runs[mode] = out
    assert "training data: resident on cpu (data_on_device always" in caplog.text
    assert "training data: streaming from the crop stores (data_on_device never" in caplog.text
    assert (runs["always"] / "history.tsv").read_bytes() == (runs["never"] / "history.tsv").read_bytes()
    assert ((runs["always"] / "selection_predictions.tsv").read_bytes()
            == (runs["never"] / "selection_predictions.tsv").read_bytes())
    a = torch.load(runs["always"] / "model.pt", weights_only=True)["model_state"]
    b = torch.load(runs["never"] / "model.pt", weights_only=True)["model_state"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_auto_data_path_follows_the_memory_share() -> None:
    from luna.device import resident_decision

    cpu = torch.device("cpu")
    resident, why = resident_decision("auto", 2**20, cpu, 0.5)
    assert resident and why.startswith("resident on cpu: the training crops take 0.00 GiB, within 0.5 of the")
    resident, why = resident_decision("auto", 2**50, cpu, 0.5)
    assert not resident and why.startswith("streaming from the crop stores: the training crops take 1048576.00 GiB")
    assert resident_decision("never", 1, cpu, 0.5)[0] is False and resident_decision("always", 2**50, cpu, 0.5)[0]


def test_same_seed_twice_gives_identical_history(reference: Path, data: dict[str, Path], tmp_path: Path) -> None:
    assert LunaTrainingApp(argv(data, tmp_path / "again")).main() == 0
    assert (tmp_path / "again" / "history.tsv").read_bytes() == (reference / "history.tsv").read_bytes()
    # the same run into the same folder: model.pt byte for byte (torch.save named its inner folder after the
    # temp file, whose name holds the process id)
    first = (tmp_path / "again" / "model.pt").read_bytes()
    assert LunaTrainingApp(argv(data, tmp_path / "again")).main() == 0
    assert (tmp_path / "again" / "model.pt").read_bytes() == first
    assert LunaTrainingApp(argv(data, tmp_path / "seed1", "--seed", "1")).main() == 0
    assert (tmp_path / "seed1" / "history.tsv").read_bytes() != (reference / "history.tsv").read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_kill_9_mid_epoch_then_resume_continues(reference: Path, data: dict[str, Path], tmp_path: Path,
                                                env_with_bin: dict[str, str], signum: int) -> None:
    """kill -9 mid-epoch, then the same command resumes and ends where an uninterrupted run does. SIGTERM to the
    process group (SLURM's time limit, scancel), with loader worker processes, unwinds: one line, exit status 143,
    no temp file left (a worker ended by it made torch raise "DataLoader worker ... killed by signal" instead)."""
    out, state = tmp_path / "results" / "model", tmp_path / "results" / ".state" / "train"
    workers = ("--num-workers", "2", "--data-on-device", "never") if signum == signal.SIGTERM else ()
    cmd = [str(BIN / "luna-train"), *argv(data, out, "--state", str(state), "--resume", *workers)]
    env = hook_env(env_with_bin, LUNA_TEST_SLOW_BATCH_S="0.3")
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "E2 Training 1/" not in log.read_text():  # epoch 1 finished, a batch of epoch 2 done
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        os.killpg(proc.pid, signum)
    finally:
        proc.wait(timeout=30)
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, log.read_text()
        assert log.read_text().rstrip().endswith("luna-train: terminated") and "Traceback" not in log.read_text()
        assert not [p for p in tmp_path.rglob("*.tmp")]
    else:
        assert proc.returncode == -signal.SIGKILL
    # nothing at --out looks finished: the outputs are written when the run ends, the state holds epoch 1
    assert not (out / "history.tsv").exists() and not (out / "model.pt").exists()
    assert torch.load(state / "last.pt", weights_only=True)["epoch"] == 1
    if signum == signal.SIGTERM:
        return  # the resume below is the same as after kill -9
    second = subprocess.run(cmd, capture_output=True, text=True, env=env_with_bin, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "Resuming after epoch 1" in second.stderr
    assert "E1 Training" not in second.stderr
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [1, "selection"], [2, "train"],
                                                           [2, "selection"]]
    # the resumed run ends exactly where the uninterrupted one did
    assert (out / "history.tsv").read_bytes() == (reference / "history.tsv").read_bytes()
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(reference / "model.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key in b["model_state"]:
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=0)
    # and every other field but the paths of the two runs: --resume is not recorded (a resumed run's model.pt
    # differed from an uninterrupted one's there)
    assert "resume" not in a["args"]
    for run in (a, b):  # the two runs' own folders (the reference logs to TensorBoard)
        for key in ("out", "state", "tb_dir"):
            run["args"].pop(key)
        run.pop("model_state"), run.pop("tensorboard_runs")
    assert a == b


def test_resume_ignores_a_state_from_other_settings(reference: Path, data: dict[str, Path], tmp_path: Path,
                                                    caplog) -> None:
    out = tmp_path / "model"
    state = tmp_path / "state"
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--epochs", "1")).main() == 0
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--resume", "--lr", "0.002")).main() == 0
    assert "written with other settings, inputs or code (lr 0.001 -> 0.002); starting at epoch 1" in caplog.text
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert history.epoch.tolist() == [1, 1, 2, 2]
    assert (out / "history.tsv").read_bytes() != (reference / "history.tsv").read_bytes()


def test_a_changed_source_file_makes_a_resume_start_afresh(data: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import shutil

    import luna.provenance

    out, state = tmp_path / "model", tmp_path / "state"
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--epochs", "1")).main() == 0
    # the same package with one edited (uncommitted) source file
    edited = tmp_path / "luna"
    shutil.copytree(luna.provenance.PACKAGE_DIR, edited, ignore=shutil.ignore_patterns("__pycache__"))
    with open(edited / "metrics.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert luna.provenance.source_digest(edited) != luna.provenance.source_digest()
    monkeypatch.setattr(luna.provenance, "PACKAGE_DIR", edited)
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--resume")).main() == 0
    assert "written with other settings, inputs or code (the luna source code); starting at epoch 1" in caplog.text
    assert "Resuming after epoch" not in caplog.text
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["provenance"]["source_sha256"] == luna.provenance.source_digest(edited)


def test_resume_with_more_epochs_extends_the_run(reference: Path, data: dict[str, Path], tmp_path: Path) -> None:
    out, state = tmp_path / "model", tmp_path / "state"
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--epochs", "1")).main() == 0
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--resume")).main() == 0
    assert (out / "history.tsv").read_bytes() == (reference / "history.tsv").read_bytes()


def test_ddp_under_torchrun_gloo(data: dict[str, Path], tmp_path: Path, env_with_bin: dict[str, str]) -> None:
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "luna.training",
           *argv(data, out, "--device", "cpu", "--samples-per-epoch", "33", "--ema-decay", "0.9", "--optimizer", "adam",
                 "--balanced-schedule", "2:3")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_with_bin, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(history.columns) == HISTORY_COLUMNS
    assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [1, "selection"], [2, "train"],
                                                           [2, "selection"]]
    train, selection = history[history.split == "train"], history[history.split == "selection"]
    # 33 samples round up to 34 = 2 x 17 (3 batches each; unequal step counts would hang DDP)
    assert (train.n == 34).all() and train.n_pos.tolist() == [17, 9]  # both processes' samples; 1:1, then 1:3
    assert (selection.n == 10).all() and (selection.n_pos == 4).all()  # every selection crop exactly once
    assert np.isfinite(history.loss_all).all() and history.auc.between(0, 1).all()
    assert result.stderr.count("Starting LunaTrainingApp") == 1  # only rank 0 logs progress
    assert result.stderr.count("E1 Selection: ") == 1  # also luna.selection's lines (each rank wrote them)
    raw = torch.load(out / "model.pt", weights_only=True)
    assert not [k for k in raw["model_state"] if k.startswith("module.")]
    assert raw["samples_seen"] == raw["epoch"] * 34


def test_bad_input_is_one_line_and_exit_2(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.tsv"
    with pytest.raises(SystemExit) as info:
        main(["--crops", str(data["crops"]), "--splits", str(missing), "--out", str(tmp_path / "o"), "--test-fold", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"luna-train: error: {missing}: no such file"
    with pytest.raises(SystemExit) as info:  # it said "no such file"
        main(argv(data, tmp_path / "o", "--crops", str(tmp_path)))
    assert capsys.readouterr().err.strip() == f"luna-train: error: {tmp_path}: is a folder, not a crop store"
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o", "--state", str(tmp_path / "o" / "state")))
    assert info.value.code == 2
    assert "lies inside --out" in capsys.readouterr().err
    for extra, message in [
        (["--test-fold", "7"], "splits.tsv: test fold 7 has no scans (folds present: 0, 1, 2, 3)"),
        (["--selection-fraction", "0"], "--selection-fraction 0 leaves nothing to choose on: use --keep last"),
        (["--selection-fraction", "0.05"], "the selection set of test fold 0 (--selection-fraction 0.05) has 0 nodule"),
        (["--augment-flip-only-epochs", "3"], "--augment-flip-only-epochs 3 is more than --epochs 2"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv(data, tmp_path / "o2", *extra))
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    import os

    limit = 4 * (os.cpu_count() or 1)
    for extra, message in [  # one line, not argparse's 30-line usage above it; it named the type functions
        (["--epochs", "x"], "argument --epochs: must be a whole number >= 1, got 'x'"),
        (["--test-fold", "1.5"], "argument --test-fold: must be a whole number >= 0, got '1.5'"),
        (["--selection-fraction", "x"], "argument --selection-fraction: must be a number >= 0 and < 1, got 'x'"),
        # a seed past 64 bits was a traceback after the previous outputs were removed; past 32 bits it repeated a
        # smaller seed's batches and augmentation
        (["--seed", str(2**64)], f"argument --seed: must be from 0 to 4294967295 (2^32 - 1), got {2**64}"),
        (["--seed", "-1"], "argument --seed: must be from 0 to 4294967295 (2^32 - 1), got -1"),
        (["--threads", "99999"], f"argument --threads: must be <= {limit} (4 per CPU of this machine), got 99999"),
        (["--momentum", "7"], "argument --momentum: must be >= 0 and < 1, got 7"),
        (["--augment-scale", "1.5"], "argument --augment-scale: must be >= 0 and < 1, got 1.5"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv(data, tmp_path / "o2", *extra))
        assert info.value.code == 2
        assert capsys.readouterr().err.strip() == f"luna-train: error: {message} (see luna-train --help)"
    assert build_parser().parse_args([*BASE, "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    # a test fold whose scans have no candidate in their subset's store (given): nothing to test (luna-predict
    # refused it only after the training, saying the store was not given)
    lines = data["splits"].read_text().splitlines()
    no_candidates = tmp_path / "splits.tsv"
    no_candidates.write_text("\n".join([*lines, "9.9.1\tsubset0\t5", "9.9.2\tsubset0\t5"]) + "\n")
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o3", "--splits", str(no_candidates), "--test-fold", "5"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {no_candidates}: test fold 5 has no candidate in "
                                               f"the stores of its subsets ({data['crops']}): nothing to test, its "
                                               "metrics would be undefined")
    # a folder where model.pt goes: found before the training (its cleanup's unlink raised after it)
    (tmp_path / "o4" / "model.pt").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o4"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {tmp_path / 'o4' / 'model.pt'}: is a folder; "
                                               "luna-train writes its model.pt there")
    # a FIFO there: found before the training too (it was found when the model was written, after it)
    (tmp_path / "o5").mkdir()
    os.mkfifo(tmp_path / "o5" / "history.tsv")
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o5"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {tmp_path / 'o5' / 'history.tsv'}: is not a "
                                               "regular file (a FIFO, socket or device); an output is written to a "
                                               "temp file and renamed onto it")
    # an --out that cannot be a folder fails before any training, naming it
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as info:
        main(argv(data, blocker / "model"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"luna-train: error: {blocker / 'model'}: cannot write to the --out folder (a file is in the way: not a folder)"
    assert not any(p.name.startswith(".file.txt") for p in tmp_path.iterdir())


def test_nan_metrics_are_written_as_nan(reference: Path) -> None:
    text = (reference / "history.tsv").read_text()
    history = pd.read_csv(reference / "history.tsv", sep="\t")
    undefined = history[["precision", "f1"]].isna().to_numpy().any()
    assert ("NaN" in text) == undefined
    assert not any(math.isinf(v) for v in history.select_dtypes("number").to_numpy().ravel())


def test_inputs_and_outputs_checked_before_training(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A store given twice would be trained on twice; an earlier run's outputs are removed before the first epoch,
    so a failed or killed rerun never leaves them looking finished."""
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o", "--crops", str(data["crops"]), str(data["crops"])))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {data['crops']}: crop store given twice (also as "
                                               f"{data['crops']})")
    # a copy of it under another name: its scans were trained and selected on twice, with no word
    import shutil

    copy = shutil.copy(data["crops"], tmp_path / "subset0_copy.h5")
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o", "--crops", str(data["crops"]), str(copy)))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {copy} and {data['crops']} both hold scan 1.2.3.0: "
                                               "its candidates would count twice (a copy of a store, or one subset cut "
                                               "twice?)")
    # a store of another data set took no part, with warnings only
    make_store(tmp_path / "subset1.h5", uid_prefix="7.7.7")
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o", "--crops", str(data["crops"]), str(tmp_path / "subset1.h5")))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {tmp_path / 'subset1.h5'}: none of its 8 scans is "
                                               "in the split (splits.tsv): a crop store of another data set?")
    out = tmp_path / "rerun"
    out.mkdir()
    names = ("model.pt", "history.tsv", "selection_predictions.tsv", "predictions.tsv", "notes.txt")
    for name in names:
        (out / name).write_text("an earlier run's")
    # a rerun refused by its inputs keeps them (a mistyped fold, selection share or config removed a finished model)
    bad_config = tmp_path / "config.yaml"
    bad_config.write_bytes(b"\x89HDF\r\n")  # not UTF-8: it was a traceback, after the outputs had gone
    for extra, message in ((["--test-fold", "7"], "test fold 7 has no scans"),
                           (["--config", str(bad_config)], f"{bad_config}: cannot read config ('utf-8' codec can't"),
                           (["--balanced-schedule", "2:4", "2:0"], "--balanced-schedule gives epoch 2 more than once "
                                                                   "(2:4, 2:0)")):
        with pytest.raises(SystemExit) as info:
            main(argv(data, out, *extra))
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("luna-train: error: ") and message in err[0], err
        assert sorted(p.name for p in out.iterdir()) == sorted(names)
    # one that trains removes them before its first epoch: a failed or killed rerun leaves none looking finished;
    # and the old model's predictions.tsv (luna-evaluate reported the new model.pt's epoch and threshold over them)
    with pytest.raises(SystemExit) as info:
        main(argv(data, out, "--lr", "1e8"))
    assert info.value.code == 2 and "the training diverged" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_no_selection_set_from_the_out_folder_itself(data: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` keeps its state beside the folder, and `--selection-fraction 0` (keep last, fixed threshold)
    still writes every declared output: selection_predictions.tsv is its header."""
    out = tmp_path / "here"
    out.mkdir()
    monkeypatch.chdir(out)
    assert LunaTrainingApp(argv(data, Path("."), "--selection-fraction", "0", "--keep", "last", "--threshold", "0.4",
                                "--epochs", "1")).main() == 0
    assert sorted(p.name for p in out.iterdir()) == ["history.tsv", "model.pt", "selection_predictions.tsv"]
    assert (tmp_path / ".here.train_state").is_dir()
    selection = pd.read_csv(out / "selection_predictions.tsv", sep="\t")
    assert len(selection) == 0 and list(selection.columns) == PREDICTION_COLUMNS  # predictions.tsv's header
    assert load_model(out / "model.pt")[1]["threshold"] == 0.4


def test_a_state_that_was_not_its_runs_last_epoch_is_not_resumed_as_one(tmp_path: Path) -> None:
    """Epoch 1 of a 2-epoch run is not a finished 1-epoch run (no last-epoch selection pass, no kept model)."""
    from luna.train_state import StateFolder

    folder = StateFolder(tmp_path / "state", {"settings": "same"})
    folder.save({"epoch": 1, "epochs": 2})
    assert folder.load(1) is None
    assert folder.load(2)["epoch"] == 1 and folder.load(3)["epoch"] == 1
    folder.save({"epoch": 1, "epochs": 1})
    assert folder.load(1)["epoch"] == 1


def test_tensorboard_folder_holds_this_models_runs_across_a_resume(data: dict[str, Path], tmp_path: Path) -> None:
    """OUT/tensorboard (the workflow's) shows one model: an earlier training's runs go at a fresh start, a resume
    continues the same two runs (no epoch logged twice), and model.pt names them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, state = tmp_path / "model", tmp_path / "state"
    tb = out / "tensorboard"
    (tb / "2020-01-01_00.00.00-trn_cls").mkdir(parents=True)  # an earlier training's run
    (tb / "notes").mkdir()  # not a run: kept
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--epochs", "1", "--tb-dir", str(tb))).main() == 0
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--resume", "--tb-dir", str(tb))).main() == 0
    runs = sorted(p.name for p in tb.iterdir() if p.name != "notes")
    assert len(runs) == 2 and runs[0].endswith("-trn_cls") and runs[1].endswith("-val_cls")
    assert runs[0][:-len("-trn_cls")] == runs[1][:-len("-val_cls")] != "2020-01-01_00.00.00"
    assert (tb / "notes").is_dir()
    for run in runs:
        acc = EventAccumulator(str(tb / run), size_guidance={"scalars": 0}).Reload()
        assert [e.step for e in acc.Scalars("loss/all")] == [SAMPLES, 2 * SAMPLES]
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert checkpoint["tensorboard_runs"] == [str(tb / run) for run in runs]


def test_a_finished_state_resumed_after_another_training_names_no_others_runs(data, tmp_path, caplog) -> None:
    """The workflow's rerun with old settings resumes their finished state (model.pt identical) after a training
    with other settings removed the old runs from OUT/tensorboard: the folder kept the other model's runs and
    model.pt named the removed ones. Now the other training's runs go and model.pt names what is there."""
    out, tb = tmp_path / "model", tmp_path / "model" / "tensorboard"
    first = argv(data, out, "--state", str(tmp_path / "s1"), "--epochs", "1", "--tb-dir", str(tb))
    assert LunaTrainingApp(first).main() == 0
    old_runs = sorted(p.name for p in tb.iterdir())
    model = (out / "model.pt").read_bytes()
    time.sleep(1.1)  # run folders are named by the second the training started
    other = argv(data, out, "--state", str(tmp_path / "s2"), "--epochs", "1", "--tb-dir", str(tb), "--lr", "0.002")
    assert LunaTrainingApp(other).main() == 0
    assert not set(old_runs) & {p.name for p in tb.iterdir()}  # a fresh start removed the first model's runs
    caplog.set_level(logging.WARNING, logger="luna.training")
    assert LunaTrainingApp([*first, "--resume"]).main() == 0
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert list(tb.iterdir()) == [] and checkpoint["tensorboard_runs"] == []
    assert torch.load(io.BytesIO(model), weights_only=True)["tensorboard_runs"] == [str(tb / r) for r in old_runs]
    assert any("are not there (a training with other settings removed them since" in r.getMessage() for r in caplog.records)


def test_missing_tensorboard_is_one_line_before_training(data: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    out, state = tmp_path / "model", tmp_path / "state"
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--tb-dir", str(tmp_path / "tb"))).main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("luna-train: error: TensorBoard logging needs the tensorboard "
                                               "package") and err[0].endswith("or pass --tb-dir none"), err
    assert not any(state.glob("*.pt")) and not (out / "model.pt").exists()


def test_a_resume_with_another_cpu_thread_count_starts_afresh(data: dict[str, Path], tmp_path: Path, caplog) -> None:
    """fp32 sums split over another number of threads round differently: a run killed at 1 thread and resumed at 2
    would not end where the uninterrupted one does, so the thread count keys the state (a Snakemake rerun given
    fewer --cores starts afresh)."""
    out, state = tmp_path / "model", tmp_path / "state"
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--epochs", "1", "--threads", "1")).main() == 0
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--resume", "--threads", "2")).main() == 0
    assert "written with other settings, inputs or code (threads 1 -> 2); starting at epoch 1" in caplog.text
    assert "Resuming after epoch" not in caplog.text


def test_setup_warns_of_settings_that_do_nothing_or_crawl(data: dict[str, Path], tmp_path: Path, caplog,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan of splits.tsv in none of the stores (a subset's store left out of --crops) takes no part: said.
    Mining negatives with no balanced epoch changes nothing: said. bf16 on a CPU without native bf16 crawls: said."""
    import luna.training

    uids = list(pd.read_csv(data["splits"], sep="\t", dtype={"series_uid": str})["series_uid"])
    splits = write_splits(tmp_path / "splits.tsv", uids + ["9.9.9.1", "9.9.9.2", "9.9.9.3"])  # folds 0, 1, 2
    monkeypatch.setattr(luna.training, "cpu_has_native_bf16", lambda: False)
    args = argv(data, tmp_path / "model", "--splits", str(splits), "--hard-negatives", "0.5", "--balanced", "0",
                "--amp", "on")
    with caplog.at_level("WARNING", logger="luna.training"):
        LunaTrainingApp(args).setup()
    assert "scans in %s are in none of the crop stores given (e.g. 9.9.9." % splits in caplog.text
    assert "--hard-negatives 0.5 mines the negatives of balanced epochs from the second on; this run has none " \
           "(--balanced 0, --balanced-schedule none, --epochs 2): it changes nothing" in caplog.text
    assert "--amp on: this CPU has no native bf16" in caplog.text
    # a schedule's epoch past --epochs: unused (a later --resume --epochs may reach it), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="luna.training"):
        LunaTrainingApp(argv(data, tmp_path / "model", "--balanced-schedule", "9:8", "2:3")).setup()
    assert f"--balanced-schedule 9:8: after the last epoch (--epochs {EPOCHS}), unused in this run" in caplog.text
    # a table given without the switch that reads it: it was silently not read
    caplog.clear()
    with caplog.at_level("WARNING", logger="luna.training"):
        LunaTrainingApp(argv(data, tmp_path / "model", "--annotations-excluded", str(data["splits"])))
    assert f"--annotations-excluded {data['splits']} is read only with --skip-excluded: this run trains on every " \
           "candidate" in caplog.text


def test_one_balanced_schedule_in_another_order_resumes(data: dict[str, Path], tmp_path: Path) -> None:
    """The resume key holds the schedule in epoch order: 3:4 2:3 is the run 2:3 3:4 was (it started afresh)."""
    from luna.train_state import fingerprint_parts

    def key(*schedule: str) -> dict:
        args = build_parser().parse_args(argv(data, tmp_path / "m", "--balanced-schedule", *schedule))
        return fingerprint_parts(args, False, torch.device("cpu"), 1)

    assert key("2:3", "3:4") == key("3:4", "2:3") != key("2:3", "3:5")


def test_the_last_log_line_reports_the_kept_model_at_its_operating_threshold(reference: Path, caplog,
                                                                             data: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "model"
    with caplog.at_level("INFO", logger="luna.training"):
        assert LunaTrainingApp(argv(data, out, "--threshold", "max_f1")).main() == 0
    kept = torch.load(out / "model.pt", weights_only=True)
    at = kept["selection_metrics"]
    assert (f"Kept epoch {kept['epoch']} (--keep f1), operating threshold {kept['threshold']:.4g}: selection "
            f"precision {at['precision']:.4f}, recall {at['recall']:.4f}, F1 {at['f1']:.4f} at it") in caplog.text


def test_a_refused_resume_names_only_what_differs() -> None:
    """The stored parts are read back from JSON (lists), the run's own hold tuples: balanced_schedule [(2, 1)] was
    named as a change in every refused resume."""
    from luna.train_state import describe_changes

    old = {"args": {"balanced_schedule": [[2, 1]], "lr": 0.001}, "threads": 2}
    new = {"args": {"balanced_schedule": [(2, 1)], "lr": 0.002}, "threads": 2}
    assert describe_changes(old, new) == "lr 0.001 -> 0.002"
    # another torch: its kernels and RNG streams differ, so the state is not resumed under it
    from luna.train_state import fingerprint_parts

    args = build_parser().parse_args(["--crops", "a.h5", "--splits", "s.tsv", "--test-fold", "0", "--out", "m"])
    args.splits = __file__  # a readable file: its hash is part of the key
    args.crops = []
    parts = fingerprint_parts(args, False, torch.device("cpu"), 1)
    assert parts["torch"] == torch.__version__
    assert describe_changes({**parts, "torch": "2.12.0"}, parts) == f"torch '2.12.0' -> '{torch.__version__}'"


def test_a_full_disk_at_the_end_leaves_none_of_the_outputs(data, tmp_path, monkeypatch, capsys):
    """model.pt could not be written (no space): history.tsv and selection_predictions.tsv, written before it,
    stayed in --out, a finished-looking part of the outputs; now none of the three is left."""
    import luna.training
    from luna.io import OutputError

    real_save = luna.training.atomic_torch_save

    def full_disk(obj, target):
        if Path(target).name == "model.pt" and Path(target).parent.name == "o":
            raise OutputError(f"{target}: cannot write (no space left on device)")
        return real_save(obj, target)

    monkeypatch.setattr(luna.training, "atomic_torch_save", full_disk)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as info:
        main(argv(data, out, "--epochs", "1"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"{out / 'model.pt'}: cannot write (no space left on device)")
    assert not out.exists()  # the run made it and left it empty: removed too
    assert (default_state_dir(out.resolve()) / "last.pt").is_file()  # the resumable state stays


def test_a_diverged_training_stops_with_one_line(data, tmp_path, capsys):
    """NaN probabilities: with a chosen threshold the run failed with "probabilities: NaN value; a curve needs
    every probability" (no epoch, no cause); with a fixed one a NaN model was kept, exit 0. Now one line naming
    the epoch, exit 2, and no model."""
    for threshold in ("max_f1", "0.5"):
        out = tmp_path / f"o-{threshold}"
        with pytest.raises(SystemExit) as info:
            main(argv(data, out, "--lr", "1e8", "--threshold", threshold))
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(r"luna-train: error: epoch \d: \d+ of the \d+ (training|selection) probabilities are NaN: "
                            r"the training diverged; lower --lr, clip the gradients \(--clip-grad-norm\) or warm up "
                            r"longer \(--lr-warmup-steps\): a --resume with these settings repeats the epoch", err), err
        assert not (out / "model.pt").exists()


def test_a_training_role_of_nodules_only_is_refused_before_training(tmp_path, capsys):
    """All training crops nodules: --balanced failed after setup ("balanced sampling needs positive and negative
    training crops"), naming no file; --balanced 0 trained a one-class model, exit 0. A refused run left an empty
    --out/tensorboard and a state folder holding only its lock file."""
    uids = make_store(tmp_path / "subset0.h5", n=40, n_pos=40, n_scans=8, seed=3)
    nodules_only = {"crops": tmp_path / "subset0.h5", "splits": write_splits(tmp_path / "splits.tsv", uids)}
    for balanced in ("1", "0"):
        with pytest.raises(SystemExit) as info:
            main(argv(nodules_only, tmp_path / f"o{balanced}", "--balanced", balanced))
        assert info.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"luna-train: error: {tmp_path / 'splits.tsv'}: test fold 0 leaves 20 training crops, all nodules, in "
            f"{tmp_path / 'subset0.h5'}; nothing to tell them from")
        # refused after its output checks: the folders it made for its outputs, state and lock are gone again
        assert not (tmp_path / f"o{balanced}").exists() and not (tmp_path / f".o{balanced}.train_state").exists()
    kept = tmp_path / "kept"  # a folder that was there before stays, with what it held
    (kept / "tensorboard").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(argv(nodules_only, kept))
    assert (kept / "tensorboard").is_dir() and not (tmp_path / ".kept.train_state").exists()


def test_a_refused_run_leaves_no_folder_it_made_not_even_a_parent(data, tmp_path, capsys):
    """--out new/o refused (a test fold with no scans) left an empty new/; a --tb-dir under a file, refused before
    the state lock was taken, left the --out and state folders it had made."""
    out = tmp_path / "new" / "o"
    with pytest.raises(SystemExit) as info:
        main([*argv(data, out), "--test-fold", "7"])
    assert info.value.code == 2
    assert "test fold 7 has no scans" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "new2" / "o"
    with pytest.raises(SystemExit) as info:
        main(argv(data, out, "--tb-dir", str(tmp_path / "afile" / "tb")))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {tmp_path / 'afile' / 'tb'}: cannot write to the "
                                               "--tb-dir folder (a file is in the way: not a folder)")
    assert not (tmp_path / "new2").exists() and (tmp_path / "afile").read_text() == "x"


def test_on_findings_uses_frocs_hit_rule() -> None:
    """Strictly inside the radius (a point on the sphere is out), a negative diameter meaning 10 mm, per scan."""
    from luna.froc import on_findings

    candidates = pd.DataFrame({"series_uid": ["a", "a", "a", "b", "c"],
                               "coord_x": [1.0, 0.999, 4.9, 0.0, 0.0], "coord_y": 0.0, "coord_z": 0.0})
    findings = pd.DataFrame({"seriesuid": ["a", "b"], "coordX": [0.0, 0.0], "coordY": 0.0, "coordZ": [0.0, 5.0],
                             "diameter_mm": [2.0, -1.0]})
    assert on_findings(candidates, findings).tolist() == [False, True, False, False, False]
    findings.loc[0, "diameter_mm"] = -1.0  # 10 mm: radius 5 takes in x = 4.9; scan b's finding is 5 mm away: out
    assert on_findings(candidates, findings).tolist() == [True, True, True, False, False]
    assert on_findings(candidates, findings.iloc[:0]).tolist() == [False] * 5


def test_skip_excluded_leaves_training_negatives_on_findings_out(data: dict[str, Path], tmp_path: Path, caplog,
                                                                 capsys) -> None:
    """The training negatives on an excluded finding leave the training set; its positives, the selection set and
    the test fold stay; the findings' content is part of the run's fingerprint; a missing table is one line."""
    from luna.train_state import describe_changes, fingerprint_parts

    plain = LunaTrainingApp(argv(data, tmp_path / "plain"))
    plain.setup()
    rows = plain.train_ds.rows
    negatives = rows[rows["is_nodule"] == 0]
    positive = rows[rows["is_nodule"] == 1].iloc[0]
    picked = [negatives.iloc[0], negatives.iloc[3], positive]  # a finding on a positive takes nothing away
    excluded = tmp_path / "annotations_excluded.csv"
    excluded.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(
        f"{r['series_uid']},{r['coord_x']},{r['coord_y']},{r['coord_z']},0.001\n" for r in picked))
    skipping = LunaTrainingApp(argv(data, tmp_path / "skip", "--skip-excluded", "--annotations-excluded",
                                    str(excluded)))
    with caplog.at_level("INFO", logger="luna.training"):
        skipping.setup()
    kept = set(skipping.train_ds.rows["candidate_id"])
    assert kept == set(rows["candidate_id"]) - {int(picked[0]["candidate_id"]), int(picked[1]["candidate_id"])}
    assert skipping.train_ds.n_pos == plain.train_ds.n_pos and len(skipping.train_ds) == len(plain.train_ds) - 2
    assert skipping.sel_ds.rows["candidate_id"].tolist() == plain.sel_ds.rows["candidate_id"].tolist()
    assert skipping.train_ds.crops_int16([0]).shape == (1, 32, 48, 48)
    assert f"--skip-excluded: 2 training negatives on the 3 findings of {excluded} left out" in caplog.text
    before = fingerprint_parts(skipping.args, False, torch.device("cpu"), 1)
    excluded.write_text(excluded.read_text().replace("0.001\n", "0.002\n", 1))
    assert fingerprint_parts(skipping.args, False, torch.device("cpu"), 1) != before
    assert fingerprint_parts(plain.args, False, torch.device("cpu"), 1)["excluded"] is None
    assert describe_changes(before, fingerprint_parts(skipping.args, False, torch.device("cpu"), 1)) == \
        "annotations_excluded.csv's content"
    assert describe_changes(fingerprint_parts(plain.args, False, torch.device("cpu"), 1), before) == \
        "skip_excluded False -> True"
    for extra, message in [
        (["--skip-excluded"], "--skip-excluded needs --annotations-excluded"),
        (["--skip-excluded", "--annotations-excluded", str(tmp_path / "nope.csv")],
         f"--annotations-excluded {tmp_path / 'nope.csv'}: no such file"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv(data, tmp_path / "o3", *extra))
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_second_run_on_a_state_folder_in_use_is_refused(data, tmp_path, capsys, lock_held_elsewhere):
    """Two runs on one state folder (one --out shares the default one): the second one's cleanup deleted the
    first's kept model, and the first copied the second's model.pt, exit 0. The folder is locked now."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.pt").write_bytes(b"the running run's")
    state = default_state_dir(out.resolve())
    state.mkdir(parents=True)
    with lock_held_elsewhere(state / ".lock"):  # a run in progress, in another process
        with pytest.raises(SystemExit) as info:
            main(argv(data, out, "--epochs", "1"))
        assert info.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"luna-train: error: {state}: the state folder is in use by another luna-train run ({state / '.lock'} "
            "is locked); wait for it, or give this run its own --out or --state")
        assert (out / "model.pt").read_bytes() == b"the running run's"  # not removed as a previous output
    assert LunaTrainingApp(argv(data, out, "--epochs", "1")).main() == 0  # released: the next run goes ahead
    # the app object kept, with DataLoader workers that inherited the lock file (a flock stayed held by them):
    # the next run in the same process, as in a notebook, goes ahead
    app = LunaTrainingApp(argv(data, out, "--epochs", "1", "--num-workers", "1", "--data-on-device", "never"))
    assert app.main() == 0
    assert LunaTrainingApp(argv(data, out, "--epochs", "1", "--resume")).main() == 0
    del app


def test_a_run_refused_by_the_lock_leaves_the_holders_folders(data, tmp_path, monkeypatch, capsys):
    """A run that found --out and the state folder missing, then lost the lock to a run that made them in
    between, must not tidy them away as its own: removing the holder's lock file would let a third run in."""
    import luna.training
    from luna.io import OutputError

    out = tmp_path / "o"
    state = default_state_dir(out.resolve())

    def taken_meanwhile(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)  # this run's folder check made it a moment before
        (Path(folder) / ".lock").write_bytes(b"")
        raise OutputError(f"{folder}: the state folder is in use by another luna-train run")

    monkeypatch.setattr(luna.training, "lock_state_folder", taken_meanwhile)
    with pytest.raises(SystemExit) as info:
        main(argv(data, out, "--epochs", "1"))
    assert info.value.code == 2 and "in use by another luna-train run" in capsys.readouterr().err
    assert (state / ".lock").is_file() and out.is_dir()


def test_symlinked_outputs_are_written_through(data, tmp_path):
    """design.md: a symlink at an output is written through. luna-train removed the links as previous outputs and
    wrote plain files: the link targets kept the old model."""
    out, shared = tmp_path / "o", tmp_path / "shared"
    symlinked_outputs(out, shared, ("model.pt", "history.tsv"), "old\n")
    assert LunaTrainingApp(argv(data, out, "--epochs", "1")).main() == 0
    assert (out / "model.pt").is_symlink() and (out / "history.tsv").is_symlink()
    assert torch.load(shared / "model.pt", weights_only=True)["epoch"] == 1
    assert pd.read_csv(shared / "history.tsv", sep="\t")["epoch"].tolist() == [1, 1]


def test_an_input_at_an_output_path_is_refused_untouched(data, tmp_path, capsys):
    """--splits o/history.tsv --out o: the splits file was removed as a previous output, then not found."""
    out = tmp_path / "o"
    out.mkdir()
    splits = out / "history.tsv"
    splits.write_bytes(data["splits"].read_bytes())
    args = argv(data, out, "--epochs", "1")
    args[args.index("--splits") + 1] = str(splits)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: --out {out}: {splits} is the input --splits "
                                               f"{splits}; write the output elsewhere")
    assert splits.read_bytes() == data["splits"].read_bytes()


def test_state_problems_found_before_training(data, tmp_path, capsys, caplog):
    """A folder at the state's last.pt failed after a whole epoch ("no state" logged first); a kept epoch's
    selection predictions gone from the state gave a header-only selection_predictions.tsv, exit 0; a malformed
    --config gave a three-line error."""
    out, state = tmp_path / "o", tmp_path / "s"
    (state / "last.pt").mkdir(parents=True)
    with caplog.at_level("INFO", logger="luna.training"), pytest.raises(SystemExit) as info:
        main(argv(data, out, "--state", str(state), "--epochs", "1"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"luna-train: error: {state / 'last.pt'}: is a folder; luna-train "
                                               "keeps its resumable state there")
    assert "Epoch 1 of 1" not in caplog.text
    (state / "last.pt").rmdir()
    assert LunaTrainingApp(argv(data, out, "--state", str(state), "--epochs", "1")).main() == 0
    for lost in state.glob("best_selection.e*.tsv"):
        lost.unlink()
    with pytest.raises(SystemExit) as info:
        main(argv(data, out, "--state", str(state), "--epochs", "1", "--resume"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"luna-train: error: {state}/best_selection.e1.tsv: the kept epoch's selection predictions "
                          "are missing from the state folder; rerun without --resume"), err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(SystemExit) as info:
        main(argv(data, tmp_path / "o2", "--config", str(bad), "--epochs", "1"))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"luna-train: error: {bad}: cannot read config (while parsing")


def test_model_pt_records_the_options_of_the_run_that_wrote_it(data, tmp_path):
    """A resumed run wrote the kept epoch as the first process had saved it: its --epochs, --out and --state."""
    state = tmp_path / "s"
    first, second = tmp_path / "o1", tmp_path / "o2"
    assert LunaTrainingApp(argv(data, first, "--state", str(state), "--epochs", "1")).main() == 0
    assert LunaTrainingApp(argv(data, second, "--state", str(state), "--epochs", "1", "--resume")).main() == 0
    one = torch.load(first / "model.pt", weights_only=True)
    two = torch.load(second / "model.pt", weights_only=True)
    assert one["args"]["out"] == str(first) and two["args"]["out"] == str(second)
    assert {k: v for k, v in one.items() if k != "args"}.keys() == {k: v for k, v in two.items() if k != "args"}.keys()
    for name, tensor in one["model_state"].items():
        assert torch.equal(tensor, two["model_state"][name])


def test_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch, caplog):
    """Some network file systems refuse flock (ENOLCK): that is no other run holding the folder."""
    import errno
    import fcntl

    from luna.train_state import lock_state_folder

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with caplog.at_level("WARNING", logger="luna.io"):
        assert lock_state_folder(tmp_path / "s") is None
    assert (f"{tmp_path / 's' / '.lock'}: cannot lock (No locks available); two runs at once would not be "
            "refused") in caplog.text
    from luna.io import lock_path, release_lock

    lock = tmp_path / ".store.lock"  # luna-crops' lock files go at the end there too, though no lock was held
    release_lock(lock_path(lock, "busy"), lock)
    assert not lock.exists()


def test_a_lock_released_between_open_and_lock_is_taken_anew(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder released and removed it must not hold the removed
    file: a third run would create and lock a new one, and two runs would write at once."""
    import fcntl

    from luna.io import lock_path

    lock = tmp_path / ".lock"
    real_lockf = fcntl.lockf
    calls = []

    def holder_releases_first(fd: int, operation: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            lock.unlink()  # the holder's release_lock, between this run's open and its lockf
        real_lockf(fd, operation)

    monkeypatch.setattr(fcntl, "lockf", holder_releases_first)
    handle = lock_path(lock, "busy")
    monkeypatch.setattr(fcntl, "lockf", real_lockf)
    assert handle is not None and len(calls) == 2  # locked twice: the removed file, then the new one
    assert os.fstat(handle.fileno()).st_ino == lock.stat().st_ino  # holds the file at the path
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom luna.io import lock_path, OutputError\n"
                            "try:\n    lock_path(sys.argv[1], 'busy')\nexcept OutputError as e:\n    print(e)\n",
                            str(lock)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "busy"  # a third run is refused
    handle.close()
