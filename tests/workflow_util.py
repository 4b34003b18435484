"""Helpers to run the real Snakemake workflow in a temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A tiny synthetic configuration: 3 subsets (= 3 folds) x 3 small scans, 2 short epochs, test folds 0 and 1.
# Minutes -> seconds. With seed 5 and selection 0.34 every fold's selection set holds a nodule.
TINY_CONFIG = {
    "dataset": {"source": "synthetic", "root": "data/synthetic", "annotations_excluded": "annotations_excluded.csv"},
    "synthetic": {
        "n_subsets": 3, "scans_per_subset": 3, "seed": 5, "negatives_per_positive": 6, "nodules_per_scan": 2.0,
        "size_xy_min": 96, "size_xy_max": 112, "spacing_xy_min_mm": 0.7, "spacing_xy_max_mm": 0.9,
        "extent_z_mm_min": 60.0, "extent_z_mm_max": 80.0,
    },
    "split": {"folds": "subsets", "run_folds": [0, 1], "selection_fraction": 0.34},
    # merged over config/config.yaml (the shipped recipe), with a selection pass after every epoch; 2.0 as YAML
    # writers spell numbers: the workflow passes it on as the integer luna-train takes (also inside
    # balanced_schedule's pairs: from epoch 2 the shipped 1:1 again, so the recipe is unchanged); skip_excluded
    # on, so that the rule passes the synthetic annotations_excluded.csv to luna-train
    "train": {"epochs": 2.0, "samples_per_epoch": 64, "batch_size": 16, "selection_interval": 1,
              "balanced_schedule": [[2.0, 1]], "skip_excluded": True},
    "validate": {"batch_size": 32, "bootstrap": 50},
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, targets: tuple[str, ...] = (), configfile: Path | None = None,
              check: bool = True, timeout: float = 900, resources_gpu: int = 1) -> subprocess.CompletedProcess:
    """Run the repo's workflow in workdir; targets go before --configfile (it takes several values)."""
    cmd = [str(BIN / "snakemake"), *targets, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--resources", f"gpu={resources_gpu}", *args]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
