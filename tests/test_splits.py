"""luna.splits: the one splits.tsv reader, its checks and one-line errors (file:line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from luna.data import DataError, read_splits
from luna.splits import SplitsError, read_splits_tsv, split_of_scan
from luna.validation import ValidationError
from luna.validation import read_splits as validation_read_splits


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reads_columns_in_any_order_as_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "splits.tsv", "split\tseries_uid\ttrain_note\nval\t1.2.3\tx\ntrain\t007\t\n")
    frame = read_splits_tsv(path)
    assert list(frame["series_uid"]) == ["1.2.3", "007"]  # "007" stays a string, not 7
    assert split_of_scan(path) == {"1.2.3": "val", "007": "train"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("series_uid\tfold\na\ttrain\n", r"splits.tsv:1: missing column\(s\) split \(has series_uid, fold\)"),
        ("series_uid\tsplit\na\ttrain\nb\ttest\n", r"splits.tsv:3: split 'test' is not train or val"),
        ("series_uid\tsplit\na\ttrain\nb\t\n", r"splits.tsv:3: split '' is not train or val"),
        ("series_uid\tsplit\na\ttrain\nb\tval\na\tval\n", r"splits.tsv:4: series_uid a listed twice"),
        ("", r"splits.tsv: not a readable TSV"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "splits.tsv", text)
    with pytest.raises(SplitsError, match=message):
        read_splits_tsv(path)
    # every stage reports the same line, in its own error class
    with pytest.raises(DataError, match=message):
        read_splits(path)
    with pytest.raises(ValidationError, match=message):
        validation_read_splits(path)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SplitsError, match=r"nope.tsv: no such splits file$"):
        read_splits_tsv(tmp_path / "nope.tsv")
