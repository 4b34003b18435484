"""The LUNA16 CSV tables (candidates.csv / candidates_V2.csv, annotations.csv, annotations_excluded.csv): read
and check them, drop repeated candidate rows, match diameters. pandas and numpy only (no SimpleITK, no torch),
so evaluation reads annotations without the scan reader.

Every bad row is reported as one line naming the file and its line number (a row with too many fields too);
a table with a header and no rows is an error, not an empty table (annotations_excluded.csv may be empty).

Duplicate candidates (same seriesuid, coordinates and class as an earlier row) are dropped with one warning
that counts them and names the first pair of lines: a repeated row adds nothing but a second, identical crop
(and weight in training and FROC), and the official 750,000-row candidates_V2.csv must stay usable as
downloaded, which an error would prevent. The same point with a different class contradicts itself: an error
naming both lines. So with annotations.csv: a repeated row (two files concatenated) would count as a second
nodule in FROC and CPM; it is dropped with one warning, and the same point with another diameter is an error.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from luna.tables import first_line, long_row_error

CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "class"]
ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


logger = logging.getLogger(__name__)


class TableError(ValueError):
    """A LUNA16 table with a bad header or row; the message names the file and line."""


def _check_utf8(path: Path) -> None:
    """A table that is not UTF-8 text, named by its first bad line (UTF-16 from a PowerShell redirect or Excel's
    "Unicode text" by its byte-order mark): pandas' message gives a byte position only."""
    try:
        data = path.read_bytes()
    except OSError:
        return  # the reader below names it
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise TableError(f"{path}: UTF-16 text; save the table as UTF-8 (e.g. Excel's \"CSV UTF-8\")")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TableError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the table as UTF-8 "
                         "(e.g. Excel's \"CSV UTF-8\")") from None


def _record_lines(path: str | os.PathLike, n_rows: int) -> np.ndarray:
    """The file line (from 1) where each of the first ``n_rows`` records after the header starts, a blank line
    counting as a record (as ``pd.read_csv(skip_blank_lines=False)`` reads it) and a quoted field's lines as one."""
    starts: list[int] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, skipinitialspace=True)  # as pandas reads it: ', "a' opens a quoted field
        last = 0
        for _ in reader:
            starts.append(last + 1)
            last = reader.line_num
            if len(starts) > n_rows:
                break
    if len(starts) < n_rows + 1:  # the two parsers disagree: the plain count rather than no line at all
        return np.arange(n_rows) + 2
    return np.array(starts[1:n_rows + 1], dtype=np.int64)


def read_luna_csv(path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = (),
                  allow_empty: bool = False) -> pd.DataFrame:
    """Read a LUNA16 CSV, checking the header, the field count of every row and that numbers are numeric.

    Returns a DataFrame with ``seriesuid`` as str and every other named column as float64, plus a ``line``
    column (1-based line number in the file) for error messages downstream. A header without rows is an
    error unless ``allow_empty``.
    """
    path = Path(path)
    if path.is_dir():
        raise TableError(f"{path}: is a folder, not a CSV file")
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    _check_utf8(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TableError(f"{path}: not a readable CSV ({first_line(exc)})") from exc
    if header is None:
        raise TableError(f"{path}:1: empty file, expected header {','.join((*required, *optional))}")
    header = [h.strip() for h in header]
    if not any(header):
        raise TableError(f"{path}:1: blank line where the header {','.join((*required, *optional))} should be "
                         "(the header must be the first line)")
    for name in (*required, *optional):  # a column the reader uses, twice; other columns are not read
        if header.count(name) > 1:
            raise TableError(f"{path}:1: duplicate column {name!r} in header")
    missing = [c for c in required if c not in header]
    if missing and len(header) == 1 and ("\t" in header[0] or ";" in header[0]):
        raise TableError(f"{path}:1: not comma-separated (the header is split by "
                         f"{'tabs' if chr(9) in header[0] else 'semicolons'}); LUNA16 tables are CSV with the header "
                         f"{','.join((*required, *optional))}")
    if missing:
        raise TableError(f"{path}:1: missing column {missing[0]!r} (header is {','.join(header)})")
    for name in optional:  # 'Class' was read as no class column: every row unlabelled, found at training
        alike = [h for h in header if h != name and h.lower() == name.lower()]
        if name not in header and alike:
            raise TableError(f"{path}:1: column {alike[0]!r}: column names are case-sensitive, {name!r} is meant? "
                             f"(without a {name!r} column the rows are read without it)")
    wanted = [c for c in (*required, *optional) if c in header]
    try:
        df = pd.read_csv(
            path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig",
            skipinitialspace=True, on_bad_lines="error", engine="c",
        )
    except pd.errors.ParserError as exc:  # "Expected 5 fields in line 7, saw 6": the line is the file's line
        unclosed = re.search(r"EOF inside string starting at row (\d+)", str(exc))  # rows from 0, every line
        if unclosed:
            raise TableError(f"{path}:{int(unclosed[1]) + 1}: a quoted field is not closed (a '\"' without its "
                             "pair: the field runs to the end of the file)") from exc
        raise TableError(long_row_error(path, exc, ",") or f"{path}: not a readable CSV ({first_line(exc)})") from exc
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, EmptyDataError
        raise TableError(f"{path}: not a readable CSV ({first_line(exc)})") from exc
    message = long_row_error(path, df, ",")  # the first row longer than the header: pandas made an index of it
    if message:
        raise TableError(message)
    if df.empty and not allow_empty:
        raise TableError(f"{path}: no rows, only the header line")
    df.columns = [c.strip() for c in df.columns]
    df = df.loc[:, ~df.columns.duplicated()]  # unused columns named alike once stripped ("note ", "note"): one
    line = np.arange(len(df)) + 2
    if any(df[c].str.contains("\n|\r", regex=True).any() for c in df.columns):
        line = _record_lines(path, len(df))  # a quoted field over several lines: row + 2 is not its line
    # a blank line of the file (e.g. an editor's last newline) is no row; ",,,," (fields, all empty) stays a row
    blank_line = np.ones(len(df), dtype=bool)
    for c in df.columns:  # column by column over the rows still blank: one pass over the table, not one a column
        rows = np.flatnonzero(blank_line)
        if not len(rows):
            break
        blank_line[rows] = df[c].iloc[rows].fillna("").str.strip().to_numpy() == ""
    if blank_line.any():
        with open(path, encoding="utf-8-sig", newline="") as fh:
            blank_numbers = [n for n, text in enumerate(fh, start=1) if not text.strip()]
        blank_line &= np.isin(line, blank_numbers)
    if blank_line.any():
        df, line = df[~blank_line].reset_index(drop=True), line[~blank_line]
        if df.empty and not allow_empty:
            raise TableError(f"{path}: no rows, only the header line")
    df = df[wanted]
    # a header line repeated inside the file (concatenated CSVs)
    is_header = np.ones(len(df), dtype=bool)
    for c in wanted:
        is_header &= df[c].str.strip().to_numpy() == c
    if is_header.any():
        raise TableError(f"{path}:{line[np.argmax(is_header)]}: duplicate header line")
    uid = df["seriesuid"].str.strip()
    blank = (uid == "").to_numpy()
    if blank.any():
        raise TableError(f"{path}:{line[np.argmax(blank)]}: empty seriesuid")
    out = pd.DataFrame({"seriesuid": uid.to_numpy()})
    for c in wanted[1:]:
        values = pd.to_numeric(df[c].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            if not df[c].iloc[i].strip():
                raise TableError(f"{path}:{line[i]}: column {c} is empty (a missing field?)")
            raise TableError(f"{path}:{line[i]}: column {c} is not a finite number: {df[c].iloc[i]!r}")
        out[c] = values
    if "class" in out:
        bad = ~np.isin(out["class"].to_numpy(), [0.0, 1.0])
        if bad.any():
            i = int(np.argmax(bad))
            raise TableError(f"{path}:{line[i]}: column class must be 0 or 1, got {df['class'].iloc[i]!r}")
    out["line"] = line
    return out


def read_candidates_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``candidates.csv`` / ``candidates_V2.csv``; the class column is optional (predict-only lists)."""
    return read_luna_csv(path, CANDIDATE_COLUMNS[:4], optional=["class"])


def read_annotations_csv(path: str | os.PathLike, allow_negative: bool = False) -> pd.DataFrame:
    """``annotations.csv`` (diameters must be > 0, at least one row) or, with allow_negative,
    ``annotations_excluded.csv`` (which may list nothing)."""
    df = read_luna_csv(path, ANNOTATION_COLUMNS, allow_empty=allow_negative)
    if not allow_negative:
        bad = df["diameter_mm"].to_numpy() <= 0
        if bad.any():
            i = int(np.argmax(bad))
            raise TableError(f"{path}:{df['line'].iloc[i]}: diameter_mm must be > 0, got {df['diameter_mm'].iloc[i]}")
        df, repeats = _drop_repeated_points(df, path, "diameter_mm")  # each row is a nodule to find: once
        if repeats.n_dropped:
            logger.warning("%s", repeats.line(path, "annotation", "diameter_mm"))
    return df


@dataclass
class Duplicates:
    """Candidate rows dropped as repeats of an earlier row: how many, and the first pair of lines."""

    n_dropped: int = 0
    first_line: int = 0  # of the kept row
    repeat_line: int = 0  # of its first repeat

    def line(self, path: str | os.PathLike, what: str = "candidate", value: str = "class") -> str:
        return (f"{path}: {self.n_dropped} duplicate {what} rows dropped (same seriesuid, coordinates and {value} "
                f"as an earlier row; first: line {self.repeat_line} repeats line {self.first_line})")


def drop_duplicate_candidates(cand: pd.DataFrame, path: str | os.PathLike) -> tuple[pd.DataFrame, Duplicates]:
    """Candidate rows without repeats (the first of each kept, file order), and what was dropped.

    The same seriesuid and coordinates with a different class is a TableError naming both lines.
    """
    return _drop_repeated_points(cand, path, "class")


def _drop_repeated_points(cand: pd.DataFrame, path: str | os.PathLike,
                          value: str) -> tuple[pd.DataFrame, Duplicates]:
    """Rows without repeats of an earlier row's seriesuid and coordinates (the first kept, file order), and what
    was dropped; the same point with another ``value`` (when the table has that column) is a TableError naming
    both lines."""
    point = ["seriesuid", "coordX", "coordY", "coordZ"]
    same_point = cand.duplicated(subset=point, keep=False).to_numpy()
    if not same_point.any():
        return cand, Duplicates()
    if value in cand:
        values = cand[same_point].groupby(point, sort=False)[value].nunique()
        if (values > 1).any():
            conflict = cand[same_point].merge(values[values > 1].reset_index()[point], on=point)  # file order
            first = conflict.iloc[0]
            group = conflict[np.all([(conflict[c] == first[c]).to_numpy() for c in point], axis=0)]
            other = group[group[value] != first[value]].iloc[0]
            raise TableError(f"{path}:{int(other['line'])}: same seriesuid and coordinates as line "
                             f"{int(first['line'])} but {value} {other[value]:g} where that line has "
                             f"{first[value]:g}")
    repeat = cand.duplicated(subset=point, keep="first").to_numpy()
    i = int(np.argmax(repeat))
    row = cand.iloc[i]
    earlier = cand.iloc[:i]
    j = int(np.flatnonzero(np.all([(earlier[c] == row[c]).to_numpy() for c in point], axis=0))[0])
    info = Duplicates(int(repeat.sum()), int(cand["line"].iloc[j]), int(row["line"]))
    return cand[~repeat].reset_index(drop=True), info


def match_diameters(candidates: pd.DataFrame, annotations: pd.DataFrame) -> np.ndarray:
    """The book's rule: a candidate takes the diameter of the first annotation of its scan (in file order)
    whose centre is within diameter/4 on every axis; 0 when none."""
    diameter = np.zeros(len(candidates), dtype=np.float64)
    cand_xyz = candidates[["coordX", "coordY", "coordZ"]].to_numpy()
    cand_pos = {uid: idx for uid, idx in candidates.groupby("seriesuid", sort=False).indices.items()}
    for uid, ann_idx in annotations.groupby("seriesuid", sort=False).indices.items():
        rows = cand_pos.get(uid)
        if rows is None:
            continue
        ann = annotations.iloc[np.sort(ann_idx)]
        ann_xyz = ann[["coordX", "coordY", "coordZ"]].to_numpy()
        ann_d = ann["diameter_mm"].to_numpy()
        # (n_cand, n_ann): within d/4 on every axis
        within = np.all(np.abs(cand_xyz[rows, None, :] - ann_xyz[None, :, :]) <= ann_d[None, :, None] / 4, axis=2)
        has = within.any(axis=1)
        first = np.argmax(within, axis=1)
        diameter[rows[has]] = ann_d[first[has]]
    return diameter


def resolve_table(root: str | os.PathLike, name: str | os.PathLike | None) -> Path | None:
    """A table's path: ``name`` relative to the data root unless absolute; None or '' stays None (no table).
    The workflow resolves dataset.candidates / annotations / annotations_excluded with this too."""
    if name is None or str(name) == "":
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(root) / path
