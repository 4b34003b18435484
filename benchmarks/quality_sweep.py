"""Training-quality sweep: named variants of the training settings, each trained on the same data, one table.

Quality, not speed: for every (variant, seed) it trains with LunaTrainingApp and reports the best val row
by F1 (the row model.pt keeps), the highest val AUC over the epochs, and whether any val row reaches the
training issue's goal (recall >= 0.8 and precision >= 0.3). With no ``--data`` it first builds the default
synthetic data set (luna-synth defaults, split stride 5 as config/config.yaml, uncompressed crop stores).

    python benchmarks/quality_sweep.py --work /tmp/sweep --variants book warmup200 --seeds 0 1 \\
        --out benchmarks/results/quality_sweep.md [--data DIR_WITH_crops_AND_splits.tsv] [-- extra train args]

On a CUDA machine each 40,000-sample run takes ~20 s, so a sweep that would take hours on 2 CPU cores fits
in minutes; the table says which device produced it (bf16 on CUDA, other random streams than the CPU: the
trends carry over, the exact numbers do not).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from luna.training import LunaTrainingApp

# name -> extra luna-train options; every variant starts from the CLI defaults (the book's SGD, lr 0.001,
# momentum 0.99, batch 32, balanced 1:1, Chapter 12 augmentation) plus BASE
BASE = ["--epochs", "10", "--samples-per-epoch", "4000"]
VARIANTS: dict[str, list[str]] = {
    "book": [],
    "warmup200": ["--lr-warmup-steps", "200"],
    "clip1": ["--clip-grad-norm", "1"],
    "clip5": ["--clip-grad-norm", "5"],
    "warmup200+clip5": ["--lr-warmup-steps", "200", "--clip-grad-norm", "5"],
    "warmup200+clip5+bal3": ["--lr-warmup-steps", "200", "--clip-grad-norm", "5", "--balanced", "3"],
    "warmup200+clip5+bal2": ["--lr-warmup-steps", "200", "--clip-grad-norm", "5", "--balanced", "2"],
    "warmup200+clip5+noaug": ["--lr-warmup-steps", "200", "--clip-grad-norm", "5", "--no-augment"],
    "warmup200+bal3": ["--lr-warmup-steps", "200", "--balanced", "3"],
    "bal3": ["--balanced", "3"],
    "noaug": ["--no-augment"],
    "book-x5": ["--epochs", "50"],
    "warmup200+clip5-x5": ["--lr-warmup-steps", "200", "--clip-grad-norm", "5", "--epochs", "50"],
    "adam+warmup200+clip5+bal3": ["--optimizer", "adam", "--lr-warmup-steps", "200", "--clip-grad-norm", "5",
                                  "--balanced", "3"],
    "adam+ema99+warmup200+clip5+bal3": ["--optimizer", "adam", "--ema-decay", "0.99", "--lr-warmup-steps", "200",
                                        "--clip-grad-norm", "5", "--balanced", "3"],
    # config/config.yaml's train settings (append `-- --epochs 8` for the default run's length)
    "config": ["--optimizer", "adam", "--ema-decay", "0.99", "--lr-warmup-steps", "200", "--clip-grad-norm", "5",
               "--balanced", "3", "--balanced-schedule", "6:8"],
}
GOAL = {"recall": 0.8, "precision": 0.3}


def build_default_data(work: Path, jobs: int, synth_args: list[str]) -> tuple[list[str], str]:
    """The default synthetic data set -> crops/*.h5 and splits.tsv under ``work`` (reused when present)."""
    from luna.candidates import CandidatesApp, SplitApp
    from luna.crops import CropApp
    from luna.synth import SynthApp

    root, results = work / "data", work / "results"
    splits = results / "splits.tsv"
    if not splits.exists():
        if SynthApp(["--out", str(root), "--jobs", str(jobs), *synth_args]).main() != 0:
            raise SystemExit("synthesis failed")
        results.mkdir(parents=True, exist_ok=True)
        assert CandidatesApp(["--root", str(root), "--out", str(results / "candidates.tsv")]).main() == 0
        subsets = sorted(p.name for p in root.glob("subset*") if p.is_dir())
        for subset in subsets:
            assert CropApp(["--candidates", str(results / "candidates.tsv"), "--root", str(root), "--subset", subset,
                            "--out", str(results / "crops" / f"{subset}.h5"), "--threads", str(jobs),
                            "--compression", "none"]).main() == 0
        assert SplitApp(["--root", str(root), "--val-stride", "5", "--out", str(splits)]).main() == 0
    return sorted(str(p) for p in (results / "crops").glob("*.h5")), str(splits)


def summarise(history: pd.DataFrame) -> dict[str, float | int | bool]:
    """Best val row by F1 (NaN F1 counts lowest; ties: the earlier epoch, as model.pt), max AUC, goal."""
    val = history[history["split"] == "val"].reset_index(drop=True)
    best = val.iloc[int(val["f1"].fillna(-1.0).to_numpy().argmax())]
    goal = ((val["recall"] >= GOAL["recall"]) & (val["precision"] >= GOAL["precision"])).any()
    return {"best_epoch": int(best["epoch"]), "precision": float(best["precision"]), "recall": float(best["recall"]),
            "f1": float(best["f1"]), "auc": float(best["auc"]), "max_auc": float(val["auc"].max()),
            "epochs": int(val["epoch"].max()), "goal": bool(goal)}


def write_table(path: Path, rows: list[dict], header: str) -> None:
    lines = [header, "", "| variant | seed | epochs | best epoch | precision | recall | F1 | AUC | max AUC | goal | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['epochs']} | {r['best_epoch']} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['f1']:.3f} | {r['auc']:.3f} | {r['max_auc']:.3f} | "
                     f"{'yes' if r['goal'] else 'no'} | {r['seconds']:.0f} |")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (data, runs)")
    p.add_argument("--data", default=None, help="folder with crops/*.h5 and splits.tsv; default: build the "
                                                "synthetic default under --work")
    p.add_argument("--variants", nargs="+", default=["book"], choices=sorted(VARIANTS), help="variants to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds, each variant runs once per seed")
    p.add_argument("--out", required=True, help="markdown table, rewritten after every run")
    p.add_argument("--synth-args", default="", help="options for luna-synth when building the data (testing: "
                                                      "'--n-subsets 1 --scans-per-subset 4')")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for synthesis and crops")
    p.add_argument("extra", nargs="*", help="after --: options appended to every luna-train call")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data)
        crops, splits = sorted(str(q) for q in (data / "crops").glob("*.h5")), str(data / "splits.tsv")
    else:
        t0 = time.perf_counter()
        crops, splits = build_default_data(work, args.jobs, shlex.split(args.synth_args))
        print(f"data ready in {time.perf_counter() - t0:.0f} s: {len(crops)} stores", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    header = (f"# Training-quality sweep (benchmarks/quality_sweep.py)\n\nDevice: {device} ({name}), torch "
              f"{torch.__version__}. Every run: luna-train defaults + `{' '.join(BASE)}` + the variant's options"
              + (f" + `{' '.join(args.extra)}`" if args.extra else "") + ". Best = the val row with the highest F1 (what model.pt keeps); goal = some val "
              f"row with recall >= {GOAL['recall']} and precision >= {GOAL['precision']}.")
    rows: list[dict] = []
    for variant in args.variants:
        for seed in args.seeds:
            out = work / "runs" / f"{variant}-s{seed}"
            argv_train = ["--crops", *crops, "--splits", splits, "--out", str(out), "--state", str(out) + ".state",
                          "--tb-dir", "none", "--seed", str(seed), "--num-workers", "4" if device == "cuda" else "0",
                          *BASE, *VARIANTS[variant], *args.extra]
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                rc = LunaTrainingApp(argv_train).main()
            if rc != 0:
                print(f"{variant} seed {seed}: luna-train failed (rc {rc})", flush=True)
                continue
            row = {"variant": variant, "seed": seed, "seconds": time.perf_counter() - t0,
                   **summarise(pd.read_csv(out / "history.tsv", sep="\t"))}
            rows.append(row)
            print(f"{variant:<28s} seed {seed}: best E{row['best_epoch']} P {row['precision']:.3f} "
                  f"R {row['recall']:.3f} AUC {row['auc']:.3f} (max {row['max_auc']:.3f}) goal {row['goal']} "
                  f"{row['seconds']:.0f} s", flush=True)
            write_table(Path(args.out), rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
