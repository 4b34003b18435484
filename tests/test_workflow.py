"""The Snakemake workflow end to end: lint, config errors, one model per test fold, pooled evaluation, caching,
reruns (adding a fold trains only that fold), kill -9 recovery, report."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import torch

from luna.evaluation import METRICS_COLUMNS
from store_util import read_arrays
from hooks import hook_env
from workflow_util import BIN, REPO, TINY_CONFIG, env, snakemake, write_config

SUBSETS = ("subset0", "subset1", "subset2")


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
        ({"split": {"run_folds": [0, 4]}}, "split.run_folds: fold(s) 4 do not exist; the split has folds 0, 1, 2"),
        ({"crops": {"hu_window": [1000, -1000]}}, "crops.hu_window: [1000, -1000] must be [low, high] with low < high"),
        ({"split": {"folds": 3, "run_folds": [3]}}, "split.run_folds: fold(s) 3 do not exist; the split has folds 0, 1, 2"),
        ({"dataset": {"subsets": ["subset0", "subset0"]}}, "config key dataset.subsets: ['subset0', 'subset0'] has "
                                                            "non-unique elements"),
        ({"dataset": {"subsets": ["subset7"]}}, "dataset.subsets: subset7 not among the synthetic subsets (subset0, "
                                                "subset1, subset2; synthetic.n_subsets: 3)"),
        ({"synthetic": {"size_xy_min": 300, "size_xy_max": 200}}, "synthetic.size_xy_min = (300, 200): size_xy_min "
                                                                  "is above size_xy_max; need 32 <= size_xy_min <= "
                                                                  "size_xy_max <= 2048"),
        ({"split": {"selection_fraction": 0}}, "split.selection_fraction: 0 leaves nothing to choose on: set "
                                               "train.keep: last and a fixed train.threshold (got keep last, "
                                               "threshold fp_per_scan:2.5)"),
        # values the schema's types allow and the stages refuse: found by the dry run, not by every job
        ({"train": {"threshold": "recall:0"}}, "train.threshold: threshold policy 'recall:0': recall target must be "
                                               "in (0, 1]"),
        ({"crops": {"hu_window": [-40000, 1000]}}, "config key crops.hu_window.0: -40000 is less than the minimum of "
                                                   "-32768"),
        ({"validate": {"seed": -1}}, "config key validate.seed: -1 is less than the minimum of 0"),
        # a oneOf says what it takes; a split that leaves a run fold empty stops here, not after every crop
        ({"split": {"folds": 1}}, "config key split.folds: 1 is not valid under any of the given schemas; expected "
                                  "'subsets' or an integer >= 2"),
        ({"split": {"run_folds": 0}}, "config key split.run_folds: 0 is not valid under any of the given schemas; "
                                      "expected 'all' or a list of integers >= 0"),
        ({"dataset": {"subsets": ["subset1"]}, "split": {"run_folds": "all"}},
         "split.folds: subsets with one subset (subset1) is one fold, and nothing is left to train on"),
        # each failed its training job after every crop (the fold's 6 other scans: none selects, all select)
        ({"split": {"selection_fraction": 0.01}}, "split.selection_fraction: 0.01 leaves test fold 0 no scan in its "
                                                  "selection set (of its 6 other scans, 0 select)"),
        ({"split": {"selection_fraction": 0.9}}, "split.selection_fraction: 0.9 leaves test fold 0 no scan to train on "
                                                 "(of its 6 other scans, 6 select); lower it"),
        # a table the synthetic set does not write failed its job late (evaluate: after every training)
        ({"dataset": {"annotations_excluded": "other.csv"}}, "dataset.annotations_excluded: the synthetic set writes "
                                                             "annotations_excluded.csv, not other.csv"),
        ({"dataset": {"root": "results/data"}}, "dataset.root: results/data holds or lies in the workflow's results/"),
        ({"crops": {"cache": ""}}, "config key crops.cache: '' should be non-empty"),  # was a cache under /
        ({"train": {"threshold": "0.5"}}, "config key train.threshold: '0.5' is a quoted number; write it without "
                                          "quotes"),
        ({"train": {"lr": "0.001"}}, "config key train.lr: '0.001' is a quoted number; write it without quotes"),
        # YAML 1.1 reads inf (no dot) as text: it was "a quoted number", which it was not
        ({"train": {"threshold": "inf"}}, "config key train.threshold: 'inf' is not a finite number"),
        # a cache over the scans: luna-crops refused it, after the synthesis
        ({"crops": {"cache": "data/synthetic"}}, "crops.cache: data/synthetic/subset0 (the resume cache of subset0's "
                                                 "crop job, removed whole after it) overlaps"),
        # YAML's .nan and .inf pass the schema's bounds: they failed the train job after every crop
        ({"train": {"lr": float("nan")}}, "config key train.lr: nan is not a finite number"),
        ({"train": {"clip_grad_norm": float("inf")}}, "config key train.clip_grad_norm: inf is not a finite number"),
        ({"split": {"selection_fraction": float("nan")}}, "config key split.selection_fraction: nan is not a finite "
                                                          "number"),
        # luna-train refused it after every crop
        ({"train": {"balanced_schedule": [[2, 4], [2, 0]]}}, "train.balanced_schedule: epoch 2 given more than once "
                                                             "(each epoch once)"),
        ({"train": {"epochs": 2, "augment": {"flip_only_epochs": 3}}}, "train.augment.flip_only_epochs: 3 is more "
                                                                       "than train.epochs (2)"),
    ],
)
def test_bad_config_stops_the_dry_run_naming_the_key(tmp_path, patch, expected) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    for section, values in patch.items():
        config[section] = {**config.get(section, {}), **values}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    # one line for one mistake (a oneOf's type error beside it was a second)
    assert (proc.stdout + proc.stderr).count("config key ") <= 1


def rule_threads(output: str) -> dict[str, int]:
    """A dry run's threads per rule ({rule: threads}; rules printed without a threads line: 1)."""
    threads: dict[str, int] = {}
    for block in re.split(r"\n(?=rule \w+:)", output):
        name = re.match(r"rule (\w+):", block)
        if name:
            found = re.search(r"^\s+threads: (\d+)", block, re.MULTILINE)
            threads[name.group(1)] = int(found.group(1)) if found else 1
    return threads


def test_slurm_profile_gives_training_cpus_for_its_loader_workers(tmp_path) -> None:
    """On a GPU, --num-workers auto starts the train rule's threads - 1 loader workers (luna-train gets them as
    --threads): with the rule's 2 a SLURM job streaming real crops had 1 worker, where 4 feed an H100. The profile
    asks 8 for train and leaves the other rules' (the local executor shows the threads in a dry run)."""
    cmd = [str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(REPO / "profiles" / "slurm"), "--executor", "local", "--cores", "16",
           "--configfile", str(write_config(tmp_path, TINY_CONFIG))]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = rule_threads(proc.stdout)
    assert threads["train"] == 8
    assert threads["crops"] == 4 and threads["predict"] == 2


def test_a_synthetic_root_holding_other_files_stops_the_dry_run(tmp_path) -> None:
    """Snakemake deletes the synthesize rule's directory() output before the job, so luna-synth's own refusal of a
    folder it did not write came after the user's files were gone (root set to one's LUNA16 copy, source left
    synthetic, with --forceall)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important\n")
    config = copy.deepcopy(TINY_CONFIG)
    config["dataset"] = {**config.get("dataset", {}), "root": "mine/"}
    proc = snakemake(tmp_path, "-n", "--forceall", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert ("dataset.root: mine holds files not written by luna-synth (no .luna-synth.json); the synthetic set would "
            "replace them: for data of your own set dataset.source: luna16") in proc.stdout + proc.stderr
    assert (mine / "notes.txt").read_text() == "important\n"


def test_a_fold_named_by_its_path_is_checked_as_run_folds_are(tmp_path) -> None:
    """results/folds/N/... as a target: a fold that does not exist, or one without a selection scan, stops the
    dry run as it does in split.run_folds (it failed the train job after the synthesis and every crop)."""
    config_path = write_config(tmp_path, TINY_CONFIG)
    proc = snakemake(tmp_path, "-n", targets=("results/folds/7/predictions.tsv",), configfile=config_path,
                     check=False)
    assert proc.returncode != 0
    assert ("results/folds/7: fold 7 does not exist; the split has folds 0, 1, 2 (split.folds: subsets)"
            in proc.stdout + proc.stderr)
    proc = snakemake(tmp_path, "-n", targets=("results/folds/2/model.pt",), configfile=config_path, check=False)
    assert proc.returncode == 0 and job_stats(proc.stdout + proc.stderr)["train"] == 1, proc.stdout + proc.stderr
    # one spelling per fold (folds/02 trained fold 2 again into a second folder); no crops of a subset not run
    proc = snakemake(tmp_path, "-n", targets=("results/folds/02/model.pt",), configfile=config_path, check=False)
    assert proc.returncode != 0 and "No rule to produce results/folds/02/model.pt" in proc.stdout + proc.stderr
    proc = snakemake(tmp_path, "-n", targets=("results/crops/subset7.h5",), configfile=config_path, check=False)
    assert proc.returncode != 0
    assert ("results/crops/subset7.h5: subset7 is not one of this run's subsets (subset0, subset1, subset2; "
            "dataset.subsets)") in proc.stdout + proc.stderr
    # a selection share of 0.2 selects one of fold 0's and fold 2's six other scans, none of fold 1's
    config = copy.deepcopy(TINY_CONFIG)
    config["split"] = {**config["split"], "selection_fraction": 0.2, "run_folds": [0]}
    config_path = write_config(tmp_path, config)
    assert snakemake(tmp_path, "-n", configfile=config_path, check=False).returncode == 0
    proc = snakemake(tmp_path, "-n", targets=("results/folds/1/model.pt",), configfile=config_path, check=False)
    assert proc.returncode != 0
    assert ("split.selection_fraction: 0.2 leaves test fold 1 no scan in its selection set (of its 6 other scans, 0 "
            "select); raise it, or use 0 with train.keep: last and a fixed train.threshold") in proc.stdout + proc.stderr
    proc = snakemake(tmp_path, "-n", targets=("results/folds/2/model.pt",), configfile=config_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("seed, run_folds, message", [
    (1, [2], "the test fold 2 (3 scans) is planned no nodule (where): its metrics would be undefined"),
    (10, [0], "the train set of test fold 0 (3 scans) is planned no nodule (where): nothing to learn from"),
    (1, [0], "the selection set of test fold 0 (1 scan) is planned no nodule (where): its threshold and kept "
             "epoch could not be chosen"),
    (17, "all", None),
])
def test_a_synthetic_role_planned_no_nodule_stops_the_dry_run(tmp_path, seed, run_folds, message) -> None:
    """The synthetic plan knows each scan's nodules before any file exists: a test fold, training set or
    selection set without one failed luna-train after the synthesis and every crop."""
    config = copy.deepcopy(TINY_CONFIG)
    config["synthetic"] = {**config["synthetic"], "seed": seed, "nodules_per_scan": 0.4}
    config["split"] = {**config["split"], "run_folds": run_folds}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    if message is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0
        where = "the 9 synthetic scans of subset0, subset1, subset2"
        assert f"synthetic.nodules_per_scan: {message.replace('where', where)}; " in proc.stdout + proc.stderr


def test_a_synthetic_run_fold_without_scans_stops_the_dry_run(tmp_path) -> None:
    """The synthetic UIDs come from the seed alone: a run fold of the hash split without scans is known at the dry
    run (it failed its training job after every crop); a fold with scans of such a split still runs."""
    from luna.splits import hash_fold
    from luna.synth.config import SynthConfig, plan_dataset

    uids = [plan.series_uid for plan in plan_dataset(SynthConfig.from_dict(TINY_CONFIG["synthetic"]))]
    assert len(uids) == 9
    full = sorted({hash_fold(uid, 9) for uid in uids})
    empty = sorted(set(range(9)) - set(full))
    assert empty  # nine scans in nine hash folds leave some empty
    config = copy.deepcopy(TINY_CONFIG)
    config["split"] = {**config.get("split", {}), "folds": 9, "run_folds": "all"}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert (f"split.folds: fold(s) {', '.join(map(str, empty))} of 9 hold no scan (the 9 synthetic scans of subset0, "
            "subset1, subset2); use fewer folds or other split.run_folds") in proc.stdout + proc.stderr
    config["split"]["run_folds"] = full[:1]
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_candidates_file_named(tmp_path) -> None:
    (tmp_path / "luna" / "subset0").mkdir(parents=True)
    config = {"dataset": {"source": "luna16", "root": str(tmp_path / "luna")}}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert f"dataset.candidates: file {tmp_path / 'luna' / 'candidates.csv'} not found" in proc.stdout + proc.stderr
    (tmp_path / "luna" / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    (tmp_path / "luna" / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    proc = snakemake(tmp_path, "-n", configfile=tmp_path / "config.yaml", check=False)
    assert (f"dataset.annotations_excluded: file {tmp_path / 'luna' / 'annotations_excluded.csv'} not found (set "
            "dataset.annotations_excluded: null to go without)") in proc.stdout + proc.stderr


def test_candidates_without_a_class_column_stop_the_dry_run(tmp_path) -> None:
    """luna-candidates takes a list without labels (to predict); the workflow trains, and found out in luna-train
    after every crop ("row 0 has no class label", naming a crop store)."""
    root = tmp_path / "luna"
    (root / "subset0").mkdir(parents=True)
    (root / "subset0" / "1.2.mhd").write_text("")  # found by name; the dry run reads no scan
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ\n1.2,0,0,0\n")
    for name in ("annotations.csv", "annotations_excluded.csv"):
        (root / name).write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, {"dataset": {"source": "luna16",
                                                                                    "root": str(root)}}), check=False)
    assert proc.returncode != 0
    assert (f"dataset.candidates: {root / 'candidates.csv'} has no class column (header: seriesuid,coordX,coordY,"
            "coordZ); the workflow trains on the candidates' labels") in proc.stdout + proc.stderr
    # a subset that is no folder name is named under its own key (it was dataset.root's)
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.2,0,0,0,0\n")
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, {"dataset": {
        "source": "luna16", "root": str(root), "subsets": [".."]}}), check=False)
    assert proc.returncode != 0
    assert f"dataset.subsets: subset '..': a subset is the name of a folder directly under {root}" in \
        proc.stdout + proc.stderr


def test_a_run_fold_without_scans_stops_the_dry_run(tmp_path) -> None:
    """Three scans in five hash folds: a run fold without scans failed its training job after every crop."""
    from luna.splits import hash_fold

    root = tmp_path / "luna"
    uids = ["1.2.1", "1.2.2", "1.2.3"]
    for uid in uids:
        (root / "subset0").mkdir(parents=True, exist_ok=True)
        (root / "subset0" / f"{uid}.mhd").write_text("")  # found by name; the dry run reads no scan
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    empty = sorted(set(range(5)) - {hash_fold(uid, 5) for uid in uids})
    config = {"dataset": {"source": "luna16", "root": str(root), "annotations": None},
              "split": {"folds": 5, "run_folds": "all"}}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert (f"split.folds: fold(s) {', '.join(map(str, empty))} of 5 hold no scan (the 3 scans under {root}); use "
            "fewer folds or other split.run_folds") in proc.stdout + proc.stderr
    full = sorted({hash_fold(uid, 5) for uid in uids})
    config["split"]["run_folds"] = full  # the folds that have scans, but two other scans: none selects
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert f"split.selection_fraction: 0.1 leaves test fold {full[0]} no scan in its selection set (of its 2 other " \
           "scans, 0 select); raise it, or use 0 with train.keep: last and a fixed train.threshold" in \
           proc.stdout + proc.stderr
    config["split"]["selection_fraction"] = 0  # then: planned
    config["train"] = {"threshold": 0.5}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_luna16_fold_whose_training_set_has_no_nodule_stops_the_dry_run(tmp_path) -> None:
    """A LUNA16 folder whose class-1 candidates all lie in the test scans of a run fold: the dry run passed and
    luna-train refused the fold after every crop ("... training crops with 0 nodules")."""
    root = tmp_path / "luna"
    scans = {f"1.2.{i}": f"subset{i % 3}" for i in range(6)}  # fold 1: 1.2.1 and 1.2.4; the rest trains
    for uid, subset in scans.items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        (root / subset / f"{uid}.mhd").write_text("")  # found by name; the dry run reads no scan
    rows = [f"{uid},1,2,3,{int(subset == 'subset1')}\n{uid},4,5,6,0\n" for uid, subset in scans.items()]
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "".join(rows))
    config = {"dataset": {"source": "luna16", "root": str(root), "annotations": None},
              "split": {"folds": "subsets", "run_folds": [1], "selection_fraction": 0},
              "train": {"keep": "last", "threshold": 0.5}}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode != 0
    assert (f"{root / 'candidates.csv'}: the train set of test fold 1 (4 scans) has no candidate of class 1 (the 6 "
            f"scans under {root}): nothing to learn from; use more scans or lower split.selection_fraction") in \
        proc.stdout + proc.stderr
    # one positive in a training scan, and the same dry run plans the jobs
    (root / "candidates.csv").write_text((root / "candidates.csv").read_text().replace("1.2.0,4,5,6,0",
                                                                                       "1.2.0,4,5,6,1"))
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the test fold's own nodules: none in fold 2 (subset2: 1.2.2, 1.2.5)
    config["split"]["run_folds"] = [2]
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config), check=False)
    assert (f"{root / 'candidates.csv'}: the test fold 2 (2 scans) has no candidate of class 1 (the 6 scans under "
            f"{root}): its metrics would be undefined; use fewer folds or more scans") in proc.stdout + proc.stderr


def test_no_annotations_means_no_excluded_findings(tmp_path) -> None:
    """annotations: null (predict-only) with the shipped annotations_excluded: the excluded findings qualify a FROC
    there is not, so they are ignored (luna-evaluate refused the pair, after every fold had trained)."""
    root = tmp_path / "luna"
    (root / "subset0").mkdir(parents=True)
    (root / "subset0" / "1.2.3.mhd").write_text("")  # found by name; the dry run reads no scan
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    config = {"dataset": {"source": "luna16", "root": str(root), "annotations": None}}  # no annotations_excluded.csv
    proc = snakemake(tmp_path, "-n", targets=("results/candidates.tsv",), configfile=write_config(tmp_path, config),
                     check=False)  # was: "dataset.annotations_excluded: file .../annotations_excluded.csv not found"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rule candidates" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One uninterrupted run of the whole workflow on the tiny synthetic config (test folds 0 and 1)."""
    workdir = tmp_path_factory.mktemp("tiny")
    proc = snakemake(workdir, configfile=write_config(workdir, TINY_CONFIG))
    assert "luna: metrics in results/validation/metrics.tsv" in proc.stdout + proc.stderr
    hint = [line for line in (proc.stdout + proc.stderr).splitlines() if "luna: build the report with: " in line]
    # run with -s <repo>/Snakefile --directory <workdir>: the hint repeats both, so it works from any folder
    assert hint == [f"luna: build the report with: snakemake --report report.html -s {REPO / 'Snakefile'} "
                    f"--directory {workdir.resolve()} --configfile {workdir / 'config.yaml'}"]
    (workdir / "report_hint.txt").write_text(hint[0].split(" with: ", 1)[1])
    return workdir


@pytest.mark.slow
def test_tiny_pipeline_outputs(tiny_run: Path) -> None:
    results = tiny_run / "results"
    splits = pd.read_csv(results / "splits.tsv", sep="\t", dtype={"series_uid": str})
    assert list(splits.columns) == ["series_uid", "subset", "fold"]
    assert (splits["fold"] == splits["subset"].str[-1].astype(int)).all()  # folds: subsets
    for fold in (0, 1):
        history = pd.read_csv(results / "folds" / str(fold) / "history.tsv", sep="\t")
        assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [1, "selection"], [2, "train"],
                                                               [2, "selection"]]
        predictions = pd.read_csv(results / "folds" / str(fold) / "predictions.tsv", sep="\t", dtype={"series_uid": str})
        assert set(predictions["series_uid"]) <= set(splits.loc[splits["fold"] == fold, "series_uid"])
        assert (predictions["fold"] == fold).all() and predictions["probability"].between(0, 1).all()
    assert not (results / "folds" / "2").exists()
    val = results / "validation"
    metrics = pd.read_csv(val / "metrics.tsv", sep="\t")
    assert list(metrics.columns) == METRICS_COLUMNS
    assert metrics["fold"].astype(str).tolist() == ["0", "1", "all"] and set(metrics["split"]) == {"test"}
    predictions = pd.read_csv(val / "predictions.tsv", sep="\t")
    submission = (val / "submission.csv").read_text().splitlines()
    assert submission[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert len(submission) == len(predictions) + 1
    for name in ("roc.png", "pr.png", "froc.png", "training_curves.png"):
        assert (val / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ci = pd.read_csv(val / "metrics_ci.tsv", sep="\t")
    assert ci["fold"].astype(str).unique().tolist() == ["0", "1", "all"]
    # fold 0's three scans include one without nodules: one of the 50 samples drew only it, has no sensitivity
    # and is left out (and counted) rather than sorted last as the official script does
    assert ci.groupby(ci["fold"].astype(str))["n_bootstrap"].agg(set).to_dict() == {"0": {49}, "1": {50}, "all": {50}}
    assert ("fold 0: 1 of 50 bootstrap samples drew no nodule and are left out of its intervals (metrics_ci.tsv "
            "n_bootstrap 49)") in (tiny_run / "logs" / "evaluate.log").read_text()
    for log in ("synthesize", "candidates", "split", "train/0", "train/1", "predict/0", "predict/1", "evaluate"):
        assert (tiny_run / "logs" / f"{log}.log").stat().st_size > 0
        assert (tiny_run / "benchmarks" / "runs" / f"{log}.tsv").exists()
    # the rule scripts set OMP_WAIT_POLICY=ACTIVE before torch loads (unless the user set it); the CPU line says so
    expected = os.environ.get("OMP_WAIT_POLICY", "ACTIVE")
    assert f"OMP_WAIT_POLICY={expected})" in (tiny_run / "logs" / "train" / "0.log").read_text()
    # model.pt stays writable by its owner: a protected() output made every retrain fail for a non-root user
    assert (results / "folds" / "0" / "model.pt").stat().st_mode & 0o200
    # train.skip_excluded: the rule hands luna-train the synthetic set's own annotations_excluded.csv (fold 1's
    # training scans hold negatives on its findings)
    skipped = re.search(r"--skip-excluded: (\d+) training negatives on the (\d+) findings of data/synthetic/"
                        r"annotations_excluded.csv left out", (tiny_run / "logs" / "train" / "1.log").read_text())
    assert skipped is not None and int(skipped.group(1)) > 0 and int(skipped.group(2)) > 0


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
    assert job_stats(dry.stdout + dry.stderr) == {"train": 2, "predict": 2, "evaluate": 1, "all": 1}
    # the split's selection share shapes the models too; validate.* reruns evaluate only; speed-only keys nothing
    changed = copy.deepcopy(TINY_CONFIG)
    changed["split"]["selection_fraction"] = 0.5
    other.write_text(__import__("yaml").safe_dump(changed))
    dry = snakemake(tiny_run, "-n", configfile=other)
    assert job_stats(dry.stdout + dry.stderr) == {"train": 2, "predict": 2, "evaluate": 1, "all": 1}
    changed = copy.deepcopy(TINY_CONFIG)
    changed["validate"]["bootstrap"] = 10
    other.write_text(__import__("yaml").safe_dump(changed))
    dry = snakemake(tiny_run, "-n", configfile=other)
    assert job_stats(dry.stdout + dry.stderr) == {"evaluate": 1, "all": 1}
    # crops.cache is where the resume cache lives: it changes no crop (it reran every stage but synthesis); the
    # default subsets spelled out, in any order, are the same subsets (they retrained every fold; listed in
    # another order they also trained other models: the crop stores' order is the samples'); the root spelled
    # otherwise is the same folder (it reran every stage but synthesis)
    # lr: 1e-3 is the shipped 0.001 (YAML 1.1 reads it as text, which the schema refused as not a number)
    for section, key, value in (("train", "num_workers", 1), ("validate", "batch_size", 16), ("train", "lr", "1e-3"),
                                ("crops", "cache", "results/.cache/elsewhere"),
                                ("dataset", "subsets", ["subset0", "subset1", "subset2"]),
                                ("dataset", "subsets", ["subset2", "subset0", "subset1"]),
                                ("dataset", "root", "data/synthetic/"), ("dataset", "root", "./data/synthetic")):
        changed = copy.deepcopy(TINY_CONFIG)
        changed.setdefault(section, {})[key] = value
        other.write_text(__import__("yaml").safe_dump(changed))
        dry = snakemake(tiny_run, "-n", configfile=other)
        assert "Nothing to be done" in dry.stdout + dry.stderr, (section, key)
    # a split that cannot train is refused after a finished run too: Snakemake took the train rule's refusal under
    # existing files for "no producer", and reported the old results as up to date ("Nothing to be done", exit 0)
    for fraction, fold, target in ((0.01, 0, "results/validation/metrics.tsv"),
                                   (0.2, 1, "results/folds/1/predictions.tsv")):
        message = (f"split.selection_fraction: {fraction} leaves test fold {fold} no scan in its selection set (of its "
                   "6 other scans, 0 select)")
        changed = copy.deepcopy(TINY_CONFIG)
        changed["split"]["selection_fraction"] = fraction
        other.write_text(__import__("yaml").safe_dump(changed))
        for targets in ((), (target,)):
            dry = snakemake(tiny_run, "-n", targets=targets, configfile=other, check=False)
            assert dry.returncode != 0 and message in dry.stdout + dry.stderr, (fraction, targets, dry.stdout[-2000:])


@pytest.mark.slow
def test_report_has_metrics_and_plots(tiny_run: Path) -> None:
    hint = (tiny_run / "report_hint.txt").read_text().split()  # the command printed after the run, as printed
    assert hint[:3] == ["snakemake", "--report", "report.html"]
    proc = subprocess.run([str(BIN / "snakemake"), *hint[1:]], cwd=REPO.parent, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (tiny_run / "report.html").read_text(errors="replace")
    for needle in ("metrics.tsv", "roc.png", "froc.png", "pr.png", "training_curves.png", "submission.csv"):
        assert needle in html


@pytest.mark.slow
def test_kill_during_crops_then_recovery_equals_uninterrupted_run(tiny_run: Path, tmp_path: Path) -> None:
    config_path = write_config(tmp_path, TINY_CONFIG)
    targets = [f"results/crops/{subset}.h5" for subset in SUBSETS] + ["results/splits.tsv"]
    cmd = [str(BIN / "snakemake"), *targets, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", "--resources", "gpu=1", "--configfile", str(config_path)]
    slow_env = hook_env(env(), LUNA_TEST_SLOW_SCAN_S="2")
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
    # the documented recovery: the same command again (profiles/default: no lock left behind to clear)
    subprocess.run(cmd, cwd=tmp_path, env=env(), check=True, capture_output=True)
    assert "from cache" in log.read_text()
    for subset in SUBSETS:
        ours = read_arrays(tmp_path / "results" / "crops" / f"{subset}.h5")
        ref = read_arrays(tiny_run / "results" / "crops" / f"{subset}.h5")
        for name in ref:
            np.testing.assert_array_equal(ours[name], ref[name], err_msg=f"{subset}:{name}")
    for rel in ("results/candidates.tsv", "results/splits.tsv"):
        assert (tmp_path / rel).read_text() == (tiny_run / rel).read_text(), rel
    assert not (tmp_path / "results" / ".cache" / "crops" / "subset0").exists()


@pytest.mark.slow
def test_train_gpus_2_runs_two_processes_under_torchrun(tiny_run: Path, tmp_path: Path) -> None:
    """train.gpus: 2 on a machine without CUDA: two gloo processes; a model and a history come out."""
    import shutil

    work = tmp_path / "gpus2"
    shutil.copytree(tiny_run, work, ignore=shutil.ignore_patterns("folds", "validation", ".state", "logs",
                                                                     "benchmarks", "report.html", "*.yaml"))
    config = copy.deepcopy(TINY_CONFIG)
    config["train"]["gpus"] = 2
    target = "results/folds/0/history.tsv"
    dry = snakemake(work, "-n", targets=(target,), resources_gpu=2, configfile=write_config(work, config))
    assert job_stats(dry.stdout + dry.stderr) == {"train": 1}
    # --resources gpu=1: Snakemake would cut the job's gpu to 1 and run two processes on one device; refused
    # before any job (gpu=0 is no GPU: the job runs on the CPU)
    refused = snakemake(work, "-n", targets=(target,), resources_gpu=1, configfile=work / "config.yaml", check=False)
    assert refused.returncode != 0
    assert ("train.gpus = 2, but --resources gpu=1 grants a job at most 1: give --resources gpu=2 or more, or set "
            "train.gpus: 1") in refused.stdout + refused.stderr
    assert snakemake(work, "-n", targets=(target,), resources_gpu=0, configfile=work / "config.yaml").returncode == 0
    snakemake(work, targets=(target,), resources_gpu=2, configfile=work / "config.yaml")
    log = (work / "logs" / "train" / "0.log").read_text()
    assert "torchrun, 2 processes" in log and "2 process(es)" in log
    history = pd.read_csv(work / target, sep="\t")
    assert history[["epoch", "split"]].values.tolist() == [[1, "train"], [1, "selection"], [2, "train"],
                                                           [2, "selection"]]
    raw = torch.load(work / "results" / "folds" / "0" / "model.pt", weights_only=True)
    assert raw["args"]["test_fold"] == 0 and raw["samples_seen"] == raw["epoch"] * 64


def test_default_config_holds_out_a_fold_of_at_least_40_nodules() -> None:
    """The repo's own config, from the synthetic plan (no rendering): five subsets = five folds, test fold 0
    with >= 40 nodules, the other folds for training and a small selection set."""
    import yaml
    from snakemake.utils import validate

    from luna.splits import fold_roles, make_splits
    from luna.synth import SynthConfig, plan_dataset

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["split"]["folds"] == "subsets" and config["split"]["run_folds"] == [0]
    plans = plan_dataset(SynthConfig(**config["synthetic"]))
    splits = make_splits({p.series_uid: p.subset for p in plans}, config["split"]["folds"])
    assert sorted(set(splits["fold"])) == [0, 1, 2, 3, 4]
    nodules = {p.series_uid: p.n_nodules for p in plans}
    test = splits.loc[splits["fold"] == 0, "series_uid"]
    assert sum(nodules[u] for u in test) >= 40
    roles = fold_roles(splits, 0, config["split"]["selection_fraction"])
    selection = [u for u, r in roles.items() if r == "selection"]
    # selection_fraction 0.1 of 120 scans: enough scans for fp_per_scan's negatives, and nodules (luna-train
    # refuses a selection set without), while ~90% of the non-test scans are trained on
    assert 10 <= len(selection) <= 20 and sum(nodules[u] for u in selection) >= 8


@pytest.mark.slow
def test_adding_a_fold_trains_only_that_fold_and_the_pooled_report_is_exact(tiny_run: Path) -> None:
    """Runs last on tiny_run (it adds fold 2). Then every scan is in exactly one test fold, predicted once."""
    from luna.luna16 import read_annotations_csv
    from luna.froc import froc
    from luna.metrics import metric_row

    config = copy.deepcopy(TINY_CONFIG)
    config["split"]["run_folds"] = "all"
    all_folds = tiny_run / "all.yaml"
    all_folds.write_text(__import__("yaml").safe_dump(config))
    dry = snakemake(tiny_run, "-n", configfile=all_folds)
    out = dry.stdout + dry.stderr
    assert job_stats(out) == {"train": 1, "predict": 1, "evaluate": 1, "all": 1}
    assert "results/folds/2/model.pt" in out and "results/folds/0/model.pt:" not in out
    before = {f: (tiny_run / "results" / "folds" / str(f) / "model.pt").stat().st_mtime_ns for f in (0, 1)}
    snakemake(tiny_run, configfile=all_folds)
    assert before == {f: (tiny_run / "results" / "folds" / str(f) / "model.pt").stat().st_mtime_ns for f in (0, 1)}

    results = tiny_run / "results"
    splits = pd.read_csv(results / "splits.tsv", sep="\t", dtype={"series_uid": str})
    fold_of = dict(zip(splits["series_uid"], splits["fold"]))
    for fold in (0, 1, 2):
        raw = torch.load(results / "folds" / str(fold) / "model.pt", weights_only=True)
        test_scans = {u for u, f in fold_of.items() if f == fold}
        assert raw["test_fold"] == fold
        assert not test_scans & set(raw["train_series_uids"]) and not test_scans & set(raw["selection_series_uids"])
        assert not set(raw["train_series_uids"]) & set(raw["selection_series_uids"])
        predictions = pd.read_csv(results / "folds" / str(fold) / "predictions.tsv", sep="\t",
                                  dtype={"series_uid": str})
        assert set(predictions["series_uid"]) <= test_scans
    val = results / "validation"
    pooled = pd.read_csv(val / "predictions.tsv", sep="\t", dtype={"series_uid": str})
    candidates = pd.read_csv(results / "candidates.tsv", sep="\t", dtype={"series_uid": str})
    assert sorted(pooled["candidate_id"]) == sorted(candidates["candidate_id"])  # every candidate exactly once
    assert (pooled["series_uid"].map(fold_of) == pooled["fold"]).all()
    metrics = pd.read_csv(val / "metrics.tsv", sep="\t")
    assert metrics["fold"].astype(str).tolist() == ["0", "1", "2", "all"]
    row = metrics.iloc[-1]
    thresholds = pooled["fold"].map(dict(zip(metrics["fold"].iloc[:3].astype(int), metrics["threshold"].iloc[:3])))
    expected = metric_row(pooled["is_nodule"], pooled["probability"], pooled["loss"], epoch=0, split="test",
                          threshold=thresholds.to_numpy())
    for column in ("n", "n_pos", "loss_all", "precision", "recall", "f1", "auc"):
        assert float(row[column]) == pytest.approx(float(expected[column]), rel=1e-12, nan_ok=True), column
    root = tiny_run / "data" / "synthetic"
    recomputed = froc(pooled, read_annotations_csv(root / "annotations.csv"), list(fold_of),
                      read_annotations_csv(root / "annotations_excluded.csv", allow_negative=True))
    assert row["cpm"] == pytest.approx(recomputed.cpm, abs=1e-12)


def test_shipped_config_is_read_from_another_directory(tmp_path) -> None:
    """-s <repo>/Snakefile --directory <workdir> (profiles/README.md) reads config/config.yaml beside the Snakefile,
    with or without a --configfile over it; a whole-number float is the integer (TINY_CONFIG's epochs: 2.0 runs)."""
    dry = snakemake(tmp_path, "-n")
    assert job_stats(dry.stdout + dry.stderr) == {"all": 1, "candidates": 1, "crops": 5, "evaluate": 1, "predict": 1,
                                                  "split": 1, "synthesize": 1, "train": 1}
    dry = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, {"split": {"run_folds": [1.0]}}))
    assert job_stats(dry.stdout + dry.stderr)["train"] == 1
    assert "results/folds/1/model.pt" in dry.stdout and "results/folds/1.0" not in dry.stdout


@pytest.mark.slow
def test_real_lidc_ct_through_the_whole_luna16_workflow(tmp_path) -> None:
    """dataset.source luna16 end to end on real CT: the LIDC slab (compressed .zraw, 16 slices of 2.5 mm: the 32-slice
    crop overhangs it) in subset0 and, under other UIDs, in subset1 and subset2; candidates from a LUNA16-style CSV
    (the official nodule, a point beside it, lung and body points). Fold 0 is held out; with a 3-scan data set there
    is no selection set, so the run keeps its last epoch at a fixed threshold."""
    from conftest import LIDC_DIR, LIDC_UID

    root = tmp_path / "luna"
    uids = [LIDC_UID, LIDC_UID[:-1] + "4", LIDC_UID[:-1] + "5"]
    header = (LIDC_DIR / f"{LIDC_UID}.mhd").read_text()
    for subset, uid in enumerate(uids):
        folder = root / f"subset{subset}"
        folder.mkdir(parents=True)
        (folder / f"{uid}.mhd").write_text(header.replace(LIDC_UID, uid))
        (folder / f"{uid}.zraw").symlink_to(LIDC_DIR / f"{LIDC_UID}.zraw")
    nodule = pd.read_csv(LIDC_DIR / "annotations.csv").iloc[0]
    points = [(nodule.coordX, nodule.coordY, nodule.coordZ, 1), (nodule.coordX + 2.0, nodule.coordY - 1.5, -117.5, 1),
              (-100.0, 20.0, -120.0, 0), (-60.0, -40.0, -105.0, 0), (90.0, 150.0, -130.0, 0), (0.0, 0.0, -112.5, 0),
              (120.0, -80.0, -127.5, 0), (-140.0, 100.0, -95.0, 0)]
    rows = [f"{uid},{x},{y},{z},{cls}" for uid in uids for x, y, z, cls in points]
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(
        f"{uid},{nodule.coordX},{nodule.coordY},{nodule.coordZ},{nodule.diameter_mm}\n" for uid in uids))
    config = {"dataset": {"source": "luna16", "root": str(root), "annotations_excluded": None},
              "split": {"folds": "subsets", "run_folds": [0], "selection_fraction": 0},
              "train": {"epochs": 1, "samples_per_epoch": 32, "batch_size": 16, "keep": "last", "threshold": 0.5,
                        "selection_interval": 1, "tta": "none"},
              "validate": {"bootstrap": 0}}
    proc = snakemake(tmp_path, configfile=write_config(tmp_path, config))
    assert "luna: metrics in results/validation/metrics.tsv" in proc.stdout + proc.stderr
    results = tmp_path / "results"
    for subset, uid in enumerate(uids):
        store = read_arrays(results / "crops" / f"subset{subset}.h5")
        assert store["crops"].shape == (len(points), 32, 48, 48) and set(store["series_uid"]) == {uid}
        assert (results / "crops" / f"subset{subset}.skipped.tsv").read_text().count("\n") == 1  # header only
    # the official nodule's crop: its 16 slices in crop slices 9-24, centred on the nodule's slice (voxel z=7 at
    # crop slice 16, where the 3x3 median is the measured +93 HU: shared/data/README.md), air (-1000) padding around
    store = read_arrays(results / "crops" / "subset0.h5")
    crop = store["crops"][0].astype(float)
    assert store["center_irc"][0].tolist() == [7, 367, 316] and store["crop_start_irc"][0].tolist() == [-9, 343, 292]
    assert np.median(crop[16, 23:26, 23:26]) == 93
    assert (crop[:9] == -1000).all() and (crop[25:] == -1000).all() and (crop[9:25] > -1000).any(axis=(1, 2)).all()
    submission = pd.read_csv(results / "validation" / "submission.csv", dtype={"seriesuid": str})
    assert set(submission["seriesuid"]) == {LIDC_UID} and len(submission) == len(points)
    expected = pd.DataFrame(points, columns=["coordX", "coordY", "coordZ", "class"])
    assert np.allclose(submission.sort_values(["coordX", "coordY"])[["coordX", "coordY", "coordZ"]].to_numpy(),
                       expected.sort_values(["coordX", "coordY"])[["coordX", "coordY", "coordZ"]].to_numpy())
    assert submission["probability"].between(0, 1).all()
    metrics = pd.read_csv(results / "validation" / "metrics.tsv", sep="\t")
    assert metrics["fold"].astype(str).tolist() == ["0", "all"]
    assert metrics[["n", "n_pos", "n_neg"]].iloc[0].tolist() == [len(points), 2, len(points) - 2]
    assert 0.0 <= metrics["cpm"].iloc[0] <= 1.0 and metrics["threshold"].iloc[0] == 0.5
    # a scan edited in place (its folder's mtime unchanged) reruns its subset's crops, and what follows; no other
    # subset's (the crop rule's inputs were the folder only: nothing reran)
    header_path = root / "subset1" / f"{uids[1]}.mhd"
    folder_mtime = header_path.parent.stat().st_mtime_ns
    time.sleep(0.01)
    with open(header_path, "r+") as fh:  # in place: same file, the folder untouched
        fh.write(header_path.read_text().replace("Offset = -166 ", "Offset = -165 "))
    assert header_path.parent.stat().st_mtime_ns == folder_mtime
    dry = snakemake(tmp_path, "-n", configfile=tmp_path / "config.yaml")
    assert job_stats(dry.stdout + dry.stderr) == {"crops": 1, "train": 1, "predict": 1, "evaluate": 1, "all": 1}
    assert "results/crops/subset1.h5" in dry.stdout + dry.stderr
