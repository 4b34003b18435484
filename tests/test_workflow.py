"""The Snakemake workflow end to end: lint, config errors, caching, reruns, kill -9 recovery, report."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from luna.metrics import METRICS_COLUMNS
from luna.store import read_arrays
from workflow_util import BIN, REPO, TINY_CONFIG, env, snakemake, write_config

SUBSETS = ("subset0", "subset1")


def job_stats(output: str) -> dict[str, int]:
    """The dry-run's 'Job stats' table as {rule: count}."""
    lines = output[output.index("Job stats:"):].splitlines()[3:]
    stats = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        stats[parts[0]] = int(parts[1])
    return stats


def test_lint_and_snakefmt_clean() -> None:
    lint = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", "."], cwd=REPO, env=env(), capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"train": {"epochz": 3}}, "config key train: Additional properties are not allowed ('epochz' was unexpected)"),
        ({"train": {"epochs": "many"}}, "config key train.epochs: 'many' is not of type 'integer'"),
        ({"crops": {"on_bad_scan": "ignore"}}, "config key crops.on_bad_scan: 'ignore' is not one of ['fail', 'skip']"),
        ({"dataset": {"source": "luna16", "root": "no/such/folder"}}, "dataset.root: data folder no/such/folder not found"),
    ],
)
def test_bad_config_stops_the_dry_run_naming_the_key(tmp_path, patch, expected) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    for section, values in patch.items():
        config[section] = {**config.get(section, {}), **values}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr


def test_missing_candidates_file_named(tmp_path) -> None:
    (tmp_path / "luna" / "subset0").mkdir(parents=True)
    config = {"dataset": {"source": "luna16", "root": str(tmp_path / "luna")}}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert f"dataset.candidates: file {tmp_path / 'luna' / 'candidates.csv'} not found" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One uninterrupted run of the whole workflow on the tiny synthetic config."""
    workdir = tmp_path_factory.mktemp("tiny")
    proc = snakemake(workdir, configfile=write_config(workdir, TINY_CONFIG))
    assert "luna: metrics in results/validation/metrics.tsv" in proc.stdout + proc.stderr
    return workdir


@pytest.mark.slow
def test_tiny_pipeline_outputs(tiny_run: Path) -> None:
    val = tiny_run / "results" / "validation"
    metrics = pd.read_csv(val / "metrics.tsv", sep="\t")
    assert list(metrics.columns) == METRICS_COLUMNS and len(metrics) == 1
    assert metrics["split"].iloc[0] == "val"
    history = pd.read_csv(tiny_run / "results" / "model" / "history.tsv", sep="\t")
    assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [1, "val"], [2, "train"], [2, "val"]]
    predictions = pd.read_csv(val / "predictions.tsv", sep="\t")
    splits = pd.read_csv(tiny_run / "results" / "splits.tsv", sep="\t")
    val_uids = set(splits.loc[splits["split"] == "val", "series_uid"])
    assert set(predictions["series_uid"]) <= val_uids
    assert predictions["probability"].between(0, 1).all()
    submission = (val / "submission.csv").read_text().splitlines()
    assert submission[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert len(submission) == len(predictions) + 1
    for name in ("roc.png", "pr.png", "froc.png", "training_curves.png"):
        assert (val / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rule in ("synthesize", "candidates", "split", "train", "validate"):
        assert (tiny_run / "logs" / f"{rule}.log").stat().st_size > 0
        assert (tiny_run / "benchmarks" / "runs" / f"{rule}.tsv").exists()


@pytest.mark.slow
def test_second_run_has_nothing_to_do_and_a_train_change_reruns_only_train_and_validate(tiny_run: Path) -> None:
    config_path = tiny_run / "config.yaml"
    proc = snakemake(tiny_run, configfile=config_path)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    changed = copy.deepcopy(TINY_CONFIG)
    changed["train"]["lr"] = 0.002
    other = tiny_run / "changed.yaml"
    other.write_text(__import__("yaml").safe_dump(changed))
    dry = snakemake(tiny_run, "-n", configfile=other)
    assert job_stats(dry.stdout + dry.stderr) == {"train": 1, "validate": 1, "all": 1}
    # validate.* reruns validate only; a speed-only train key reruns nothing
    changed = copy.deepcopy(TINY_CONFIG)
    changed["validate"]["batch_size"] = 16
    other.write_text(__import__("yaml").safe_dump(changed))
    dry = snakemake(tiny_run, "-n", configfile=other)
    assert job_stats(dry.stdout + dry.stderr) == {"validate": 1, "all": 1}
    changed = copy.deepcopy(TINY_CONFIG)
    changed["train"]["num_workers"] = 1
    other.write_text(__import__("yaml").safe_dump(changed))
    dry = snakemake(tiny_run, "-n", configfile=other)
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_report_has_metrics_and_plots(tiny_run: Path) -> None:
    snakemake(tiny_run, "--report", "report.html", configfile=tiny_run / "config.yaml")
    html = (tiny_run / "report.html").read_text(errors="replace")
    for needle in ("metrics.tsv", "roc.png", "froc.png", "pr.png", "training_curves.png", "submission.csv"):
        assert needle in html


@pytest.mark.slow
def test_kill_during_crops_then_recovery_equals_uninterrupted_run(tiny_run: Path, tmp_path: Path) -> None:
    config_path = write_config(tmp_path, TINY_CONFIG)
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", "--resources", "gpu=1", "--configfile", str(config_path)]
    slow_env = {**env(), "LUNA_CROPS_SLOW_S": "2"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slow_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "logs" / "crops" / "subset0.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "scan 1/" in log.read_text()):
        assert proc.poll() is None, "snakemake ended before the crop stage"
        time.sleep(0.2)
    assert log.exists(), "crop stage never started"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its running jobs, as a crashed node would
    proc.wait()
    assert not (tmp_path / "results" / "crops" / "subset0.h5").exists()
    # the documented recovery: unlock the working directory, then the same command again
    subprocess.run([*cmd, "--unlock"], cwd=tmp_path, env=env(), check=True, capture_output=True)
    subprocess.run(cmd, cwd=tmp_path, env=env(), check=True, capture_output=True)
    assert "from cache" in log.read_text()
    for subset in SUBSETS:
        ours = read_arrays(tmp_path / "results" / "crops" / f"{subset}.h5")
        ref = read_arrays(tiny_run / "results" / "crops" / f"{subset}.h5")
        for name in ref:
            np.testing.assert_array_equal(ours[name], ref[name], err_msg=f"{subset}:{name}")
    for rel in ("results/candidates.tsv", "results/splits.tsv", "results/model/history.tsv",
                "results/validation/predictions.tsv", "results/validation/metrics.tsv"):
        assert (tmp_path / rel).read_text() == (tiny_run / rel).read_text(), rel
    assert not (tmp_path / "results" / ".cache" / "crops" / "subset0").exists()


@pytest.mark.slow
def test_default_config_tables_on_a_fresh_checkout(tmp_path: Path) -> None:
    """The repo's own config: synthesize + candidates.tsv + splits.tsv; real-looking, readable, leak-free."""
    import SimpleITK as sitk

    from luna.candidates import read_annotations_csv, read_candidates_tsv
    from luna.ct import find_scans, read_scan
    from luna.geometry import xyz_to_irc
    from luna.splits import read_splits_tsv

    snakemake(tmp_path, targets=("results/candidates.tsv", "results/splits.tsv"),
              configfile=REPO / "config" / "config.yaml")
    root = tmp_path / "data" / "synthetic"
    scans = find_scans(root)
    assert len(scans) == 60
    flipped = 0
    for scan in scans.values():
        image = sitk.ReadImage(str(scan.path))
        assert image.GetSize()[0] > 0
        flipped += np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([-1, -1, 1]))
    assert 0 < flipped < len(scans)
    annotations = read_annotations_csv(root / "annotations.csv")
    assert len(annotations) >= 80
    for uid, rows in annotations.groupby("seriesuid"):
        volume, geometry = read_scan(scans[uid].path)
        irc = xyz_to_irc(rows[["coordX", "coordY", "coordZ"]].to_numpy(), geometry)
        hu = volume[irc[:, 0], irc[:, 1], irc[:, 2]]
        assert np.all(hu > -750), (uid, hu)  # solid > -400, ground-glass > -750
    candidates = read_candidates_tsv(tmp_path / "results" / "candidates.tsv")
    assert set(candidates["series_uid"]) <= set(scans)
    assert (candidates["is_nodule"] == 1).sum() >= 80
    splits = read_splits_tsv(tmp_path / "results" / "splits.tsv")
    assert sorted(splits["series_uid"]) == sorted(scans)
    assert splits["series_uid"].is_unique
    assert set(splits["split"]) == {"train", "val"}
