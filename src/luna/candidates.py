"""The candidates stage: the LUNA16 CSVs (read and checked by luna.luna16) -> candidates.tsv, ``luna-candidates``.

Every CSV row whose scan is on disk, in the CSV's order, with its matched diameter; candidate rows whose scan is
not on disk are counted and reported, never dropped in silence; repeated rows are dropped with one warning
(luna.luna16). The contract of candidates.tsv is in docs/design.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from luna.app import StageApp
from luna.ct import ScanError, ScanFile, find_scans
from luna.io import OutputError, check_not_an_input, check_outside_scan_folders, check_writable_dir, write_tsv
from luna.luna16 import (TableError, drop_duplicate_candidates, match_diameters, read_annotations_csv, read_candidates_csv,
                         resolve_table)
from luna.tables import read_tsv

logger = logging.getLogger(__name__)

CANDIDATES_TSV_COLUMNS = ["candidate_id", "series_uid", "subset", "coord_x", "coord_y", "coord_z", "is_nodule",
                          "diameter_mm"]


@dataclass
class CandidatesReport:
    """What building candidates.tsv kept and left out."""

    n_rows: int
    n_kept: int
    n_missing_scan_rows: int
    missing_scans: list[str]
    n_scans_on_disk: int
    n_positive: int
    duplicates: str = ""  # the warning line when duplicate rows were dropped
    labelled: bool = True  # the CSV has a class column
    unmatched_annotations: str = ""  # the warning line when annotations were given and no positive matched one

    def lines(self) -> list[str]:
        """The summary line, then one warning line per thing left out."""
        out = [
            f"{self.n_rows} candidate rows read, {self.n_kept} refer to the {self.n_scans_on_disk} scans on disk "
            + (f"({self.n_positive} positive)" if self.labelled else "(no class column: unlabelled)"),
        ]
        if not self.labelled:
            out.append("the candidates have no class column: fit for luna-predict, not for luna-train")
        if self.duplicates:
            out.append(self.duplicates)
        if self.unmatched_annotations:
            out.append(self.unmatched_annotations)
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
    """candidates.tsv rows: every CSV row whose scan is on disk, in CSV order, without repeated rows, with
    matched diameters; candidate_id is the row's number in the CSV (line - 2), repeats dropped or not."""
    cand = read_candidates_csv(candidates_csv)
    n_rows = len(cand)
    cand, duplicates = drop_duplicate_candidates(cand, candidates_csv)
    if annotations_csv is not None:
        ann = read_annotations_csv(annotations_csv)
        diameter = match_diameters(cand, ann)
    else:
        diameter = np.zeros(len(cand))
    on_disk = cand["seriesuid"].isin(scans.keys()).to_numpy()
    kept = cand[on_disk]
    table = pd.DataFrame({
        "candidate_id": kept["line"].to_numpy(dtype=np.int64) - 2,
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
        n_rows=n_rows, n_kept=len(table), n_missing_scan_rows=int((~on_disk).sum()), missing_scans=missing,
        n_scans_on_disk=len(scans),
        n_positive=int(table["is_nodule"].fillna(0).sum()) if len(table) else 0,
        duplicates=duplicates.line(candidates_csv) if duplicates.n_dropped else "",
        labelled="class" in cand,
    )
    if annotations_csv is not None and report.n_positive and not (table["diameter_mm"] > 0).any():
        n_on_disk = int(ann["seriesuid"].isin(scans.keys()).sum())
        report.unmatched_annotations = (
            f"{annotations_csv}: none of the {report.n_positive} positive candidates matched an annotation (within "
            f"diameter/4 of its centre), so every diameter_mm is 0; {n_on_disk} of its {len(ann)} rows are on the "
            "scans on disk: the annotations of another data set?")
    return table, report


def write_candidates_tsv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """candidates.tsv in the pipeline's one TSV format (luna.io.write_tsv: a missing class is ``NaN``)."""
    return write_tsv(table[CANDIDATES_TSV_COLUMNS], path)


def read_candidates_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """Read candidates.tsv back with its dtypes (is_nodule nullable Int8); errors as one-line TableError."""
    return read_tsv(path, what="candidates table", error=TableError, required=CANDIDATES_TSV_COLUMNS,
                    dtype={"series_uid": str, "subset": str, "is_nodule": "Int8"})


class CandidatesApp(StageApp):
    """Build results/candidates.tsv from a LUNA16 folder: check the CSVs, match diameters, keep on-disk scans."""

    prog = "luna-candidates"
    errors = (TableError, ScanError, OutputError, FileNotFoundError, ValueError)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", required=True, help="data folder holding subset*/ and the CSVs")
        parser.add_argument("--candidates", default="candidates.csv",
                            help="candidate CSV, relative to --root unless absolute")
        parser.add_argument("--annotations", default="annotations.csv",
                            help="annotation CSV for diameter matching, relative to --root; '' for none")
        parser.add_argument("--subsets", nargs="*", default=[], help="subset folders to use; none = every subset*")
        parser.add_argument("--out", required=True, help="output candidates.tsv")

    def run(self) -> pd.DataFrame:
        a = self.args
        check_writable_dir(Path(a.out).parent, "output folder")
        scans = find_scans(a.root, a.subsets or None)
        if not scans:  # every candidate row would be left out: a wrong --root or --subsets, not an empty result
            raise TableError(f"{a.root}: no scans (<series_uid>.mhd) under "
                             f"{', '.join(a.subsets) if a.subsets else 'any subset* folder'}")
        annotations = resolve_table(a.root, a.annotations)
        check_not_an_input(a.out, {"--candidates": [resolve_table(a.root, a.candidates)],
                                   "--annotations": [annotations]})
        check_outside_scan_folders(a.out, [scan.path for scan in scans.values()], root=a.root)
        if annotations is not None and not Path(annotations).exists():  # the default names a file: say how not to
            raise TableError(f"{annotations}: file not found (--annotations '' for a candidate list without "
                             "annotations)")
        table, report = build_candidates_table(resolve_table(a.root, a.candidates), annotations, scans)
        lines = report.lines()
        logger.info(lines[0])
        for line in lines[1:]:
            logger.warning(line)
        if report.n_kept == 0:  # a wrong CSV, or scans named otherwise: empty stores and a failed training later
            on_disk = sorted(scans)[:2]
            raise TableError(f"{resolve_table(a.root, a.candidates)}: none of its {report.n_rows} rows names one of "
                             f"the {len(scans)} scans on disk (the CSV names e.g. "
                             f"{', '.join(report.missing_scans[:2])}; on disk e.g. {', '.join(on_disk)})")
        write_candidates_tsv(table, a.out)
        logger.info("wrote %s (%d rows)", a.out, len(table))
        return table


main_candidates = CandidatesApp.console
