"""Rule train: crops + splits -> results/folds/{fold}/ (thin: maps the rule to luna.training.LunaTrainingApp)."""

import json
from pathlib import Path

from luna.runner import config_argv, run_rule
from luna.training import LunaTrainingApp

sm = snakemake  # noqa: F821 - injected by Snakemake
state = Path(sm.params.state)
state.mkdir(parents=True, exist_ok=True)
config_json = state / "config.json"  # the run's full config, recorded in model.pt's provenance
config_json.write_text(json.dumps(sm.config, indent=1, sort_keys=True))
speed = {"num_workers": sm.config["train"]["num_workers"]}  # speed only: read here, so a change reruns nothing

run_rule(
    LunaTrainingApp,
    [
        "--crops", *sm.input.crops,
        "--splits", sm.input.splits,
        "--test-fold", sm.wildcards.fold,
        "--selection-fraction", sm.params.selection_fraction,
        "--out", str(Path(sm.output.model).parent),
        "--state", state,
        "--resume",
        "--tb-dir", sm.params.tb_dir,
        "--config", config_json,
        "--threads", sm.threads,
        *config_argv(sm.params.train),
        *config_argv(speed),
    ],
    sm.log[0],
)
