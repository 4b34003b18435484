"""Rule validate: model + crops + splits -> results/validation/ (thin: maps to luna.validation.ValidationApp)."""

from luna.runner import run_rule
from luna.validation import ValidationApp

sm = snakemake  # noqa: F821 - injected by Snakemake
v = sm.params.validate
argv = [
    "--model", sm.input.model,
    "--crops", *sm.input.crops,
    "--splits", sm.input.splits,
    "--history", sm.input.history,
    "--out", sm.params.out_dir,
    "--batch-size", v["batch_size"],
    "--amp", v["amp"],
    "--bootstrap", v["bootstrap"],
    "--seed", v["seed"],
    "--max-per-scan", v["max_per_scan"],
    "--threads", sm.threads,
]
if sm.params.annotations:
    argv += ["--annotations", sm.params.annotations]
if sm.params.annotations_excluded:
    argv += ["--annotations-excluded", sm.params.annotations_excluded]
run_rule(ValidationApp, argv, sm.log[0])
