"""Config validation and helpers shared by the rules: data locations, subsets, folds, state folders."""

import collections
import csv
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from luna.luna16 import resolve_table


def check_config(cfg, schema):
    """Validate the config against the schema, failing with one line per problem that names the key."""
    import jsonschema

    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(cfg),
        key=lambda e: list(e.path),
    )
    # a key's oneOf error says what it takes: its type error beside it would be a second line for one mistake
    forms = {tuple(e.path) for e in errors if e.validator in ("oneOf", "anyOf")}
    lines = [
        config_error_line(e)
        for e in errors
        if not (e.validator == "type" and tuple(e.path) in forms)
    ]
    lines += [
        f"config key {key}: {value} is not a finite number"
        for key, value in non_finite_values(cfg)
    ]
    if lines:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(lines))


def non_finite_values(value, path=()):
    """(key, value) of every NaN or infinite number: YAML's .nan and .inf pass the schema's bounds, and failed
    only in the job that got them (train.lr: .nan after the synthesis and every crop).
    """
    if isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite_values(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from non_finite_values(item, (*path, index))
    elif isinstance(value, float) and not math.isfinite(value):
        yield ".".join(map(str, path)), value


def config_error_line(error):
    """One schema error as a line naming the key; a oneOf/anyOf also says which values it takes."""
    key = ".".join(str(p) for p in error.path) or "(top level)"
    wants_number = error.validator == "type" and {"number", "integer"} & set(
        [error.validator_value]
        if isinstance(error.validator_value, str)
        else error.validator_value
    )
    if (error.validator == "pattern" or wants_number) and isinstance(
        error.instance, str
    ):
        try:
            number = float(error.instance)
        except ValueError:
            if wants_number:
                return f"config key {key}: {error.message}"
            return f"config key {key}: {error.message} (config/README.md lists the forms the key takes)"
        if not math.isfinite(number):
            return f"config key {key}: {error.instance!r} is not a finite number"
        return (
            f"config key {key}: {error.instance!r} is a quoted number; write it without quotes "
            "(config/README.md lists the forms the key takes)"
        )
    expected = ""
    if error.validator in ("oneOf", "anyOf"):
        expected = (
            f"; expected {' or '.join(map(describe_form, error.validator_value))}"
        )
    return f"config key {key}: {error.message}{expected}"


def describe_form(form):
    """One alternative of a oneOf/anyOf in words ("'subsets'", "an integer >= 2", "a list of integers >= 0"),
    so that "is not valid under any of the given schemas" says what is."""
    if "enum" in form:
        return " or ".join(repr(v) for v in form["enum"])
    kind = form.get("type", "value")
    if kind == "array":
        parts = ["a list"]
        if form.get("items"):
            item = describe_form(form["items"])
            plural = {
                "an integer": "integers",
                "a number": "numbers",
                "a string": "strings",
            }
            for one, many in plural.items():
                item = item.replace(one, many, 1)
            parts.append(f"of {item}")
        if form.get("minItems"):
            parts.append(f"(at least {form['minItems']})")
        if form.get("uniqueItems"):
            parts.append("(each once)")
        return " ".join(parts)
    words = {"integer": "an integer", "number": "a number", "string": "a string"}
    parts = [
        words.get(kind, f"a {kind}") if isinstance(kind, str) else " or ".join(kind)
    ]
    bounds = {
        "minimum": ">=",
        "exclusiveMinimum": ">",
        "maximum": "<=",
        "exclusiveMaximum": "<",
    }
    parts.extend(f"{sign} {form[key]}" for key, sign in bounds.items() if key in form)
    return " ".join(parts)


# a number with an exponent, which YAML 1.1 (PyYAML, Snakemake's reader) takes for text unless it has a dot and
# a signed exponent: 1e-3, 5E4, 1.0e3
EXPONENT_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def whole_numbers_as_int(value, schema):
    """Numbers spelled as the schema asks, at any depth (the epochs of train.balanced_schedule's pairs too):
    8.0 where it asks for an integer (JSON Schema takes it as one) becomes 8, as the stage CLIs and the synthetic
    generator parse integers, and the rules' params then do not change with the spelling; 1e-3 where it asks for
    a number becomes 0.001 (YAML 1.1 reads it as the text '1e-3', which the schema refused as "not of type
    'number'"). Returns the converted value.
    """
    forms = [schema, *schema.get("oneOf", [])]
    types = []
    for form in forms:
        kind = form.get("type", [])
        types += [kind] if isinstance(kind, str) else kind
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                value[key] = whole_numbers_as_int(value[key], sub)
        return value
    if isinstance(value, list):
        converted = []
        for i, item in enumerate(value):
            subs = [
                (
                    f["prefixItems"][i]
                    if i < len(f.get("prefixItems", []))
                    else f.get("items")
                )
                for f in forms
            ]
            sub = next((s for s in subs if isinstance(s, dict)), {})
            converted.append(whole_numbers_as_int(item, sub))
        return converted
    if (
        {"number", "integer"} & set(types)
        and isinstance(value, str)
        and EXPONENT_NUMBER.fullmatch(value.strip())
    ):
        value = float(value)
    if "integer" in types and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# envs/luna.post-deploy.sh (--sdm conda) installs luna from here: Snakemake creates the environment, and runs
# that script, from copies under .snakemake/conda/, which do not know where this repository is
os.environ.update(LUNA_REPO=str(Path(workflow.basedir).resolve()))

SCHEMA = yaml.safe_load(
    (Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml").read_text()
)
whole_numbers_as_int(config, SCHEMA)  # before the check: 1e-3 is a number
check_config(config, SCHEMA)
validate(config, "../schemas/config.schema.yaml")  # fills in the defaults
whole_numbers_as_int(config, SCHEMA)


def sorted_tree(value):
    """Dicts with sorted keys, recursively: a rule's params then do not change with the key order of a YAML file."""
    if isinstance(value, dict):
        return {k: sorted_tree(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_tree(v) for v in value]
    return value


config.update(sorted_tree(config))

DATASET = config["dataset"]
if not DATASET["annotations"]:  # null, or "" (luna.luna16.resolve_table: no table)
    # predict-only: excluded findings only qualify a FROC, and without annotations there is none (the shipped
    # annotations_excluded would otherwise reach luna-evaluate, which refuses it, after all the training)
    DATASET["annotations_excluded"] = None
if not DATASET["annotations_excluded"]:
    # no excluded findings: nothing to skip, the same model either way
    config["train"]["skip_excluded"] = False
# data/synthetic/ and ./data/synthetic are data/synthetic: the same folder, the same state key
DATA_ROOT = os.path.normpath(DATASET["root"])
SYNTHETIC = DATASET["source"] == "synthetic"
RESULTS = "results"
CROPS_DIR = f"{RESULTS}/crops"
FOLDS_DIR = f"{RESULTS}/folds"
VALIDATION_DIR = f"{RESULTS}/validation"


def table_path(name):
    """A dataset table path: relative to the data root unless absolute; None stays None (luna's own rule)."""
    path = resolve_table(DATA_ROOT, name)
    return None if path is None else str(path)


def subset_order(name):
    """Sort key of a subset folder: its numbers as numbers (subset2 before subset10)."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", name)
    ]


def selected_subsets():
    """Subsets the run uses, in one order however they are listed (the order of the crop stores is the
    order of luna-train's samples: [subset1, subset0] must train what [subset0, subset1] does): the
    configured ones, else all the synthetic set makes, else every subset* on disk."""
    if DATASET["subsets"]:
        return sorted(DATASET["subsets"], key=subset_order)
    if SYNTHETIC:
        return [f"subset{k}" for k in range(config["synthetic"]["n_subsets"])]
    found = sorted(
        (p.name for p in Path(DATA_ROOT).glob("subset*") if p.is_dir()),
        key=subset_order,
    )
    if not found:
        raise WorkflowError(f"dataset.root: no subset* folders under {DATA_ROOT}")
    return found


def check_dataset():
    """Fail the dry-run early, naming the key and the path, when a LUNA16 download is not where config says;
    the scans found on disk, {series UID: subset} (None for the synthetic set, made later).
    """
    if SYNTHETIC:
        return None
    if not Path(DATA_ROOT).is_dir():
        raise WorkflowError(f"dataset.root: data folder {DATA_ROOT} not found")
    for key in ("candidates", "annotations", "annotations_excluded"):
        path = table_path(DATASET[key])
        if path is not None and not Path(path).is_file():
            optional = (
                f" (set dataset.{key}: null to go without)"
                if key != "candidates"
                else ""
            )
            raise WorkflowError(f"dataset.{key}: file {path} not found{optional}")
    candidates = table_path(DATASET["candidates"])
    with open(candidates, newline="", encoding="utf-8-sig", errors="replace") as fh:
        header = [name.strip() for name in next(csv.reader(fh), [])]
    if (
        "class" not in header
    ):  # luna-candidates allows it (to predict); training found out after all the crops
        raise WorkflowError(
            f"dataset.candidates: {candidates} has no class column (header: {','.join(header)}); "
            "the workflow trains on the candidates' labels"
        )
    for subset in DATASET["subsets"]:
        if not (Path(DATA_ROOT) / subset).is_dir():
            raise WorkflowError(
                f"dataset.subsets: folder {Path(DATA_ROOT) / subset} not found"
            )
    from luna.ct import find_scans

    try:  # a subset folder without scans (.MHD, a nested subsetN/subsetN/) stops here, not after the crops
        found = find_scans(DATA_ROOT, list(DATASET["subsets"]) or None)
        return {uid: found[uid].subset for uid in sorted(found)}
    except (OSError, ValueError) as exc:
        # a subset named or found wrong: the key the user set
        key = (
            "dataset.subsets"
            if DATASET["subsets"] and "subset" in str(exc)
            else "dataset.root"
        )
        raise WorkflowError(f"{key}: {exc}") from exc


def check_values():
    """Checks the schema cannot express, at the dry run, naming the key and the value."""
    low, high = config["crops"]["hu_window"]
    if not low < high:
        raise WorkflowError(
            f"crops.hu_window: [{low}, {high}] must be [low, high] with low < high"
        )
    train = config["train"]
    from luna.metrics import parse_threshold_policy

    try:
        parse_threshold_policy(train["threshold"])
    except ValueError as exc:
        raise WorkflowError(f"train.threshold: {exc}") from exc
    counts = collections.Counter(pair[0] for pair in train["balanced_schedule"])
    repeated = min((e for e, n in counts.items() if n > 1), default=None)
    # luna-train refuses it, after the synthesis and every crop
    if repeated is not None:
        raise WorkflowError(
            f"train.balanced_schedule: epoch {repeated} given more than once (each epoch once)"
        )
    if train["augment"].get("flip_only_epochs", 0) > train["epochs"]:
        raise WorkflowError(
            f"train.augment.flip_only_epochs: {train['augment']['flip_only_epochs']} is more than "
            f"train.epochs ({train['epochs']})"
        )
    if config["split"]["selection_fraction"] == 0 and (
        train["keep"] != "last" or isinstance(train["threshold"], str)
    ):
        raise WorkflowError(
            "split.selection_fraction: 0 leaves nothing to choose on: set train.keep: last and a fixed "
            f"train.threshold (got keep {train['keep']}, threshold {train['threshold']})"
        )
    if SYNTHETIC:
        from luna.synth.config import SynthConfig, SynthError

        try:
            SynthConfig.from_dict(config["synthetic"])
        except (SynthError, TypeError, ValueError) as exc:
            message = str(exc)
            raise WorkflowError(
                message if message.startswith("synthetic.") else f"synthetic: {message}"
            ) from exc
        for key, written in (
            ("candidates", "candidates.csv"),
            ("annotations", "annotations.csv"),
            ("annotations_excluded", "annotations_excluded.csv"),
        ):
            name = DATASET[key]
            if (
                name
                and Path(table_path(name)).resolve()
                != (Path(DATA_ROOT) / written).resolve()
            ):
                # found only by the job that reads it, after the scans (and for evaluate every training)
                raise WorkflowError(
                    f"dataset.{key}: the synthetic set writes {written}, not {name}"
                    + ("" if key == "candidates" else " (or set null to go without)")
                )
        root = Path(DATA_ROOT).resolve()
        from luna.synth.dataset import MARKER_NAME

        if root.is_dir() and any(root.iterdir()) and not (root / MARKER_NAME).is_file():
            # Snakemake deletes a directory() output before its job: luna-synth's own refusal came too late
            raise WorkflowError(
                f"dataset.root: {DATA_ROOT} holds files not written by luna-synth (no {MARKER_NAME}); the "
                "synthetic set would replace them: for data of your own set dataset.source: luna16, else "
                "choose an empty or new folder"
            )
        here = Path.cwd().resolve()
        for folder in (RESULTS, "logs", "benchmarks"):
            out = (here / folder).resolve()
            if root == out or out in root.parents or root in out.parents:
                raise WorkflowError(
                    f"dataset.root: {DATA_ROOT} holds or lies in the workflow's {folder}/; the synthetic set "
                    "needs a folder of its own (e.g. data/synthetic)"
                )
        made = [f"subset{k}" for k in range(config["synthetic"]["n_subsets"])]
        unknown = [s for s in DATASET["subsets"] if s not in made]
        if unknown:
            raise WorkflowError(
                f"dataset.subsets: {', '.join(unknown)} not among the synthetic subsets "
                f"({', '.join(made)}; synthetic.n_subsets: {config['synthetic']['n_subsets']})"
            )


SCANS = check_dataset()
check_values()
SUBSETS = selected_subsets()


def check_crop_cache():
    """A crop job's resume cache ({crops.cache}/{subset}) that is or holds the data root, or is, holds or lies in
    a subset's scan folder. The cache is removed whole after the job; luna-crops refuses a cache that is or holds
    the data root, or an existing folder that is not a cache (a scan folder, but only once the synthesis made
    it); a cache inside a scan folder is refused here only, as no output goes there."""
    cache = Path(config["crops"]["cache"])
    root = Path(DATA_ROOT).resolve()
    for subset in SUBSETS:
        where = (cache / subset).resolve()
        scans = root / subset
        for what, place, inside in (
            ("dataset.root", root, False),
            ("the scan folder", scans, True),
        ):
            if (
                where == place
                or where in place.parents
                or (inside and place in where.parents)
            ):
                raise WorkflowError(
                    f"crops.cache: {cache}/{subset} (the resume cache of {subset}'s crop job, removed whole after "
                    f"it) overlaps {what} {place}; give the cache a folder of its own (e.g. results/.cache/crops)"
                )


check_crop_cache()


def all_folds():
    """Every fold of the split: the subsets' numbers (split.folds: subsets) or 0 .. k-1."""
    folds = config["split"]["folds"]
    if folds == "subsets":
        from luna.splits import SplitsError, subset_folds

        try:
            return sorted(subset_folds(SUBSETS).values())
        except SplitsError as exc:
            raise WorkflowError(f"split.folds: {exc}") from None
    return list(range(int(folds)))


def check_folds_trainable(folds):
    """A split that fails its training jobs after every crop, refused when the DAG is built (called by the
    train rule's input, so a run of the tables or the crops alone is not refused): one subset under
    folds: subsets (every scan the test fold), a run fold without scans, or one whose other scans give no
    training or (split.selection_fraction > 0) no selection scan. The scans are on disk for a LUNA16 folder;
    the synthetic set's UIDs come from its seed alone (plan_dataset).
    """
    from luna.splits import fold_roles, make_splits

    k = config["split"]["folds"]
    if k == "subsets" and len(all_folds()) < 2:
        raise WorkflowError(
            f"split.folds: subsets with one subset ({', '.join(SUBSETS)}) is one fold, and nothing is "
            "left to train on; select two subsets or more, or give a number of folds"
        )
    nodules = None  # per scan, where known before any job runs: the synthetic plan's, the candidates' classes
    if SCANS is not None:
        scans = {uid: subset for uid, subset in SCANS.items() if subset in SUBSETS}
        where = f"the {len(scans)} scans under {DATA_ROOT}"
        nodules = positive_candidates()
    else:
        from luna.synth.config import SynthConfig, plan_dataset

        plans = plan_dataset(SynthConfig.from_dict(config["synthetic"]))
        scans = {
            plan.series_uid: plan.subset for plan in plans if plan.subset in SUBSETS
        }
        # at most: a nodule that finds no room in its scan is left out
        nodules = {plan.series_uid: plan.n_nodules for plan in plans}
        where = f"the {len(scans)} synthetic scans of {', '.join(SUBSETS)}"
    # the split luna-split writes, and the roles luna-train gives
    splits = make_splits(scans, k)
    present = set(splits["fold"].tolist())
    empty = [f for f in folds if f not in present]
    if empty:
        raise WorkflowError(
            f"split.folds: fold(s) {', '.join(map(str, empty[:10]))}{' ...' if len(empty) > 10 else ''} of "
            f"{k} hold no scan ({where}); use fewer folds or other split.run_folds"
        )
    fraction = config["split"]["selection_fraction"]
    for fold in folds:
        by_uid = fold_roles(splits, fold, fraction)
        roles = list(by_uid.values())
        n_others = len(roles) - roles.count("test")
        n_selection = roles.count("selection")
        if not n_others:  # every scan is in this fold: no share of the others can help
            raise WorkflowError(
                f"split.folds: all {len(roles)} scans ({where}) are in test fold {fold}, and nothing is left "
                "to train on; use fewer folds or more scans"
            )
        if n_selection == n_others or (fraction > 0 and n_selection == 0):
            what = "to train on" if n_selection == n_others else "in its selection set"
            raise WorkflowError(
                f"split.selection_fraction: {fraction} leaves test fold {fold} no scan {what} (of its "
                f"{n_others} other scans, {n_selection} select); "
                + (
                    "lower it"
                    if n_selection
                    else "raise it, or use 0 with train.keep: last and a fixed train.threshold"
                )
            )
        if nodules is not None:
            check_roles_hold_nodules(fold, by_uid, nodules, where)


@functools.cache
def positive_candidates():
    """Class-1 candidates per scan of a LUNA16 folder's candidate CSV (its seriesuid and class columns, read
    lightly), or None where they cannot be told now (no class column, no row, a table the candidates rule will
    refuse with its own message)."""
    import pandas as pd

    try:
        table = pd.read_csv(
            table_path(DATASET["candidates"]),
            usecols=["seriesuid", "class"],
            dtype={"seriesuid": str},
            encoding="utf-8-sig",
            skipinitialspace=True,
        )
        positive = pd.to_numeric(table["class"], errors="raise") == 1
    except (OSError, ValueError, KeyError):
        return None
    if table.empty:  # header only: the candidates rule's error
        return None
    counts = table.loc[positive, "seriesuid"].str.strip().value_counts()
    return collections.Counter(counts.to_dict())


def check_roles_hold_nodules(fold, roles, nodules, where):
    """Nodules per role of one run fold, as known before any job (the synthetic plan's, or a LUNA16 folder's
    class-1 candidates): a test fold, training set or selection set (when there is one: a selection_fraction
    above 0 that selects no scan is refused before) without one fails luna-train after every crop.
    """
    if SYNTHETIC:
        key, none = "synthetic.nodules_per_scan", "is planned no nodule"
        fixes = (
            "use fewer folds, more scans or a higher synthetic.nodules_per_scan",
            "use more scans or a higher synthetic.nodules_per_scan",
            "raise split.selection_fraction or synthetic.nodules_per_scan",
        )
    else:
        key, none = table_path(DATASET["candidates"]), "has no candidate of class 1"
        fixes = (
            "use fewer folds or more scans",
            "use more scans or lower split.selection_fraction",
            "raise split.selection_fraction",
        )
    for role, why, fix in zip(
        ("test", "train", "selection"),
        (
            "its metrics would be undefined",
            "nothing to learn from",
            "its threshold and kept epoch could not be chosen",
        ),
        fixes,
    ):
        uids = [uid for uid, r in roles.items() if r == role]
        if role == "selection" and not uids:
            continue
        if not sum(nodules[uid] for uid in uids):
            what = "test fold" if role == "test" else f"{role} set of test fold"
            raise WorkflowError(
                f"{key}: the {what} {fold} ({len(uids)} "
                f"scan{'s' if len(uids) != 1 else ''}) {none} ({where}): {why}; {fix}"
            )


def the_folds(folds):
    """The folds there are, for a message naming a fold that does not exist."""
    return f"the split has folds {', '.join(map(str, folds))} (split.folds: {config['split']['folds']})"


def run_folds():
    """The test folds to run (split.run_folds: all, or a list checked against the folds there are)."""
    chosen = config["split"]["run_folds"]
    folds = all_folds()
    if chosen == "all":
        return folds
    unknown = [f for f in chosen if f not in folds]
    if unknown:
        raise WorkflowError(
            f"split.run_folds: fold(s) {', '.join(map(str, unknown))} do not exist; {the_folds(folds)}"
        )
    return sorted(set(chosen))


RUN_FOLDS = run_folds()


def check_gpu_counter():
    """--resources gpu=N below train.gpus (but above 0): Snakemake would cut the train job's request to N and
    run it, and torchrun would start train.gpus processes on N devices; refused before any job (it failed the
    train job after every crop). gpu=0 grants no GPU: the jobs run on the CPU."""
    counter = workflow.global_resources.get("gpu")
    granted = getattr(counter, "value", counter)
    gpus = config["train"]["gpus"]
    if isinstance(granted, int) and 0 < granted < gpus:
        raise WorkflowError(
            f"train.gpus = {gpus}, but --resources gpu={granted} grants a job at most {granted}: give "
            f"--resources gpu={gpus} or more, or set train.gpus: {granted}"
        )


check_gpu_counter()


@functools.cache
def run_folds_trainable():
    """check_folds_trainable(RUN_FOLDS), once per DAG (it hashes every scan for every run fold: with hundreds
    of folds, once per train job took minutes)."""
    check_folds_trainable(RUN_FOLDS)
    return True


def trainable_splits(wildcards):
    """The splits.tsv input of train and predict, once the run folds, and a fold asked for by its path
    (results/folds/N/model.pt), are known to exist and to be trainable. Snakemake takes an input function's
    error under an existing file for "no producer, the file is a source": after a finished run a refusal in
    train alone was ignored ("Nothing to be done" for a split that cannot train), so predict, evaluate and all
    check too, and the first job built, the target's, refuses."""
    run_folds_trainable()
    fold = int(wildcards.fold)
    if fold not in RUN_FOLDS:
        fold_trainable(fold)
    return f"{RESULTS}/splits.tsv"


def trainable_run_splits(wildcards):
    """The evaluate rule's splits.tsv input, once the run folds are known to be trainable (trainable_splits)."""
    run_folds_trainable()
    return f"{RESULTS}/splits.tsv"


def evaluated_files(wildcards):
    """Rule all's input: every file the evaluate job writes, once the run folds are known to be trainable."""
    run_folds_trainable()
    return list(rules.evaluate.output)


@functools.cache
def fold_trainable(fold):
    """A fold outside split.run_folds, named by a target path: the checks run_folds and
    check_folds_trainable make for the run folds, once per DAG."""
    folds = all_folds()
    if fold not in folds:
        raise WorkflowError(
            f"{RESULTS}/folds/{fold}: fold {fold} does not exist; {the_folds(folds)}"
        )
    check_folds_trainable([fold])
    return True


def dataset_inputs():
    """What the table rules read: the synthesize rule's folder, or the user's CSVs."""
    if SYNTHETIC:
        return {"root": DATA_ROOT}
    inputs = {"candidates": table_path(DATASET["candidates"])}
    if DATASET["annotations"]:
        inputs["annotations"] = table_path(DATASET["annotations"])
    # which scans are on disk shapes both tables: a scan added, renamed or removed in a subset folder (its
    # mtime) reruns them, not only that subset's crop job (which would crop from the old candidates.tsv)
    inputs["subset_dirs"] = [str(Path(DATA_ROOT) / subset) for subset in SUBSETS]
    return inputs


def subset_inputs(wildcards):
    """A crop job reads its subset's folder (under the synthetic root when that is generated). A LUNA16 subset:
    the folder (a scan added, renamed or removed changes its mtime) and each file in it (a scan edited in place
    changes only its own). A subset the run does not have is refused (its crop job made an empty store).
    """
    if wildcards.subset not in SUBSETS:
        raise WorkflowError(
            f"{CROPS_DIR}/{wildcards.subset}.h5: {wildcards.subset} is not one of this run's subsets "
            f"({', '.join(SUBSETS)}; dataset.subsets)"
        )
    if SYNTHETIC:
        return {"root": DATA_ROOT}
    folder = Path(DATA_ROOT) / wildcards.subset
    files = sorted(
        str(p)
        for p in (folder.iterdir() if folder.is_dir() else ())
        if p.is_file() and not p.name.startswith(".")
    )
    return {"subset_dir": str(folder), "scan_files": files}


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


def crop_settings():
    """The crops section without `cache` (where the resume cache lives): what shapes the crops, so what reruns
    them and keys the training state."""
    return {k: v for k, v in config["crops"].items() if k != "cache"}


def training_data_settings():
    """The dataset settings that shape a model (the state folder's key): not annotations_excluded (FROC only),
    not the synthetic section when the data is a LUNA16 download."""
    shaping = {
        "dataset": {
            **{k: v for k, v in DATASET.items() if k != "annotations_excluded"},
            "subsets": SUBSETS,  # resolved: spelling out the default subsets retrains nothing
            "root": DATA_ROOT,  # normalised: data/synthetic/ retrains nothing either
        }
    }
    if SYNTHETIC:
        shaping["synthetic"] = config["synthetic"]
    return shaping


def training_excluded():
    """The annotations_excluded.csv that train.skip_excluded reads; None when off."""
    if not config["train"]["skip_excluded"]:
        return None
    return table_path(DATASET["annotations_excluded"])


def training_excluded_files(wildcards):
    """Rule train's input for train.skip_excluded: a LUNA16 download's annotations_excluded.csv, so that an
    edit retrains (the synthetic one comes with the scans the crops already depend on).
    """
    path = training_excluded()
    return [] if SYNTHETIC or path is None else [path]


def fold_files(name):
    """One file of every fold run, e.g. fold_files("model.pt")."""
    return expand(f"{FOLDS_DIR}/{{fold}}/{name}", fold=RUN_FOLDS)


def print_summary():
    """Where to look after a successful run."""
    metrics = Path(f"{VALIDATION_DIR}/metrics.tsv")
    if metrics.exists():
        print(f"luna: metrics in {metrics}, plots in {VALIDATION_DIR}/")
        configfiles = [
            str(f)
            for f in workflow.configfiles
            if Path(f).resolve()
            != Path(workflow.basedir, "config", "config.yaml").resolve()
        ]
        extra = f" --configfile {' '.join(configfiles)}" if configfiles else ""
        # run elsewhere (-s <repo>/Snakefile --directory <dir>): the hint must say both to work from any folder
        here = Path.cwd().resolve()
        snakefile = Path(workflow.main_snakefile).resolve()
        where = (
            ""
            if snakefile == (here / "Snakefile").resolve()
            else f" -s {snakefile} --directory {here}"
        )
        print(
            f"luna: build the report with: {snakemake_command()} --report report.html{where}{extra}"
        )


def snakemake_command():
    """How to call this Snakemake again from the working folder: "snakemake" when that is the one on PATH, else
    the venv's own (.venv/bin/snakemake, as the README runs it without activating the venv).
    """
    import shutil
    import sys

    mine = Path(sys.executable).parent / "snakemake"
    on_path = shutil.which("snakemake")
    if not mine.is_file() or (
        on_path is not None and Path(on_path).resolve() == mine.resolve()
    ):
        return "snakemake"
    try:
        return str(mine.absolute().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(mine.absolute())


def validation_tables():
    """The annotation tables FROC/CPM reads (the synthetic folder provides them once generated)."""
    tables = {}
    for key in ("annotations", "annotations_excluded"):
        path = table_path(DATASET[key])
        if path is not None:
            tables[key] = DATA_ROOT if SYNTHETIC else path
    return tables
