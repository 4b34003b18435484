"""Operating-threshold policies compared on development runs: which rule, applied to the selection set, puts
the threshold where the held-out scans reach the goal (candidate recall >= 0.8 at precision >= 0.3).

Each run folder is one quality_sweep.py run (``<run>/0/``): the policy picks a threshold from its
selection_predictions.tsv (what luna-train does, :func:`luna.metrics.choose_threshold`), and the threshold is
applied, unchanged, to the development test fold (predictions.tsv) and, where present, to every scan of the
dev-test data set (a predictions file such as devtest_flip2.tsv), which is also cut into blocks of a test
fold's size to count how often a 30-scan fold would meet the goal. Nothing here reads the default run's data.

    python benchmarks/threshold_policies.py --runs /tmp/sweep/runs/bs16-s0 /tmp/sweep/runs/bs16-s1 \\
        --devtest devtest_flip2.tsv --out benchmarks/results/threshold_policies.md

The dev-test predictions of a run, made with the TTA of its selection pass (quality_sweep.py --devtest-seed 8
builds the dev-test data under ``<work>/data-8``):

    luna-predict --model RUN/0/model.pt --crops <work>/data-8/results/crops/*.h5 --scans all --tta flip2 \\
        --out RUN/0/devtest_flip2.tsv

threshold_policies.md was written with ``--policies recall:0.85 recall:0.875 recall:0.9 fp_per_scan:1.5
fp_per_scan:2 fp_per_scan:2.5 fp_per_scan:3`` (the default list has grown since).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from luna.app import DefaultsHelpFormatter
from luna.metrics import choose_threshold
from quality_sweep import GOAL  # the operating-point goal, one definition for every benchmark

POLICIES = ("recall:0.85", "recall:0.875", "recall:0.9", "fp_per_scan:1", "fp_per_scan:1.5", "fp_per_scan:2",
            "fp_per_scan:2.5", "fp_per_scan:3", "max_f1")


def recall_precision(frame: pd.DataFrame, threshold: float) -> tuple[float, float]:
    """Candidate-level recall and precision of ``p > threshold`` (precision 0 when nothing is called)."""
    called = frame["probability"].to_numpy() > threshold
    positive = frame["is_nodule"].to_numpy() > 0.5
    true_pos = int((called & positive).sum())
    return true_pos / max(int(positive.sum()), 1), true_pos / max(int(called.sum()), 1)


def meets(frame: pd.DataFrame, threshold: float) -> bool:
    recall, precision = recall_precision(frame, threshold)
    return recall >= GOAL["recall"] and precision >= GOAL["precision"]


def policy_rows(run: Path, devtest_name: str | None, policies: list[str], block_scans: int) -> list[dict]:
    """One row per policy for one run folder."""
    fold = run / "0"
    selection = pd.read_csv(fold / "selection_predictions.tsv", sep="\t")
    test = pd.read_csv(fold / "predictions.tsv", sep="\t")
    devtest = None
    if devtest_name:
        if not (fold / devtest_name).is_file():  # a table without those columns would look complete
            raise SystemExit(f"{fold / devtest_name}: no such dev-test predictions file (write it with luna-predict "
                             "--scans all, see this script's docstring)")
        devtest = pd.read_csv(fold / devtest_name, sep="\t")
    blocks: list[pd.DataFrame] = []
    if devtest is not None:
        uids = sorted(devtest["series_uid"].unique())
        n_blocks = max(len(uids) // block_scans, 1)
        blocks = [devtest[devtest["series_uid"].isin(uids[i::n_blocks])] for i in range(n_blocks)]
    rows = []
    for policy in policies:
        threshold = choose_threshold(selection["is_nodule"].to_numpy(), selection["probability"].to_numpy(),
                                     policy, n_scans=selection["series_uid"].nunique())
        recall, precision = recall_precision(test, threshold)
        row = {"run": run.name, "policy": policy, "threshold": threshold, "fold recall": recall,
               "fold precision": precision, "fold goal": "yes" if meets(test, threshold) else "no"}
        if devtest is not None:
            recall, precision = recall_precision(devtest, threshold)
            met = sum(meets(block, threshold) for block in blocks)
            row.update({"dev-test recall": recall, "dev-test precision": precision,
                        "30-scan blocks meeting the goal": f"{met} of {len(blocks)}"})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="quality_sweep.py run folders (<run>/0/)")
    p.add_argument("--devtest", default=None,
                   help="file name, inside each run's 0/, of its predictions on the dev-test scans (optional)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), help="threshold policies (luna-train --threshold)")
    p.add_argument("--block-scans", type=int, default=30, help="scans per dev-test block (a test fold's size)")
    p.add_argument("--out", type=Path, required=True, help="markdown table to write")
    args = p.parse_args(argv)
    out = args.out.resolve()
    if out.suffix != ".md" or any(run.resolve() in out.parents for run in args.runs):
        p.error(f"--out {args.out}: a markdown file (.md) outside the --runs folders, whose files it reads")
    rows = [row for run in args.runs for row in policy_rows(run, args.devtest, args.policies, args.block_scans)]
    frame = pd.DataFrame(rows)
    lines = ["# Operating-threshold policies on development runs (benchmarks/threshold_policies.py)", "",
             f"Runs: {', '.join(str(r) for r in args.runs)}; dev-test predictions: {args.devtest or 'none'}. "
             f"Goal: candidate recall >= {GOAL['recall']} at precision >= {GOAL['precision']} on held-out scans, at "
             "the threshold the policy picks on the selection set.", ""]
    columns = list(frame.columns)
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" if c in ("run", "policy") else "---:" for c in columns) + "|")
    for _, row in frame.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
