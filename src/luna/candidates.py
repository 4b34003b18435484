"""LUNA16 tables: read and check the CSVs, match diameters, write candidates.tsv and the series-level split.

Every bad row is reported as one line naming the file and its line number. Candidate rows whose scan is not
on disk are counted and reported, never dropped in silence.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from luna.ct import ScanFile, find_scans
from luna.tables import read_tsv

logger = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "class"]
ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CANDIDATES_TSV_COLUMNS = ["candidate_id", "series_uid", "subset", "coord_x", "coord_y", "coord_z", "is_nodule", "diameter_mm"]


class TableError(ValueError):
    """A LUNA16 table with a bad header or row; the message names the file and line."""


def read_luna_csv(path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """Read a LUNA16 CSV, checking the header and that coordinates and numbers are numeric.

    Returns a DataFrame with ``seriesuid`` as str and every other named column as float64, plus a ``line``
    column (1-based line number in the file) for error messages downstream.
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise TableError(f"{path}:1: empty file, expected header {','.join(required)}")
    header = [h.strip() for h in header]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise TableError(f"{path}:1: duplicate column {name!r} in header")
        seen.add(name)
    missing = [c for c in required if c not in header]
    if missing:
        raise TableError(f"{path}:1: missing column {missing[0]!r} (header is {','.join(header)})")
    wanted = [c for c in (*required, *optional) if c in header]
    df = pd.read_csv(
        path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig",
        skipinitialspace=True, on_bad_lines="error", engine="c",
    ) if path.stat().st_size else pd.DataFrame(columns=header)
    df.columns = [c.strip() for c in df.columns]
    df = df[wanted]
    line = np.arange(len(df)) + 2
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
            raise TableError(f"{path}:{line[i]}: column {c} is not a finite number: {df[c].iloc[i]!r}")
        out[c] = values
    if "class" in out:
        bad = ~np.isin(out["class"].to_numpy(), [0.0, 1.0])
        if bad.any():
            i = int(np.argmax(bad))
            raise TableError(f"{path}:{line[i]}: column class must be 0 or 1, got {df['class'].iloc[i]!r}")
    if "diameter_mm" in out and "class" not in out:
        pass  # negative diameters are legal in annotations_excluded.csv (-1 = unknown)
    out["line"] = line
    return out


def read_candidates_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``candidates.csv`` / ``candidates_V2.csv``; the class column is optional (predict-only lists)."""
    return read_luna_csv(path, CANDIDATE_COLUMNS[:4], optional=["class"])


def read_annotations_csv(path: str | os.PathLike, allow_negative: bool = False) -> pd.DataFrame:
    """``annotations.csv`` (diameters must be > 0) or, with allow_negative, ``annotations_excluded.csv``."""
    df = read_luna_csv(path, ANNOTATION_COLUMNS)
    if not allow_negative:
        bad = df["diameter_mm"].to_numpy() <= 0
        if bad.any():
            i = int(np.argmax(bad))
            raise TableError(f"{path}:{df['line'].iloc[i]}: diameter_mm must be > 0, got {df['diameter_mm'].iloc[i]}")
    return df


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


@dataclass
class CandidatesReport:
    """What building candidates.tsv kept and left out."""

    n_rows: int
    n_kept: int
    n_missing_scan_rows: int
    missing_scans: list[str]
    n_scans_on_disk: int
    n_positive: int

    def lines(self) -> list[str]:
        out = [
            f"{self.n_rows} candidate rows read, {self.n_kept} refer to the {self.n_scans_on_disk} scans on disk "
            f"({self.n_positive} positive)",
        ]
        if self.n_missing_scan_rows:
            shown = ", ".join(self.missing_scans[:3]) + (" ..." if len(self.missing_scans) > 3 else "")
            out.append(
                f"{self.n_missing_scan_rows} candidate rows left out: their {len(self.missing_scans)} scans are not "
                f"under the selected subsets ({shown})"
            )
        return out


def build_candidates_table(
    candidates_csv: str | os.PathLike, annotations_csv: str | os.PathLike | None, scans: dict[str, ScanFile]
) -> tuple[pd.DataFrame, CandidatesReport]:
    """candidates.tsv rows: every CSV row whose scan is on disk, in CSV order, with matched diameters."""
    cand = read_candidates_csv(candidates_csv)
    if annotations_csv is not None:
        ann = read_annotations_csv(annotations_csv)
        diameter = match_diameters(cand, ann)
    else:
        diameter = np.zeros(len(cand))
    on_disk = cand["seriesuid"].isin(scans.keys()).to_numpy()
    kept = cand[on_disk]
    table = pd.DataFrame({
        "candidate_id": np.flatnonzero(on_disk),
        "series_uid": kept["seriesuid"].to_numpy(),
        "subset": [scans[u].subset for u in kept["seriesuid"]],
        "coord_x": kept["coordX"].to_numpy(),
        "coord_y": kept["coordY"].to_numpy(),
        "coord_z": kept["coordZ"].to_numpy(),
        "is_nodule": (kept["class"].astype("int64").astype("Int8") if "class" in kept
                      else pd.array([pd.NA] * len(kept), dtype="Int8")),
        "diameter_mm": diameter[on_disk],
    })
    missing = sorted(set(cand.loc[~on_disk, "seriesuid"]))
    report = CandidatesReport(
        n_rows=len(cand), n_kept=len(table), n_missing_scan_rows=int((~on_disk).sum()), missing_scans=missing,
        n_scans_on_disk=len(scans),
        n_positive=int(table["is_nodule"].fillna(0).sum()) if len(table) else 0,
    )
    return table, report


def make_splits(series_uids: Sequence[str], subsets: dict[str, str] | None = None, val_stride: int = 10,
                val_subsets: Sequence[str] = ()) -> pd.DataFrame:
    """Series-level train/val split: no scan in both.

    Default: UIDs sorted as strings; 0-based position i goes to val when ``i % val_stride == 0``.
    With ``val_subsets``, every scan of those subsets is val and the rest train (LUNA16's folds).
    """
    uids = sorted(set(series_uids))
    if val_subsets:
        if subsets is None:
            raise ValueError("val_subsets needs each scan's subset")
        unknown = sorted(set(val_subsets) - set(subsets.values()))
        if unknown:
            raise ValueError(f"val_subsets names subsets with no scans: {', '.join(unknown)}")
        split = ["val" if subsets[u] in set(val_subsets) else "train" for u in uids]
    else:
        if val_stride < 2:
            raise ValueError(f"val_stride must be >= 2, got {val_stride}")
        split = ["val" if i % val_stride == 0 else "train" for i in range(len(uids))]
    return pd.DataFrame({"series_uid": uids, "split": split})


def write_tsv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a TSV atomically (temp file + rename); NaN/NA written as ``NaN`` for floats, empty for missing ints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        df.to_csv(tmp, sep="\t", index=False, na_rep="", float_format="%.10g")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_candidates_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """Read candidates.tsv back with its dtypes (is_nodule nullable Int8); errors as one-line TableError."""
    return read_tsv(path, what="candidates table", error=TableError, required=CANDIDATES_TSV_COLUMNS,
                    dtype={"series_uid": str, "subset": str, "is_nodule": "Int8"})


def resolve(root: str | os.PathLike, name: str | os.PathLike | None) -> Path | None:
    """A table path relative to the data root unless absolute."""
    if name is None or str(name) == "":
        return None
    p = Path(name)
    return p if p.is_absolute() else Path(root) / p


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class CandidatesApp:
    """Build results/candidates.tsv from a LUNA16 folder: check the CSVs, match diameters, keep on-disk scans."""

    def __init__(self, argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(prog="luna-candidates", description=self.__doc__,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        parser.add_argument("--root", required=True, help="data folder holding subset*/ and the CSVs")
        parser.add_argument("--candidates", default="candidates.csv", help="candidate CSV, relative to --root unless absolute")
        parser.add_argument("--annotations", default="annotations.csv",
                            help="annotation CSV for diameter matching, relative to --root; '' for none")
        parser.add_argument("--subsets", nargs="*", default=[], help="subset folders to use; none = every subset*")
        parser.add_argument("--out", required=True, help="output candidates.tsv")
        self.args = parser.parse_args(argv)

    def main(self) -> int:
        _setup_logging()
        a = self.args
        logger.info("Starting %s, %s", type(self).__name__, vars(a))
        try:
            scans = find_scans(a.root, a.subsets or None)
            table, report = build_candidates_table(
                resolve(a.root, a.candidates), resolve(a.root, a.annotations) if a.annotations else None, scans)
        except (TableError, FileNotFoundError, ValueError) as exc:
            print(f"luna-candidates: error: {exc}", file=sys.stderr)
            return 2
        lines = report.lines()
        logger.info(lines[0])
        for line in lines[1:]:
            logger.warning(line)
        write_tsv(table, a.out)
        logger.info("wrote %s (%d rows)", a.out, len(table))
        return 0


class SplitApp:
    """Write results/splits.tsv: a series-level train/val split of every scan under the selected subsets."""

    def __init__(self, argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(prog="luna-split", description=self.__doc__,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        parser.add_argument("--root", required=True, help="data folder holding subset*/")
        parser.add_argument("--subsets", nargs="*", default=[], help="subset folders to use; none = every subset*")
        parser.add_argument("--val-stride", type=int, default=10,
                            help="scan i (UIDs sorted as strings, 0-based) goes to val when i %% stride == 0")
        parser.add_argument("--val-subsets", nargs="*", default=[],
                            help="instead of the stride: every scan of these subsets is val (LUNA16 folds)")
        parser.add_argument("--out", required=True, help="output splits.tsv")
        self.args = parser.parse_args(argv)

    def main(self) -> int:
        _setup_logging()
        a = self.args
        logger.info("Starting %s, %s", type(self).__name__, vars(a))
        try:
            scans = find_scans(a.root, a.subsets or None)
            splits = make_splits(list(scans), {u: s.subset for u, s in scans.items()}, a.val_stride, a.val_subsets)
        except (FileNotFoundError, ValueError) as exc:
            print(f"luna-split: error: {exc}", file=sys.stderr)
            return 2
        write_tsv(splits, a.out)
        counts = splits["split"].value_counts()
        logger.info("wrote %s: %d train, %d val scans", a.out, counts.get("train", 0), counts.get("val", 0))
        return 0


def main_candidates() -> None:
    sys.exit(CandidatesApp().main())


def main_split() -> None:
    sys.exit(SplitApp().main())
