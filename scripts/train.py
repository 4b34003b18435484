"""Rule train: crops + splits -> results/folds/{fold}/ (thin: maps the rule to luna.training.LunaTrainingApp;
train.gpus > 1 runs it as that many processes under torchrun)."""

import json
from pathlib import Path

from luna.runner import config_argv, granted_gpus_argv, run_rule, run_rule_torchrun, spin_openmp_threads

spin_openmp_threads()  # before luna.training loads torch
from luna.training import LunaTrainingApp  # noqa: E402

sm = snakemake  # noqa: F821 - injected by Snakemake
state = Path(sm.params.state)
state.mkdir(parents=True, exist_ok=True)
config_json = state / "config.json"  # the run's full config, recorded in model.pt's provenance
config_json.write_text(json.dumps(sm.config, indent=1, sort_keys=True))
train = dict(sm.params.train)
gpus = int(train.pop("gpus"))
device = granted_gpus_argv(gpus, sm.resources, sm.log[0])  # Snakemake cuts gpu to --resources; gpu=0: on the CPU
speed = {k: sm.config["train"][k] for k in sm.params.speed_keys}  # read here, so a change reruns nothing

argv = [
    "--crops", *sm.input.crops,
    "--splits", sm.input.splits,
    "--test-fold", sm.wildcards.fold,
    "--selection-fraction", sm.params.selection_fraction,
    "--out", str(Path(sm.output.model).parent),
    "--state", state,
    "--resume",
    "--tb-dir", sm.params.tb_dir,
    "--config", config_json,
    "--threads", max(1, sm.threads // gpus),
    *config_argv(train),
    *config_argv(speed),
    *device,
]
if sm.params.annotations_excluded:
    argv += ["--annotations-excluded", sm.params.annotations_excluded]
if gpus > 1:
    run_rule_torchrun("luna.training", argv, sm.log[0], gpus)
else:
    run_rule(LunaTrainingApp, argv, sm.log[0])
