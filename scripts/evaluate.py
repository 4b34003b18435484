"""Rule evaluate: every fold run -> results/validation/ (thin: maps the rule to luna.evaluation.EvaluateApp)."""

from luna.evaluation import EvaluateApp
from luna.runner import config_argv, run_rule

sm = snakemake  # noqa: F821 - injected by Snakemake
p = sm.params
argv = ["--folds", *p.folds, "--splits", sm.input.splits, "--out", p.out_dir, *config_argv(p.evaluate)]
if p.annotations:
    argv += ["--annotations", p.annotations]
if p.annotations_excluded:
    argv += ["--annotations-excluded", p.annotations_excluded]
run_rule(EvaluateApp, argv, sm.log[0])
