"""Rule split: scans on disk -> results/splits.tsv (thin: maps the rule to luna.candidates.SplitApp)."""

from luna.candidates import SplitApp
from luna.runner import run_rule

p = snakemake.params  # noqa: F821 - injected by Snakemake
argv = ["--root", p.root, "--subsets", *p.subsets, "--val-stride", p.val_stride, "--out", snakemake.output[0]]  # noqa: F821
if p.val_subsets:
    argv += ["--val-subsets", *p.val_subsets]
run_rule(SplitApp, argv, snakemake.log[0])  # noqa: F821
