"""Rule train: crops + splits -> results/model/ (thin: maps the rule to luna.training.LunaTrainingApp)."""

import json
from pathlib import Path

from luna.runner import run_rule
from luna.training import LunaTrainingApp

sm = snakemake  # noqa: F821 - injected by Snakemake
t = sm.params.train
a = t["augment"]
state = Path(sm.params.state)
state.mkdir(parents=True, exist_ok=True)
config_json = state / "config.json"  # the run's full config, recorded in model.pt's provenance
config_json.write_text(json.dumps(sm.config, indent=1, sort_keys=True))
speed = sm.config["train"]  # speed-only keys: read here, not rule params, so changing them reruns nothing


def flag(name: str, on: bool) -> str:
    return f"--{name}" if on else f"--no-{name}"


run_rule(
    LunaTrainingApp,
    [
        "--crops", *sm.input.crops,
        "--splits", sm.input.splits,
        "--out", str(Path(sm.output.model).parent),
        "--state", state,
        "--resume",
        "--tb-dir", sm.params.tb_dir,
        "--config", config_json,
        "--epochs", t["epochs"],
        "--samples-per-epoch", t["samples_per_epoch"],
        "--batch-size", t["batch_size"],
        "--optimizer", t["optimizer"],
        "--lr", t["lr"],
        "--momentum", t["momentum"],
        "--lr-warmup-steps", t["lr_warmup_steps"],
        "--clip-grad-norm", t["clip_grad_norm"],
        "--ema-decay", t["ema_decay"],
        "--balanced", t["balanced"],
        "--balanced-schedule", *(f"{epoch}:{ratio}" for epoch, ratio in t["balanced_schedule"]),
        "--val-samples", t["val_samples"],
        "--seed", t["seed"],
        flag("augment", a["enabled"]),
        flag("augment-flip", a["flip"]),
        "--augment-offset", a["offset"],
        "--augment-scale", a["scale"],
        flag("augment-rotate", a["rotate"]),
        "--augment-noise", a["noise"],
        "--amp", t["amp"],
        flag("channels-last", t["channels_last"]),
        "--num-workers", speed["num_workers"],
        "--threads", sm.threads,
    ],
    sm.log[0],
)
