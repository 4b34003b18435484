"""Rule predict: a fold's model.pt -> results/folds/{fold}/predictions.tsv (thin: maps to luna.validation.PredictApp)."""

import os

# before torch loads: OpenMP threads spin between parallel regions instead of sleeping. On 2 cores a
# sleeping thread waits milliseconds for its core whenever anything else runs (45 vs 1.4 samples/s next to
# a busy process, ~+3% on a quiet box: benchmarks/results/train_notes.md). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

from luna.runner import run_rule  # noqa: E402 - after the environment is set
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
]
run_rule(PredictApp, argv, sm.log[0])
