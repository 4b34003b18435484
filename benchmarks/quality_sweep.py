"""Training-recipe sweep on a *development* data set: named variants of the training settings, each trained for
one test fold and scored on that fold's test scans (CPM, AUC, recall and precision at the selection-chosen
threshold), one table.

Honest by construction: the recipe is chosen here, on a synthetic data set generated with another seed than the
default run's (``--dev-seed``, default 7; the default run uses synthetic.seed 16), so the numbers reported for
the default run (docs/results.md) come from scans nothing was chosen on. Each run is exactly what the
workflow's train + predict + evaluate do for one fold: luna-train (selection set from the other folds),
luna-predict on the test fold, luna-evaluate.

    python benchmarks/quality_sweep.py --work /tmp/sweep --variants config cos:lr_schedule=cosine --seeds 0 1 \\
        --devtest-seed 8 --out /tmp/sweep/quality.md [-- extra luna-train options]

Every variant starts from config/config.yaml's `train` section (mapped to flags as the workflow does) and
overrides some keys. The table records the device, the CPU capability, the wall time of each training run
and the data set, so rows of one table compare.

One 30-scan test fold is noisy (a CPM interval about +-0.1 wide; three training seeds of one recipe spread
over 0.075-0.106 on the default run's fold, docs/results.md). ``--devtest-seed`` adds a second score per run: the model on
*every* scan of another synthetic data set of the same size (150 scans, ~210 nodules; no scan of it is trained
on or chooses anything), without test-time augmentation so the rows compare across TTA settings.
``--synthetic scans_per_subset=40`` (a key of config.yaml's ``synthetic:`` section) changes the development data's size, not the dev-test
set's, so that the dev-test column still compares.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from luna.app import DefaultsHelpFormatter
from luna.runner import config_argv

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

# name -> overrides of config/config.yaml's train section
VARIANTS: dict[str, dict] = {
    "config": {},
    "book": {"optimizer": "sgd", "lr": 0.001, "lr_warmup_steps": 0, "clip_grad_norm": 0, "ema_decay": 0,
             "balanced": 1, "balanced_schedule": [], "keep": "f1", "threshold": 0.5, "lr_schedule": "constant"},
}
GOAL = {"cpm": 0.80, "recall": 0.8, "precision": 0.3}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name`` from VARIANTS, or ``name:key=value,key=value`` (YAML values) overriding config/config.yaml."""
    if ":" not in text:
        if text not in VARIANTS:
            raise SystemExit(f"unknown variant {text!r}; known: {', '.join(VARIANTS)} (or name:key=value,...)")
        return text, VARIANTS[text]
    name, spec = text.split(":", 1)
    parts, depth, current = [], 0, ""
    for char in spec:  # split on the commas outside brackets and braces
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    overrides = {}
    for part in parts:
        key, value = part.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def build_data(work: Path, seed: int, jobs: int, synthetic: dict) -> tuple[list[str], str, str, str]:
    """The development data set under ``work/data-<seed>``, built once: scans, candidates.tsv, splits.tsv
    (config/config.yaml's split.folds), crop stores. Returns (crop stores, splits, annotations, excluded)."""
    from luna.candidates import CandidatesApp
    from luna.crops import CropApp
    from luna.splits import SplitApp
    from luna.synth import SynthApp

    changed = {k: v for k, v in synthetic.items() if CONFIG["synthetic"].get(k) != v}
    root = work / "-".join([f"data-{seed}", *(f"{k}{v}" for k, v in sorted(changed.items()))])
    data, results = root / "synthetic", root / "results"
    done = results / "done"
    if not done.exists():
        settings = {**synthetic, "seed": seed}
        assert SynthApp(["--out", str(data), "--jobs", str(jobs), *config_argv(settings)]).main() == 0
        assert CandidatesApp(["--root", str(data), "--out", str(results / "candidates.tsv")]).main() == 0
        assert SplitApp(["--root", str(data), "--folds", str(CONFIG["split"]["folds"]),
                         "--out", str(results / "splits.tsv")]).main() == 0
        for subset in sorted(p.name for p in data.glob("subset*")):
            assert CropApp(["--candidates", str(results / "candidates.tsv"), "--root", str(data), "--subset", subset,
                            "--out", str(results / "crops" / f"{subset}.h5"), "--threads", str(jobs)]).main() == 0
        done.write_text("ok\n")
    crops = sorted(str(p) for p in (results / "crops").glob("*.h5"))
    return crops, str(results / "splits.tsv"), str(data / "annotations.csv"), str(data / "annotations_excluded.csv")


def run_variant(name: str, overrides: dict, seed: int, test_fold: int, data: tuple, out: Path,
                extra: list[str]) -> dict:
    """luna-train + luna-predict + luna-evaluate for one (variant, seed); the test fold's metrics row."""
    from luna.evaluation import EvaluateApp
    from luna.training import LunaTrainingApp
    from luna.validation import PredictApp

    crops, splits, annotations, excluded = data
    train = copy.deepcopy(CONFIG["train"])
    train.update(overrides)
    train["seed"] = seed
    train.pop("gpus", None)
    fold = out / str(test_fold)
    argv = ["--crops", *crops, "--splits", splits, "--test-fold", str(test_fold),
            "--selection-fraction", str(overrides.get("selection_fraction", CONFIG["split"]["selection_fraction"])),
            "--out", str(fold), "--state", str(out / "state"), "--tb-dir", "none", "--threads", "2",
            "--annotations-excluded", excluded,  # what train.skip_excluded reads, as rule train passes it
            *config_argv({k: v for k, v in train.items() if k != "selection_fraction"}), *extra]
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = LunaTrainingApp(argv).main()
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{name} seed {seed}: luna-train failed (rc {rc}): {err.getvalue().strip()[-500:]}")
    assert PredictApp(["--model", str(fold / "model.pt"), "--crops", *crops, "--splits", splits,
                       "--out", str(fold / "predictions.tsv")]).main() == 0
    assert EvaluateApp(["--folds", str(fold), "--splits", splits, "--annotations", annotations,
                        "--annotations-excluded", excluded, "--out", str(out / "validation"),
                        "--bootstrap", "1000"]).main() == 0
    metrics = pd.read_csv(out / "validation" / "metrics.tsv", sep="\t", dtype={"fold": str})
    row = metrics[metrics["fold"] == str(test_fold)].iloc[0]
    ci = pd.read_csv(out / "validation" / "metrics_ci.tsv", sep="\t", dtype={"fold": str})
    cpm_ci = ci[(ci["fold"] == str(test_fold)) & (ci["metric"] == "cpm")].iloc[0]
    history = pd.read_csv(fold / "history.tsv", sep="\t")
    selection = history[history["split"] == "selection"]
    return {"variant": name, "seed": seed, "seconds": seconds, "epoch": int(row["epoch"]),
            "threshold": float(row["threshold"]), "cpm": float(row["cpm"]), "cpm_low": float(cpm_ci["ci_low"]),
            "cpm_high": float(cpm_ci["ci_high"]), "auc": float(row["auc"]), "recall": float(row["recall"]),
            "precision": float(row["precision"]),
            "sel_auc": float(selection["auc"].iloc[-1]) if len(selection) else float("nan"),
            "overrides": overrides}


def predict_froc(model: Path, data: tuple, out: Path, test_fold: int | None = None, tta: str = "none") -> tuple:
    """luna-predict (``tta``, default none) on one fold's scans, or on every scan with ``test_fold`` None, then
    the FROC over those scans (every one divides the FP count). Returns (FrocResult, predictions, scans, nodules,
    ignored)."""
    from luna.froc import froc
    from luna.luna16 import read_annotations_csv
    from luna.splits import read_splits_tsv
    from luna.validation import PredictApp

    crops, splits, annotations, excluded = data
    which = ["--scans", "all"] if test_fold is None else ["--splits", splits, "--fold", str(test_fold)]
    assert PredictApp(["--model", str(model), "--crops", *crops, *which, "--tta", tta,
                       "--out", str(out)]).main() == 0
    predictions = pd.read_csv(out, sep="\t")
    table = read_splits_tsv(splits)
    scans = (table["series_uid"] if test_fold is None
             else table.loc[table["fold"] == test_fold, "series_uid"]).tolist()
    nodules, ignored = read_annotations_csv(annotations), read_annotations_csv(excluded, allow_negative=True)
    return froc(predictions, nodules, scans, ignored), predictions, scans, nodules, ignored


def devtest_scores(predictions: pd.DataFrame, nodules: pd.DataFrame, scans: list[str],
                   ignored: pd.DataFrame) -> dict:
    """CPM over ``scans`` with a 200-resample scan bootstrap, and the candidates' ROC AUC: the dev-test columns."""
    from luna.froc import froc, froc_bootstrap
    from luna.metrics import auc_score

    low, high, _ = froc_bootstrap(predictions, nodules, scans, ignored, n_bootstrap=200)["cpm"]
    return {"dt_cpm": froc(predictions, nodules, scans, ignored).cpm, "dt_low": low, "dt_high": high,
            "dt_auc": auc_score(predictions["is_nodule"].to_numpy(), predictions["probability"].to_numpy())}


@dataclass
class DevtestSet:
    """Every candidate of the dev-test data set, ready to score predictions made from its crop stores."""

    stores: list        # the opened crop stores (luna.store.CropStore), in build_data's order
    rows: pd.DataFrame  # luna.inference.rows_of_scans over all of them: what luna.inference.predict takes
    frame: pd.DataFrame  # the rows' candidate columns; set frame["probability"], then devtest_scores
    splits: pd.DataFrame  # splits.tsv (series_uid, fold): the 30-scan blocks
    scans: list[str]
    nodules: pd.DataFrame
    ignored: pd.DataFrame


def devtest_set(work: Path, seed: int) -> DevtestSet:
    """The dev-test data set (``build_data`` at ``seed``, built once) with its stores open and its tables read."""
    from luna.inference import rows_of_scans
    from luna.luna16 import read_annotations_csv
    from luna.splits import read_splits_tsv
    from luna.validation import open_stores

    crops, splits, annotations, excluded = build_data(work, seed, 2, CONFIG["synthetic"])
    stores = open_stores(crops)
    rows = rows_of_scans(stores, None)
    table = read_splits_tsv(splits)
    return DevtestSet(stores, rows, rows[["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z",
                                          "is_nodule"]].copy(), table, table["series_uid"].tolist(),
                      read_annotations_csv(annotations), read_annotations_csv(excluded, allow_negative=True))


def score_devtest(model: Path, data: tuple, out: Path, tta: str = "none") -> dict:
    """The model on every scan of the dev-test data set (no TTA unless asked): :func:`devtest_scores`."""
    _, predictions, scans, nodules, ignored = predict_froc(model, data, out, tta=tta)
    return devtest_scores(predictions, nodules, scans, ignored)


def write_table(path: Path, rows: list[dict], header: str) -> None:
    lines = [header, "",
             "| variant | seed | train s | kept epoch | threshold | test CPM (95% CI) | test AUC | recall | precision "
             "| selection AUC (last) | goal | dev-test CPM, no TTA (95% CI) | dev-test AUC |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        goal = r["cpm"] >= GOAL["cpm"] and r["recall"] >= GOAL["recall"] and r["precision"] >= GOAL["precision"]
        lines.append(f"| {r['variant']} | {r['seed']} | {r['seconds']:.0f} | {r['epoch']} | {r['threshold']:.3f} | "
                     f"{r['cpm']:.3f} ({r['cpm_low']:.3f}-{r['cpm_high']:.3f}) | {r['auc']:.3f} | {r['recall']:.3f} | "
                     f"{r['precision']:.3f} | {r['sel_auc']:.3f} | {'yes' if goal else 'no'} | "
                     + (f"{r['dt_cpm']:.3f} ({r['dt_low']:.3f}-{r['dt_high']:.3f}) | {r['dt_auc']:.3f} |" if "dt_cpm" in r
                        else "- | - |"))
    lines += ["", "Variants (overrides of config/config.yaml's train section):", ""]
    for name, overrides in dict((r["variant"], r["overrides"]) for r in rows).items():
        lines.append(f"- `{name}`: `{overrides}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def add_seed_options(parser: argparse.ArgumentParser) -> None:
    """--dev-seed and --devtest-seed, as the paired development scripts take them (check with :func:`check_seeds`)."""
    parser.add_argument("--dev-seed", type=int, default=7, help="synthetic seed of the development data (not 16)")
    parser.add_argument("--devtest-seed", type=int, default=8, help="synthetic seed of the dev-test data (not 16)")


def check_seeds(args: argparse.Namespace) -> None:
    """Refuse development or dev-test data that is the default run's, or one data set used as both."""
    if CONFIG["synthetic"]["seed"] in (args.dev_seed, args.devtest_seed) or args.dev_seed == args.devtest_seed:
        raise SystemExit("--dev-seed and --devtest-seed must differ from each other and from the default run's seed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (data, runs)")
    p.add_argument("--variants", nargs="+", default=["config"],
                   help="variant names (see VARIANTS) or name:key=value,... overriding config/config.yaml's train "
                        "keys (YAML values; commas inside [] or {} belong to the value)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds, each variant runs once per seed")
    p.add_argument("--dev-seed", type=int, default=7, help="synthetic seed of the development data (not 16)")
    p.add_argument("--devtest-seed", type=int, default=None,
                   help="also score every run on all scans of a data set generated with this seed (e.g. 8), no TTA")
    p.add_argument("--synthetic", nargs="+", default=[], metavar="KEY=VALUE",
                   help="the development data's synthetic settings over config/config.yaml's, keys of its synthetic: "
                        "section (e.g. scans_per_subset=40: a larger training set); the dev-test set keeps the "
                        "config's size")
    p.add_argument("--test-fold", type=int, default=0, help="the development data's test fold")
    p.add_argument("--out", required=True, help="markdown table, rewritten after every run")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for synthesis and crops")
    p.add_argument("extra", nargs="*", help="after --: options appended to every luna-train call")
    args = p.parse_args(argv)
    for option, seed in (("--dev-seed", args.dev_seed), ("--devtest-seed", args.devtest_seed)):
        if seed == CONFIG["synthetic"]["seed"]:
            raise SystemExit(f"{option} {seed} is the default run's data: choose the recipe elsewhere")
    if args.devtest_seed == args.dev_seed:
        raise SystemExit(f"--devtest-seed {args.devtest_seed} is the development data itself (--dev-seed): its "
                         "scans are trained on")
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    synthetic = dict(CONFIG["synthetic"])
    for item in args.synthetic:
        key, _, value = item.partition("=")
        if key not in synthetic or key == "seed":
            raise SystemExit(f"--synthetic {item}: no synthetic key {key!r} here (have "
                             f"{', '.join(k for k in synthetic if k != 'seed')}; the seed is --dev-seed)")
        synthetic[key] = yaml.safe_load(value)
    data = build_data(work, args.dev_seed, args.jobs, synthetic)
    devtest = None if args.devtest_seed is None else build_data(work, args.devtest_seed, args.jobs, CONFIG["synthetic"])
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    size = ", ".join(args.synthetic) or "config/config.yaml's size"
    header = (f"# Training-recipe sweep (benchmarks/quality_sweep.py)\n\nDevelopment data: synthetic seed "
              f"{args.dev_seed} ({size}; the default run's seed {CONFIG['synthetic']['seed']} is "
              f"never used here), test fold {args.test_fold}. Device {device} ({name}), CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads. Goal: CPM >= {GOAL['cpm']}, recall >= {GOAL['recall']} and precision >= "
              f"{GOAL['precision']} at the threshold chosen on the selection set.")
    rows: list[dict] = []
    for text in args.variants:
        name, overrides = parse_variant(text)
        for seed in args.seeds:
            out = work / "runs" / f"{name}-s{seed}"
            row = run_variant(name, overrides, seed, args.test_fold, data, out, args.extra)
            if devtest is not None:
                row.update(score_devtest(out / str(args.test_fold) / "model.pt", devtest,
                                         out / f"devtest-{args.devtest_seed}.tsv"))
            rows.append(row)
            print(f"{name:<24s} seed {seed}: CPM {row['cpm']:.3f} ({row['cpm_low']:.3f}-{row['cpm_high']:.3f}) "
                  f"AUC {row['auc']:.3f} R {row['recall']:.3f} P {row['precision']:.3f} at {row['threshold']:.3f} "
                  f"epoch {row['epoch']} {row['seconds']:.0f} s"
                  + (f"; dev-test CPM {row['dt_cpm']:.3f} AUC {row['dt_auc']:.3f}" if "dt_cpm" in row else ""), flush=True)
            write_table(Path(args.out), rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
