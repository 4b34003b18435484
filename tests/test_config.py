"""The config schema: defaults for every key, the shipped config validates, every key is documented."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO

SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"


def leaf_keys(props: dict, prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for key, spec in props.items():
        if spec.get("type") == "object" and spec.get("properties"):
            out += leaf_keys(spec["properties"], f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", spec))
    return out


def test_every_key_has_type_default_and_description() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    keys = leaf_keys(schema["properties"])
    assert len(keys) > 40
    for key, spec in keys:
        assert "default" in spec, key
        assert spec.get("description"), key
        assert "type" in spec or "enum" in spec, key


def test_every_key_is_in_config_readme() -> None:
    import subprocess
    import sys

    readme = (REPO / "config" / "README.md").read_text()
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for key, _ in leaf_keys(schema["properties"]):
        assert f"`{key}`" in readme, key
    # the table is the generated one: schema defaults and the shipped config's values as they are now
    check = subprocess.run([sys.executable, str(REPO / "workflow" / "schemas" / "config_table.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_shipped_config_validates_and_defaults_fill_in() -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(config, str(SCHEMA_PATH))
    assert config["crops"]["shape"] == [32, 48, 48]
    assert config["train"]["lr"] == 0.001 and config["train"]["momentum"] == 0.99
    empty: dict = {}
    validate(empty, str(SCHEMA_PATH))
    assert empty["dataset"]["source"] == "synthetic"
    assert empty["split"] == {"folds": "subsets", "run_folds": "all", "selection_fraction": 0.2}
    assert empty["train"]["threshold"] == 0.5 and empty["train"]["keep"] == "f1"
    assert empty["train"]["augment"]["noise"] == 25.0


@pytest.mark.parametrize("bad", [{"dataset": {"sauce": "x"}}, {"crops": {"shape": [32, 48]}}, {"train": {"lr": -1}},
                                 {"train": {"balanced_schedule": [[0, 8]]}}, {"train": {"balanced_schedule": [[6]]}},
                                 {"train": {"balanced_schedule": [[6, 8, 1]]}}, {"train": {"balanced_schedule": [[6, -1]]}},
                                 {"crops": {"shape": [16, 32, 8]}}, {"split": {"folds": 1}}, {"split": {"folds": "subset"}},
                                 {"split": {"run_folds": []}}, {"split": {"run_folds": "some"}},
                                 {"split": {"run_folds": [0, 0]}}, {"split": {"selection_fraction": 1.0}},
                                 {"train": {"threshold": 1.5}}, {"train": {"threshold": "best"}},
                                 {"train": {"threshold": "recall:2"}}, {"train": {"threshold": "fp_per_scan:."}},
                                 {"train": {"threshold": "fp_per_scan:-1"}}, {"train": {"keep": "loss"}},
                                 {"split": {"val_stride": 5}}])
def test_schema_rejects(bad: dict) -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(copy.deepcopy(bad), schema)


@pytest.mark.parametrize("good", [{"split": {"folds": 10, "run_folds": [0, 3]}}, {"train": {"threshold": "max_f1"}},
                                  {"train": {"threshold": "recall:0.9"}}, {"train": {"threshold": 0.3}},
                                  {"train": {"threshold": "fp_per_scan:2"}}, {"train": {"threshold": "fp_per_scan:0.5"}},
                                  {"train": {"threshold": "fp_per_scan:0"}},
                                  {"crops": {"shape": [16, 16, 16]}}])
def test_schema_accepts(good: dict) -> None:
    jsonschema.validate(copy.deepcopy(good), yaml.safe_load(SCHEMA_PATH.read_text()))


def test_malformed_config_yaml_names_file_and_line(tmp_path) -> None:
    from luna.runner import check_yaml_file

    good = tmp_path / "good.yaml"
    good.write_text("split:\n  run_folds: [0]\n")
    check_yaml_file(good)
    check_yaml_file(tmp_path / "absent.yaml")  # Snakemake reports a missing file itself
    bad = tmp_path / "config.yaml"
    bad.write_text("split:\n  run_folds: [0\n  folds: 3\n")
    with pytest.raises(ValueError) as info:
        check_yaml_file(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}, line 3, column 8: not valid YAML")
    assert "\n" not in message
    # the Snakefile runs the check before its configfile: line
    assert 'check_yaml_file(f"{workflow.basedir}/config/config.yaml")' in (REPO / "Snakefile").read_text()
