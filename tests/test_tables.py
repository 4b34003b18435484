"""luna.tables: the shared TSV error translation, as seen through each of the four readers that use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import pytest

from luna.candidates import CANDIDATES_TSV_COLUMNS, read_candidates_tsv
from luna.luna16 import TableError
from luna.crops import CropError, read_subset_candidates
from luna.evaluation import HISTORY_REQUIRED, EvaluationError, read_history
from luna.splits import SPLITS_TSV_COLUMNS, SplitsError, read_splits_tsv
from luna.tables import file_line, numeric_column, read_tsv


class Reader(NamedTuple):
    read: Callable[[Path], pd.DataFrame]
    error: type[Exception]
    what: str
    header: list[str]


READERS = {
    "splits": Reader(read_splits_tsv, SplitsError, "splits file", SPLITS_TSV_COLUMNS),
    "history": Reader(read_history, EvaluationError, "history file", HISTORY_REQUIRED),
    "candidates": Reader(read_candidates_tsv, TableError, "candidates table", CANDIDATES_TSV_COLUMNS),
    "crops": Reader(lambda path: read_subset_candidates(path, "subset0"), CropError, "candidates table",
                    CANDIDATES_TSV_COLUMNS),
}


def _raises_one_line(reader: Reader, path: Path) -> str:
    with pytest.raises(reader.error) as info:
        reader.read(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message[len(str(path)):]


@pytest.mark.parametrize("name", READERS)
def test_missing_file_names_it(tmp_path: Path, name: str) -> None:
    reader = READERS[name]
    rest = _raises_one_line(reader, tmp_path / "nope.tsv")
    assert rest == f": no such {reader.what}"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "No columns to parse from file"),
        (b"\n\n", "No columns to parse from file"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00", "codec can't decode"),
        (b'series_uid\tsplit\n"unterminated\tval\n', "EOF inside string"),
    ],
    ids=["empty", "blank-lines", "binary", "open-quote"],
)
@pytest.mark.parametrize("name", READERS)
def test_unreadable_file_is_one_line(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / "table.tsv"
    path.write_bytes(content)
    rest = _raises_one_line(READERS[name], path)
    assert rest.startswith(": not a readable TSV (") and reason in rest and rest.endswith(")"), rest


@pytest.mark.parametrize("name", READERS)
def test_a_directory_is_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / "dir.tsv"
    path.mkdir()
    assert _raises_one_line(READERS[name], path).startswith(": not a readable TSV (")


@pytest.mark.parametrize("name", READERS)
def test_missing_columns_are_listed_on_line_1(tmp_path: Path, name: str) -> None:
    reader = READERS[name]
    header = [c for c in reader.header if c not in ("split", "subset")] + ["extra"]
    path = tmp_path / "table.tsv"
    path.write_text("\t".join(header) + "\n")
    rest = _raises_one_line(reader, path)
    missing = [c for c in reader.header if c in ("split", "subset")]
    assert rest == f":1: missing column(s) {', '.join(missing)} (has {', '.join(header)})"


@pytest.mark.parametrize("value", ["abc", "0.5", "300"])
def test_candidates_tsv_bad_is_nodule_is_not_readable(tmp_path: Path, value: str) -> None:
    # pandas raises ValueError ('abc') or TypeError (0.5, 300 into Int8) while parsing; both become TableError
    row = {c: "1" for c in CANDIDATES_TSV_COLUMNS} | {"series_uid": "1.2", "subset": "subset0", "is_nodule": value}
    path = tmp_path / "candidates.tsv"
    pd.DataFrame([row]).to_csv(path, sep="\t", index=False)
    assert _raises_one_line(READERS["candidates"], path).startswith(": not a readable TSV (")


def _history(path: Path, loss: list[str]) -> Path:
    lines = ["\t".join(HISTORY_REQUIRED)]
    lines += [f"{i + 1}\ttrain\t{value}\t0.5\t0.5\t0.5" for i, value in enumerate(loss)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_history_numeric_check_names_line_and_value(tmp_path: Path) -> None:
    path = _history(tmp_path / "history.tsv", ["0.7", "abc", "0.5"])
    assert _raises_one_line(READERS["history"], path) == ":3: loss_all = 'abc' is not a number"
    # an empty cell is allowed in history.tsv (a metric that was not defined) and stays NaN
    history = read_history(_history(tmp_path / "ok.tsv", ["0.7", "", "0.5"]))
    assert history["loss_all"].dtype == np.float64 and np.isnan(history["loss_all"].iloc[1])


def _candidates(path: Path, rows: list[dict]) -> Path:
    base = {"candidate_id": 0, "series_uid": "1.2", "subset": "subset0", "coord_x": 1.0, "coord_y": 2.0,
            "coord_z": 3.0, "is_nodule": 0, "diameter_mm": 0.0}
    rows = [base | {"candidate_id": k} | row for k, row in enumerate(rows)]  # unique ids unless given
    pd.DataFrame(rows, columns=CANDIDATES_TSV_COLUMNS).to_csv(path, sep="\t", index=False)
    return path


def test_crops_numeric_check_names_the_file_line(tmp_path: Path) -> None:
    # rows of another subset are not checked, but they still count for the line number
    path = _candidates(tmp_path / "candidates.tsv",
                       [{"subset": "subset1", "coord_z": "junk"}, {}, {"subset": "subset1"}, {"coord_z": "1e"}])
    assert _raises_one_line(READERS["crops"], path) == ":5: coord_z = '1e' is not a number"
    path = _candidates(tmp_path / "empty.tsv", [{}, {"coord_x": None}])
    assert _raises_one_line(READERS["crops"], path) == ":3: coord_x is empty, expected a number"
    # a number that is not usable keeps the crop stage's own check
    path = _candidates(tmp_path / "inf.tsv", [{"coord_y": "inf"}])
    assert _raises_one_line(READERS["crops"], path) == ":2: coord_y = inf, expected a finite number"
    # a literal NaN is a bad value, not an empty cell; values in the file's spelling
    path = _candidates(tmp_path / "nan.tsv", [{}, {"coord_x": "NaN"}])
    assert _raises_one_line(READERS["crops"], path) == ":3: coord_x = 'NaN' is not a number"
    path = _candidates(tmp_path / "class.tsv", [{"is_nodule": 2}])
    assert _raises_one_line(READERS["crops"], path) == ":2: is_nodule = 2, expected -1, 0, 1 or empty"
    path = _candidates(tmp_path / "id.tsv", [{"candidate_id": 1.5}])
    assert _raises_one_line(READERS["crops"], path) == ":2: candidate_id = 1.5, expected a whole number >= 0"
    # negative: refused here, not by luna-evaluate after the training
    path = _candidates(tmp_path / "negative.tsv", [{}, {"candidate_id": -7}])
    assert _raises_one_line(READERS["crops"], path) == ":3: candidate_id = -7, expected a whole number >= 0"


def test_crops_subset_cell_with_spaces_is_its_subset(tmp_path: Path) -> None:
    """"subset0 " (a hand-edited table) matched no --subset: its rows were in neither the store nor the skipped
    table, without a word."""
    from luna.crops import read_subset_candidates

    path = _candidates(tmp_path / "spaces.tsv", [{"candidate_id": 1}, {"candidate_id": 2, "subset": "subset0 "},
                                                 {"candidate_id": 3, "subset": " subset1"}])
    assert read_subset_candidates(path, "subset0")["candidate_id"].tolist() == [1, 2]
    assert read_subset_candidates(path, "subset1")["candidate_id"].tolist() == [3]


def test_crops_candidate_ids_must_be_unique_in_the_whole_table(tmp_path: Path) -> None:
    path = _candidates(tmp_path / "dup.tsv", [{"candidate_id": 4}, {"candidate_id": 5, "subset": "subset1"},
                                              {"candidate_id": 5}])
    assert _raises_one_line(READERS["crops"], path) == ":4: candidate_id 5 repeats line 3; candidate ids must be unique"


def test_read_tsv_passes_read_csv_options_and_raises_the_given_class(tmp_path: Path) -> None:
    class MyError(ValueError):
        pass

    path = tmp_path / "t.tsv"
    path.write_text("a\tb\n007\t\n")
    frame = read_tsv(path, what="test table", error=MyError, required=["b", "a"], dtype=str, keep_default_na=False)
    assert frame.to_dict("records") == [{"a": "007", "b": ""}]
    with pytest.raises(MyError, match=r"t\.tsv:1: missing column\(s\) c \(has a, b\)$"):
        read_tsv(path, what="test table", error=MyError, required=["a", "c"])
    with pytest.raises(MyError, match=r"gone\.tsv: no such test table$"):
        read_tsv(tmp_path / "gone.tsv", what="test table", error=MyError)


def test_numeric_column_names_the_files_own_line(tmp_path) -> None:
    frame = pd.DataFrame({"x": ["1", "2.5", "x1", None]})
    missing = tmp_path / "gone.tsv"  # no file to read: the row's position + 2
    with pytest.raises(LookupError, match="gone.tsv:4: x = 'x1' is not a number"):
        numeric_column(frame, "x", missing, LookupError)
    with pytest.raises(LookupError, match="gone.tsv:12: x = 'x1'"):
        numeric_column(frame, "x", missing, LookupError, rows=[8, 9, 10, 11])
    # pandas skips blank lines (spaces only too, before the header too): the message counts them
    path = tmp_path / "t.tsv"
    path.write_text("\nx\n1\n   \n2.5\n\r\nx1\n\n")
    table = pd.read_csv(path, sep="\t", dtype=str)
    assert table["x"].tolist() == ["1", "2.5", "x1"]
    with pytest.raises(LookupError, match="t.tsv:7: x = 'x1' is not a number"):
        numeric_column(table, "x", path, LookupError)
    assert [file_line(path, row) for row in range(3)] == [3, 5, 7]
    # a quoted field over two lines is one row (pandas' default quoting); a quote inside a field is a character
    quoted = tmp_path / "q.tsv"
    quoted.write_text('uid\tx\na"b\t1\n"c\nd"\t2\n\ne\tx1\n')
    table = pd.read_csv(quoted, sep="\t", dtype=str)
    assert table["uid"].tolist() == ['a"b', "c\nd", "e"]
    with pytest.raises(LookupError, match="q.tsv:6: x = 'x1' is not a number"):
        numeric_column(table, "x", quoted, LookupError)
    frame = frame.iloc[[0, 1, 3]]
    values = numeric_column(frame, "x", missing, LookupError, allow_missing=True)
    assert values.tolist()[:2] == [1.0, 2.5] and np.isnan(values.iloc[2])
    with pytest.raises(LookupError, match="gone.tsv:4: x is empty"):
        numeric_column(frame, "x", missing, LookupError)


def test_tables_and_splits_stay_light() -> None:
    code = ("import sys, luna.tables, luna.splits; "
            "print(sorted(m for m in ('torch', 'SimpleITK', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", READERS)
def test_rows_longer_than_the_header_name_the_line(tmp_path: Path, name: str) -> None:
    """A first row with one field too many would become pandas' index (every column shifted, silently)."""
    reader = READERS[name]
    header = "\t".join(reader.header)
    row = "\t".join("subset0" if c == "subset" else "1" for c in reader.header)
    path = tmp_path / f"{name}.tsv"
    path.write_text(f"{header}\n{row}\t9\n{row}\t9\n")
    n = len(reader.header)
    assert _raises_one_line(reader, path) == f":2: {n + 1} fields where the header has {n}"
    path.write_text(f"{header}\n{row}\n{row}\n{row}\t9\t9\n")
    assert _raises_one_line(reader, path) == f":4: {n + 2} fields where the header has {n}"
    # a short row: pandas filled its missing fields with NaN, and the error named a column "empty"
    short = "\t".join(row.split("\t")[: n // 2])
    path.write_text(f"{header}\n{row}\n\n{short}\n{row}\n")
    assert _raises_one_line(reader, path) == f":4: {n // 2} fields where the header has {n}"


PREDICTION_ROW = {"candidate_id": "7", "series_uid": "1.2.3", "coord_x": "1.5", "coord_y": "-2", "coord_z": "30",
                  "diameter_mm": "0", "is_nodule": "0", "probability": "0.25", "loss": "0.3", "fold": "1"}


def _predictions(path: Path, rows: list[dict]) -> Path:
    from luna.evaluation import PREDICTION_COLUMNS

    lines = ["\t".join(PREDICTION_COLUMNS)]
    for edit in rows:
        row = {**PREDICTION_ROW, **edit}
        lines.append("\t".join(str(row[c]) for c in PREDICTION_COLUMNS))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("edit, message", [
    ({"probability": "1.5"}, ":3: probability = 1.5, expected a number in [0, 1]"),
    ({"probability": "-0.2"}, ":3: probability = -0.2, expected a number in [0, 1]"),
    ({"probability": "inf"}, ":3: probability = inf, expected a number in [0, 1]"),
    ({"probability": "nan"}, ":3: probability = 'nan' is not a number"),
    ({"probability": ""}, ":3: probability is empty, expected a number"),
    ({"coord_y": "-inf"}, ":3: coord_y = -inf, expected a finite number"),
    ({"candidate_id": "8.5"}, ":3: candidate_id = 8.5, expected a whole number >= 0"),
    ({"fold": "1.7"}, ":3: fold = 1.7, expected a whole number >= 0"),
    ({"is_nodule": "2"}, ":3: is_nodule = 2, expected 0, 1 or empty"),
    ({"candidate_id": "7"}, ":3: candidate_id 7 repeats line 2; candidate ids must be unique"),
    ({"is_nodule": "", "loss": ""},  # was "candidate_id 8 has no class while ...", naming no file
     ":3: is_nodule is empty here but not on line 2; a file holds the predictions of one candidate list"),
])
def test_predictions_values_the_metrics_cannot_use_name_the_line(tmp_path: Path, edit: dict, message: str) -> None:
    from luna.evaluation import EvaluationError, read_predictions_tsv

    path = _predictions(tmp_path / "predictions.tsv", [{}, {"candidate_id": "8", **edit}])
    with pytest.raises(EvaluationError) as info:
        read_predictions_tsv(path)
    assert str(info.value) == f"{path}{message}"


def test_predictions_without_classes_read_as_luna_writes_them(tmp_path: Path) -> None:
    from luna.evaluation import read_predictions_tsv

    path = _predictions(tmp_path / "predictions.tsv", [{"is_nodule": "NaN", "loss": "NaN"},
                                                        {"candidate_id": 9, "is_nodule": "", "loss": ""}])
    frame = read_predictions_tsv(path)
    assert frame["is_nodule"].isna().all() and frame["loss"].isna().all()
    assert frame["candidate_id"].tolist() == [7, 9] and frame["probability"].tolist() == [0.25, 0.25]


def test_a_candidate_id_in_two_folds_is_an_error(tmp_path: Path) -> None:
    from luna.evaluation import EvaluationError, FoldPredictions, check_disjoint_folds, read_predictions_tsv

    folds = []
    for fold, ids in ((1, [3, 4]), (2, [5, 4])):
        folder = tmp_path / str(fold)
        folder.mkdir()
        frame = read_predictions_tsv(_predictions(folder / "predictions.tsv",
                                                  [{"candidate_id": i, "fold": fold} for i in ids]))
        folds.append(FoldPredictions(fold, frame, ["1.2.3"], 0.5, 1, None, str(folder)))
    with pytest.raises(EvaluationError) as info:
        check_disjoint_folds(folds)
    assert str(info.value) == (f"{tmp_path / '2' / 'predictions.tsv'}:3: candidate_id 4 is also in "
                               f"{tmp_path / '1' / 'predictions.tsv'}:3; the folds must come from one candidate list")
    folds[1].predictions.loc[1, "candidate_id"] = 6
    check_disjoint_folds(folds)
