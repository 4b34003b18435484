"""Config validation and helpers shared by the rules: data locations, subsets, folds, state folders."""

import hashlib
import json
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from luna.luna16 import resolve_table


def check_config(cfg, schema_path):
    """Validate the config against the schema, failing with one line per problem that names the key."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(cfg),
        key=lambda e: list(e.path),
    )
    if errors:
        lines = [
            f"config key {'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message}"
            for e in errors
        ]
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(lines))


check_config(
    config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
)
validate(config, "../schemas/config.schema.yaml")  # fills in the defaults


def sorted_tree(value):
    """Dicts with sorted keys, recursively: a rule's params then do not change with the key order of a YAML file."""
    if isinstance(value, dict):
        return {k: sorted_tree(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_tree(v) for v in value]
    return value


config.update(sorted_tree(config))

DATASET = config["dataset"]
DATA_ROOT = DATASET["root"]
SYNTHETIC = DATASET["source"] == "synthetic"
RESULTS = "results"
CROPS_DIR = f"{RESULTS}/crops"
FOLDS_DIR = f"{RESULTS}/folds"
VALIDATION_DIR = f"{RESULTS}/validation"


def table_path(name):
    """A dataset table path: relative to the data root unless absolute; None stays None (luna's own rule)."""
    path = resolve_table(DATA_ROOT, name)
    return None if path is None else str(path)


def selected_subsets():
    """Subsets the run uses: the configured ones, else all the synthetic set makes, else every subset* on disk."""
    if DATASET["subsets"]:
        return list(DATASET["subsets"])
    if SYNTHETIC:
        return [f"subset{k}" for k in range(config["synthetic"]["n_subsets"])]
    found = sorted(p.name for p in Path(DATA_ROOT).glob("subset*") if p.is_dir())
    if not found:
        raise WorkflowError(f"dataset.root: no subset* folders under {DATA_ROOT}")
    return found


def check_dataset():
    """Fail the dry-run early, naming the key and the path, when a LUNA16 download is not where config says."""
    if SYNTHETIC:
        return
    if not Path(DATA_ROOT).is_dir():
        raise WorkflowError(f"dataset.root: data folder {DATA_ROOT} not found")
    for key in ("candidates", "annotations", "annotations_excluded"):
        path = table_path(DATASET[key])
        if path is not None and not Path(path).is_file():
            raise WorkflowError(f"dataset.{key}: file {path} not found")
    for subset in DATASET["subsets"]:
        if not (Path(DATA_ROOT) / subset).is_dir():
            raise WorkflowError(
                f"dataset.subsets: folder {Path(DATA_ROOT) / subset} not found"
            )


def check_values():
    """Checks the schema cannot express, at the dry run, naming the key and the value."""
    low, high = config["crops"]["hu_window"]
    if not low < high:
        raise WorkflowError(
            f"crops.hu_window: [{low}, {high}] must be [low, high] with low < high"
        )


check_dataset()
check_values()
SUBSETS = selected_subsets()


def all_folds():
    """Every fold of the split: the subsets' numbers (split.folds: subsets) or 0 .. k-1."""
    folds = config["split"]["folds"]
    if folds == "subsets":
        numbers = []
        for subset in SUBSETS:
            digits = re.search(r"(\d+)$", subset)
            if digits is None:
                raise WorkflowError(
                    f"split.folds: subsets needs subset folders ending in a number, got {subset!r}"
                )
            numbers.append(int(digits.group(1)))
        return sorted(set(numbers))
    return list(range(int(folds)))


def run_folds():
    """The test folds to run (split.run_folds: all, or a list checked against the folds there are)."""
    chosen = config["split"]["run_folds"]
    folds = all_folds()
    if chosen == "all":
        return folds
    unknown = [f for f in chosen if f not in folds]
    if unknown:
        raise WorkflowError(
            f"split.run_folds: fold(s) {', '.join(map(str, unknown))} do not exist; the split has folds "
            f"{', '.join(map(str, folds))} (split.folds: {config['split']['folds']})"
        )
    return sorted(set(chosen))


RUN_FOLDS = run_folds()


def dataset_inputs():
    """What the table rules read: the synthesize rule's folder, or the user's CSVs."""
    if SYNTHETIC:
        return {"root": DATA_ROOT}
    inputs = {"candidates": table_path(DATASET["candidates"])}
    if DATASET["annotations"]:
        inputs["annotations"] = table_path(DATASET["annotations"])
    return inputs


def subset_inputs(wildcards):
    """A crop job reads its subset's folder (under the synthetic root when that is generated)."""
    if SYNTHETIC:
        return {"root": DATA_ROOT}
    return {"subset_dir": str(Path(DATA_ROOT) / wildcards.subset)}


# keys that change only the speed, never the result: left out of the rules' params and state key, so changing
# them reruns nothing (the rule scripts read them from the config)
SPEED_KEYS = {
    "train": ("num_workers", "data_on_device", "device_memory_fraction"),
    "validate": ("batch_size",),
}


def settings(section):
    """config[section] without its speed-only keys: what shapes the stage's result."""
    return {
        k: v for k, v in config[section].items() if k not in SPEED_KEYS.get(section, ())
    }


def fold_settings():
    """What shapes one fold's model besides train.*: the split without run_folds (adding a fold to run_folds
    must not retrain a finished fold)."""
    return {k: v for k, v in config["split"].items() if k != "run_folds"}


def state_dir(stage, **shaping):
    """A resumable-state folder outside the declared outputs, keyed by the config sections that shape
    the stage, so a changed hyper-parameter never resumes from another run's state."""
    key = json.dumps(shaping, sort_keys=True)
    return f"{RESULTS}/.state/{stage}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


VALIDATION_OUTPUTS = [
    f"{VALIDATION_DIR}/predictions.tsv",
    f"{VALIDATION_DIR}/metrics.tsv",
    f"{VALIDATION_DIR}/submission.csv",
] + ([f"{VALIDATION_DIR}/froc.tsv"] if DATASET["annotations"] else [])


def fold_files(name):
    """One file of every fold run, e.g. fold_files("model.pt")."""
    return expand(f"{FOLDS_DIR}/{{fold}}/{name}", fold=RUN_FOLDS)


def print_summary():
    """Where to look after a successful run."""
    metrics = Path(f"{VALIDATION_DIR}/metrics.tsv")
    if metrics.exists():
        print(f"luna: metrics in {metrics}, plots in {VALIDATION_DIR}/")
        print("luna: build the report with: snakemake --report report.html")


def validation_tables():
    """The annotation tables FROC/CPM reads (the synthetic folder provides them once generated)."""
    tables = {}
    for key in ("annotations", "annotations_excluded"):
        path = table_path(DATASET[key])
        if path is not None:
            tables[key] = DATA_ROOT if SYNTHETIC else path
    return tables
