"""Read the pipeline's TSV tables with one-line errors: the shared error translation of every TSV reader.

Each stage's reader (splits.tsv, history.tsv, candidates.tsv) raises its own error class, but the messages
for a table that cannot be used are the same everywhere and name the file (and line; the header is line 1):

* ``<path>: no such <what>``: the file does not exist;
* ``<path>: not a readable TSV (<first line of the reader's error>)``: empty, not text, not parseable;
* ``<path>:1: missing column(s) a, b (has x, y)``: the header lacks required columns;
* ``<path>:<line>: 5 fields where the header has 4``: a row longer than the header (pandas would take the first
  row's extra field for an index and shift every column by one, silently);
* ``<path>:<line>: <column> = <value!r> is not a number`` (or ``<column> is empty``): :func:`numeric_column`.

``<line>`` is the file's own line (:func:`file_line`): pandas skips blank lines, so a row's position + 2 is its
line only in a file without them.

Only pandas and numpy are imported here, so light modules (luna.splits) can use it without torch or SimpleITK.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

__all__ = ["file_line", "first_line", "long_row_error", "numeric_column", "read_tsv"]


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name when the message is empty)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def file_line(path: str | os.PathLike, row: int, sep: str = "\t") -> int:
    """The line of the file (from 1) where data row ``row`` (from 0) of what ``pd.read_csv`` read from it starts.

    pandas skips blank lines (empty or spaces only, before the header too) and joins a quoted field's lines into
    one row, so ``row + 2`` is the line only in a file with neither; read again here, with the csv module's
    quoting (pandas' default), on error paths only. Falls back to ``row + 2`` if the file cannot be read."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.reader(fh, delimiter=sep)
            seen, last = -1, 0  # the header is row -1; last: the line the previous record ended on
            for fields in reader:
                start, last = last + 1, reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip(" ")):
                    continue  # a blank line: no row
                if seen == row:
                    return start
                seen += 1
    except (OSError, csv.Error):
        pass
    return int(row) + 2


def long_row_error(path: str | os.PathLike, frame_or_exc: pd.DataFrame | BaseException,
                   sep: str) -> str | None:
    """``"<path>:<line>: <n> fields where the header has <m>"`` when a row is longer than the header, else None.

    Given the frame pandas read: when the first data row has one field more than the header, pandas makes that
    field an index (then a later long row is its ParserError); its index is then not the default 0..n-1, or is
    when the first column counts up from 0 (candidate ids: pandas turns an evenly spaced integer index into a
    RangeIndex), so the file's first data row is read to tell, and the file scanned for the first long line.
    Given pandas' ParserError ("Expected 4 fields in line 7, saw 5"): its numbers."""
    if isinstance(frame_or_exc, BaseException):
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(frame_or_exc))
        return f"{path}:{match[2]}: {match[3]} fields where the header has {match[1]}" if match else None
    index = frame_or_exc.index
    default = isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1 and index.name is None
    if default and not _first_row_longer(path, sep):
        return None
    return _first_row_error(path, sep, lambda n, n_header: n > n_header) or f"{path}: rows longer than the header"


def _first_records(path: str | os.PathLike, sep: str) -> tuple[list[str], list[str]]:
    """The file's header and first data row as the csv module splits them (blank lines skipped, as pandas
    does); empty lists where there are none or the file cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            records = (r for r in csv.reader(fh, delimiter=sep) if r and not (len(r) == 1 and not r[0].strip()))
            return next(records, []), next(records, [])
    except (OSError, csv.Error):
        return [], []


def _first_row_longer(path: str | os.PathLike, sep: str) -> bool:
    """Whether the file's first non-blank data row has more fields than its header."""
    header, first = _first_records(path, sep)
    return len(first) > len(header)


def short_row_error(path: str | os.PathLike, sep: str) -> str | None:
    """``"<path>:<line>: <n> fields where the header has <m>"`` for the first non-blank row shorter than the
    header (pandas fills the missing fields with NaN, and the error named a column "empty"), else None."""
    return _first_row_error(path, sep, lambda n, n_header: 0 < n < n_header)


def _first_row_error(path: str | os.PathLike, sep: str, wrong: Callable[[int, int], bool]) -> str | None:
    """The file's first row whose field count is ``wrong(n_fields, n_header)``, as a one-line message naming its
    line; None when there is none."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        rows = csv.reader(fh, delimiter=sep)
        n_header = len(next(rows, []))
        for row in rows:
            if wrong(len(row), n_header):
                return f"{path}:{rows.line_num}: {len(row)} fields where the header has {n_header}"
    return None


def read_tsv(path: str | os.PathLike, *, what: str, error: type[Exception], required: Sequence[str] = (),
             strip: Sequence[str] = ("series_uid", "subset"), **read_csv_kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv(path, sep="\\t", **read_csv_kwargs)`` with its failures raised as ``error`` (one line).

    ``what`` names the table in the missing-file message ("splits file"); ``required`` are the columns the header
    must have (others are allowed, order is free). Parse and dtype errors of pandas (ValueError, TypeError) and
    OS errors other than a missing file (a directory, no permission) are "not a readable TSV". Header cells and
    the text of the ``strip`` columns lose surrounding spaces (a table edited by hand: ``"series_uid "`` matched
    no column, a UID with a trailing space no scan); a table saved with commas instead of tabs is said so.
    """
    spaced = {cell: cell.strip() for cell in _first_records(path, "\t")[0] if cell != cell.strip()}
    for key in ("dtype", "na_values"):  # per-column settings apply to a header cell with spaces around it too
        value = read_csv_kwargs.get(key)
        if spaced and isinstance(value, dict):
            read_csv_kwargs[key] = {**value, **{cell: value[name] for cell, name in spaced.items() if name in value}}
    try:
        frame = pd.read_csv(path, sep="\t", **read_csv_kwargs)
    except FileNotFoundError as exc:
        raise error(f"{path}: no such {what}") from exc
    except (OSError, ValueError, TypeError) as exc:  # ParserError, EmptyDataError, UnicodeDecodeError are ValueErrors
        raise error(long_row_error(path, exc, "\t") or f"{path}: not a readable TSV ({first_line(exc)})") from exc
    message = long_row_error(path, frame, "\t") if "index_col" not in read_csv_kwargs else None
    # a short row's missing fields are NaN (or "" without NA parsing): only then look for one
    if message is None and (frame.isna().to_numpy().any() or (read_csv_kwargs.get("keep_default_na") is False
                                                              and (frame == "").to_numpy().any())):
        message = short_row_error(path, "\t")
    if message:
        raise error(message)
    frame.columns = [c.strip() if isinstance(c, str) else c for c in frame.columns]
    missing = [column for column in required if column not in frame.columns]
    if missing and len(frame.columns) == 1 and "," in str(frame.columns[0]):
        raise error(f"{path}:1: not tab-separated (the header is split by commas: saved as CSV?); the pipeline's "
                    f"tables are TSV with the columns {', '.join(required)}")
    if missing:
        raise error(f"{path}:1: missing column(s) {', '.join(missing)} (has {', '.join(map(str, frame.columns))})")
    for column in strip:
        if column in frame.columns and not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].str.strip()
    return frame


def numeric_column(frame: pd.DataFrame, column: str, path: str | os.PathLike, error: type[Exception], *,
                   allow_missing: bool = False,
                   rows: Sequence[int] | np.ndarray | pd.Series | None = None) -> pd.Series:
    """``frame[column]`` as numbers; the first value that is not one raises ``error`` naming its file line.

    An empty cell (NA) is an error unless ``allow_missing`` (then it stays NaN). ``rows`` gives each row's
    position in the table read from the file when the frame is not that whole table in order (default: its
    own positions); :func:`file_line` turns a position into the file's line.
    """
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() if not allow_missing else values.isna() & frame[column].notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        line = file_line(path, int(np.asarray(rows)[i]) if rows is not None else i)
        value = frame[column].iloc[i]
        if pd.isna(value):
            raise error(f"{path}:{line}: {column} is empty, expected a number")
        raise error(f"{path}:{line}: {column} = {value!r} is not a number")
    return values
