"""Weight averages of one training run, compared on held-out development scans: which average of the weights
(the shipped EMA, a plain running mean capped at a decay, a uniform tail average, none) to validate and keep.

Every average is computed from the *same* optimizer trajectory (one luna-train run of config/config.yaml's
recipe on the development data), so the differences between rows are not run-to-run luck: the comparison is
paired. The extra averages are updated next to luna-train's own EMA after every optimizer step (this script
wraps ``luna.training.ema_update``; the training itself is untouched and identical to a plain run). Each is
then scored like quality_sweep.py scores a run: CPM on the development test fold and on every scan of the
dev-test data set (another seed), without test-time augmentation.

    python benchmarks/weight_average.py --work /tmp/sweep --seeds 0 1 --out benchmarks/results/weight_average.md

Averages (t = optimizer step, 0-based): ``none`` the trained weights; ``ema-tf`` luna-train's own average,
decay min(ema_decay, (1+t)/(10+t)); ``ema-D`` the same average with another decay D (min(D, (1+t)/(10+t)));
``mean-D`` decay min(D, t/(t+1)): the plain mean of all weights so far
until the decay D takes over (at t = D/(1-D)); ``tail-E`` the uniform mean of the last E epochs' weights.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import luna.training as training_module
from luna.app import DefaultsHelpFormatter
from luna.recipe import ema_decay_at
from quality_sweep import (CONFIG, add_seed_options, build_data, check_seeds, predict_froc, run_variant,
                           score_devtest)

AVERAGES = ("none", "ema-tf", "mean-0.99", "mean-0.995", "mean-0.998", "tail-2")


def decay_of(name: str, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The decay of average ``name`` at optimizer step ``step`` (``none``: 0, the shadow is the trained weights)."""
    if name == "none":
        return 0.0
    if name.startswith("ema-"):  # luna.recipe.ema_decay_at's warm-up, another decay
        return ema_decay_at(float(name.split("-")[1]), step)
    if name.startswith("mean-"):
        return min(float(name.split("-")[1]), step / (step + 1.0))
    if name.startswith("tail-"):
        start = (epochs - int(name.split("-")[1])) * steps_per_epoch
        return 0.0 if step <= start else (step - start) / (step - start + 1.0)
    raise ValueError(name)


class Shadows:
    """Extra weight averages next to luna-train's EMA, updated by a wrapper of ``luna.training.ema_update``."""

    def __init__(self, names: list[str], steps_per_epoch: int, epochs: int) -> None:
        self.names, self.steps_per_epoch, self.epochs = names, steps_per_epoch, epochs
        self.models: dict[str, torch.nn.Module] = {}
        self.step = -1
        self._update = training_module.ema_update

    def __call__(self, ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
        self._update(ema, model, decay)  # luna-train's own average, unchanged
        self.step += 1
        for name in self.names:
            if name not in self.models:
                self.models[name] = copy.deepcopy(model).requires_grad_(False)
            self._update(self.models[name], model, decay_of(name, self.step, self.steps_per_epoch, self.epochs))


def score_fold(model: Path, data: tuple, test_fold: int, out: Path) -> dict:
    """CPM and AUC of ``model`` on the development test fold, no TTA."""
    from luna.metrics import auc_score

    result, predictions, *_ = predict_froc(model, data, out, test_fold)
    return {"cpm": result.cpm, "auc": auc_score(predictions["is_nodule"].to_numpy(),
                                                predictions["probability"].to_numpy())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (data as quality_sweep.py builds it, runs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds, one run each")
    add_seed_options(p)
    p.add_argument("--averages", nargs="+", default=list(AVERAGES), help="averages to compare (see above)")
    p.add_argument("--out", required=True, help="markdown table, rewritten after every run")
    args = p.parse_args(argv)
    check_seeds(args)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    data = build_data(work, args.dev_seed, os.cpu_count() or 1, CONFIG["synthetic"])
    devtest = build_data(work, args.devtest_seed, os.cpu_count() or 1, CONFIG["synthetic"])
    train = CONFIG["train"]
    steps_per_epoch = -(-train["samples_per_epoch"] // train["batch_size"])  # the last batch may be short
    extra = [a for a in args.averages if a != "ema-tf"]
    rows: list[dict] = []
    for seed in args.seeds:
        out = work / "runs" / f"average-s{seed}"
        shadows = Shadows(extra, steps_per_epoch, train["epochs"])
        training_module.ema_update = shadows
        try:
            t0 = time.perf_counter()
            run_variant("config", {}, seed, 0, data, out, [])
        finally:
            training_module.ema_update = shadows._update
        print(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s, {shadows.step + 1} steps", flush=True)
        kept = torch.load(out / "0" / "model.pt", map_location="cpu", weights_only=False)
        for name in args.averages:
            path = out / "0" / ("model.pt" if name == "ema-tf" else f"model-{name}.pt")
            if name != "ema-tf":
                torch.save({**kept, "model_state": shadows.models[name].state_dict()}, path)
            row = {"seed": seed, "average": name, **score_fold(path, data, 0, out / f"fold0-{name}.tsv"),
                   **score_devtest(path, devtest, out / f"devtest-{name}.tsv")}
            rows.append(row)
            print(f"  {name:<11s} fold 0 CPM {row['cpm']:.3f} AUC {row['auc']:.3f}; dev-test CPM {row['dt_cpm']:.3f} "
                  f"({row['dt_low']:.3f}-{row['dt_high']:.3f}) AUC {row['dt_auc']:.3f}", flush=True)
        write_table(Path(args.out), rows, args)
    return 0


def write_table(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    lines = ["# Weight averages of one training trajectory (benchmarks/weight_average.py)", "",
             f"Development data seed {args.dev_seed} (test fold 0), dev-test seed {args.devtest_seed} (every scan), "
             f"config/config.yaml's recipe, no TTA; CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"torch {torch.__version__}.", "",
             "| seed | average | fold 0 CPM | fold 0 AUC | dev-test CPM (95% CI) | dev-test AUC |",
             "|---:|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['average']} | {r['cpm']:.3f} | {r['auc']:.3f} | {r['dt_cpm']:.3f} "
                     f"({r['dt_low']:.3f}-{r['dt_high']:.3f}) | {r['dt_auc']:.3f} |")
    table = pd.DataFrame(rows)
    if table["seed"].nunique() > 1:
        mean = table.groupby("average", sort=False)[["cpm", "dt_cpm"]].mean()
        lines += ["", "| average | mean fold 0 CPM | mean dev-test CPM |", "|---|---:|---:|"]
        lines += [f"| {name} | {r.cpm:.3f} | {r.dt_cpm:.3f} |" for name, r in mean.iterrows()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
