"""Rule predict: a fold's model.pt -> results/folds/{fold}/predictions.tsv (thin: maps to luna.validation.PredictApp)."""

from luna.runner import granted_gpus_argv, run_rule, spin_openmp_threads

spin_openmp_threads()  # before luna.validation loads torch
from luna.validation import PredictApp  # noqa: E402

sm = snakemake  # noqa: F821 - injected by Snakemake
argv = [
    "--model", sm.input.model,
    "--crops", *sm.input.crops,
    "--splits", sm.input.splits,
    "--scans", "test",
    "--out", sm.output[0],
    "--batch-size", sm.config["validate"]["batch_size"],  # speed only: read here, so a change reruns nothing
    "--threads", sm.threads,
    *granted_gpus_argv(1, sm.resources, sm.log[0]),  # granted gpu=0: on the CPU
]
run_rule(PredictApp, argv, sm.log[0])
