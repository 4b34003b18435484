"""Rule split: scans on disk -> results/splits.tsv (thin: maps the rule to luna.splits.SplitApp)."""

from luna.runner import run_rule
from luna.splits import SplitApp

p = snakemake.params  # noqa: F821 - injected by Snakemake
argv = ["--root", p.root, "--subsets", *p.subsets, "--folds", p.folds, "--out", snakemake.output[0]]  # noqa: F821
run_rule(SplitApp, argv, snakemake.log[0])  # noqa: F821
