"""The crop stage, luna-crops: one subset of candidates.tsv -> ``crops/{subset}.h5`` (layout: luna.store).

Every candidate whose centre lies inside its scan gets an int16 crop, HU clipped to the window, placed by the
border rule (luna.cropping); the others go to ``<store name>.skipped.tsv`` with the reason. Each scan's result is
memoized in the resume cache (luna.crop_cache), so a killed job reruns only the scans it had not finished.
The cache is removed once the store is committed: LUNA16 V2 is ~110 GB of crops, no second copy is kept.
A run that fails (killed, a bad scan, out of disk space) keeps what the cache holds, by design: the next run
resumes from it and writes the same store as an uninterrupted run; the failing run logs where it is and how many
scans it holds (delete it to start afresh). A cache this run created and left empty is removed.

Outputs are checked before the work: the output, skipped-table and cache folders must be writable, the store's
room is reserved (luna.store) and the cache's free space checked, so a full disk or a read-only folder is one
line naming the path, exit 2, at the start. A write that still fails later (another job filled the disk) is the
same one line; no store, skipped table or temp file is left at the declared paths. Contracts: docs/design.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import diskcache
import numpy as np
import pandas as pd

from luna.app import StageApp, deferred_sigint, raise_for
from luna.crop_cache import (CACHE_BYTES_PER_SCAN, cache_error, cache_get, cache_key, cache_put, check_cache_folder,
                              clear_cache_folder, complete_entries, open_cache, remove_cache_folder)
from luna.cropping import (DEFAULT_CROP_SHAPE, DEFAULT_HU_WINDOW, MIN_CROP_SIZE, check_window, crop_start,
                           cut_scan_crops)
from luna.ct import ScanError, read_geometry, read_scan, scan_identity
from luna.geometry import Geometry, is_inside, xyz_to_irc
from luna.io import (NA_REP, OutputError, check_not_an_input, check_outside_scan_folders, check_writable_dir,
                     describe_os_error, locked, named_output, write_tsv)
from luna.progress import format_eta
from luna.store import COMPRESSIONS, StoreWriter, free_bytes, hdf5_left_broken
from luna.tables import file_line, numeric_column, read_tsv

logger = logging.getLogger(__name__)

DEFAULT_COMPRESSION = "none"  # chosen by benchmarks/crops.py, see benchmarks/results/crops.md
SKIPPED_COLUMNS = ["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z", "reason"]
REQUIRED_COLUMNS = ["candidate_id", "series_uid", "subset", "coord_x", "coord_y", "coord_z", "is_nodule", "diameter_mm"]


class CropError(ValueError):
    """Bad input to the crop stage; the one-line message names the file (and row or value)."""


@dataclass
class _ScanJob:
    """One scan of the subset: its candidate rows and what the header says (filled by the pre-pass)."""

    series_uid: str
    path: Path
    positions: np.ndarray  # row positions in the subset table (TSV order)
    centers_xyz: np.ndarray  # (n, 3)
    error: str | None = None
    geometry: Geometry | None = None
    shape_irc: tuple[int, int, int] | None = None
    identity: tuple | None = None
    center_irc: np.ndarray | None = None
    start_irc: np.ndarray | None = None
    inside: np.ndarray | None = None
    out_rows: np.ndarray | None = None  # store rows of the inside candidates


@dataclass
class CropResult:
    """What one run of the crop stage did."""

    out: Path
    skipped: Path
    n_candidates: int
    n_cropped: int
    n_outside: int
    n_bad_scan_rows: int
    bad_scans: list[str] = field(default_factory=list)
    n_scans: int = 0
    n_scans_from_cache: int = 0
    n_scans_read: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # summed over threads: where the time went


def _cell(value: object) -> str:
    """A table cell as its file spelled it (near enough): 2 for 2.0, inf, 1.5, text as is."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _check_unique_ids(df: pd.DataFrame, path: Path) -> None:
    """candidate_id keys a candidate through crops, predictions and the submission: a repeat is an error naming
    both lines (the whole table, every subset)."""
    ids = pd.to_numeric(df["candidate_id"], errors="coerce")
    repeated = ids.notna() & ids.duplicated(keep=False)
    if repeated.any():
        value = ids[repeated].iloc[0]
        lines = [file_line(path, row) for row in df.loc[repeated & (ids == value), "file_row"].tolist()[:2]]
        raise CropError(f"{path}:{lines[1]}: candidate_id {_cell(value)} repeats line {lines[0]}; candidate ids "
                        "must be unique")


def read_subset_candidates(path: str | os.PathLike, subset: str, allow_empty: bool = False) -> pd.DataFrame:
    """The rows of candidates.tsv whose subset is ``subset``, in file order, checked; is_nodule -1 when empty.

    No row of the subset is an error (a typo in --subset must not give an empty store) unless ``allow_empty``."""
    path = Path(path)
    # only an empty cell is missing, and in is_nodule the pipeline's NaN (luna-candidates without a class
    # column): a literal "NaN" coordinate is a bad value and said so
    missing = {column: [""] for column in REQUIRED_COLUMNS} | {"is_nodule": ["", NA_REP]}
    df = read_tsv(path, what="candidates table", error=CropError, required=REQUIRED_COLUMNS,
                  dtype={"series_uid": str, "subset": str}, keep_default_na=False, na_values=missing)
    df["file_row"] = np.arange(len(df))  # position in the file's table: file_line() names its line on an error
    _check_unique_ids(df, path)
    df["subset"] = df["subset"].str.strip()  # "subset0 " (an edited table) matched no --subset: rows lost silently
    present = sorted(set(df["subset"].dropna().astype(str)))
    df = df[df["subset"] == subset].reset_index(drop=True)
    if df.empty and not allow_empty:  # a typo in --subset must not give an empty store
        shown = ", ".join(present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        has = f"its subsets are {shown}" if present else "it has no rows"
        raise CropError(f"{path}: no candidates of subset {subset!r} ({has})")
    for col in ("candidate_id", "coord_x", "coord_y", "coord_z", "diameter_mm", "is_nodule"):
        values = numeric_column(df, col, path, CropError, allow_missing=col == "is_nodule", rows=df["file_row"])
        bad = pd.Series(~np.isfinite(values.fillna(0).to_numpy(dtype=np.float64)), index=values.index)
        if col == "is_nodule":
            bad |= ~values.fillna(-1).isin([-1, 0, 1])
        if col == "candidate_id":  # >= 0 as luna-evaluate requires, said now rather than after the training
            bad |= (values.fillna(0) != np.floor(values.fillna(0))) | (values.fillna(0) < 0)
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            need = {"is_nodule": "-1, 0, 1 or empty", "candidate_id": "a whole number >= 0"}.get(col, "a finite number")
            raise CropError(f"{path}:{file_line(path, df['file_row'].iloc[i])}: {col} = {_cell(df[col].iloc[i])}, "
                            f"expected {need}")
        df[col] = values
    df["candidate_id"] = df["candidate_id"].astype(np.int64)
    df["is_nodule"] = df["is_nodule"].fillna(-1).astype(np.int8)
    df["diameter_mm"] = df["diameter_mm"].astype(np.float32)
    empty_uid = df["series_uid"].isna() | (df["series_uid"].astype(str).str.strip() == "")
    if empty_uid.any():
        i = int(np.argmax(empty_uid.to_numpy()))
        raise CropError(f"{path}:{file_line(path, df['file_row'].iloc[i])}: empty series_uid")
    return df


class CropApp(StageApp):
    """Crop stage: cut every candidate of one subset of candidates.tsv out of its scan into crops/{subset}.h5.

    Candidates whose centre lies outside their scan (and, with --on-bad-scan skip, those of unreadable scans)
    are listed in the skipped table. Scans are processed in parallel threads; each scan's crops are cached at
    --cache-dir so a killed or failed job resumes; the cache is removed after the store is complete. The output
    folders and the free space for the store and the cache are checked before any scan is read.
    """

    prog = "luna-crops"
    errors = (CropError, ScanError, OutputError)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--candidates", required=True, help="candidates.tsv written by luna-candidates")
        parser.add_argument("--root", required=True, help="data folder holding <subset>/<series_uid>.mhd")
        parser.add_argument("--subset", required=True, help="subset to crop (rows of candidates.tsv with this subset)")
        parser.add_argument("--out", required=True, help="output crop store, e.g. results/crops/subset0.h5")
        parser.add_argument("--skipped", default=None,
                            help="skipped-candidates table; default: <out dir>/<out name without .h5>.skipped.tsv "
                                 "(results/crops/subset0.skipped.tsv for --out results/crops/subset0.h5)")
        parser.add_argument("--cache-dir", default=None,
                            help="this subset's resume cache (diskcache): a new or empty folder, or an earlier "
                                 "run's cache; removed whole after success; default: <out dir>/.<out name>.cache")
        parser.add_argument("--threads", type=int, default=1, help="scans read and cut in parallel threads")
        parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_CROP_SHAPE), metavar=("I", "R", "C"),
                            help="crop shape in voxels, (index, row, col) = (z, y, x)")
        parser.add_argument("--hu-window", type=int, nargs=2, default=list(DEFAULT_HU_WINDOW), metavar=("LO", "HI"),
                            help="HU are clipped to [LO, HI]; voxels outside the scan get LO")
        parser.add_argument("--on-bad-scan", choices=("fail", "skip"), default="fail",
                            help="a missing/unreadable/truncated scan: fail the job (exit 2), or skip its candidates")
        parser.add_argument("--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
                            help="HDF5 compression of the crops (benchmarks/results/crops.md)")
        parser.add_argument("--allow-empty-subset", action="store_true",
                            help="a subset without candidate rows gives an empty store (with a warning) instead of an "
                                 "error; the workflow sets it, since it crops every subset folder it was given")

    # ---- entry points

    def main(self) -> int:
        """Run; on bad input or an output that cannot be written print one line to stderr and return 2.

        When a store write failed inside HDF5 (see luna.store) the process ends here with ``os._exit(2)``:
        HDF5 would crash (segfault) closing the abandoned file at exit."""
        code = super().main()
        if code and hdf5_left_broken():
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    def run(self) -> CropResult:
        """Run the stage; raises CropError/ScanError on bad input, leaving no store (nor temp) behind."""
        a = self.args
        self.crop_shape = tuple(int(v) for v in a.shape)
        if min(self.crop_shape) < 1:
            raise CropError(f"--shape must be positive, got {list(a.shape)}")
        if min(self.crop_shape) < MIN_CROP_SIZE:  # a store for other uses; luna-train refuses it, after the cropping
            logger.warning("--shape %s: LunaModel needs each size >= %d (four 2x max-pools); luna-train will refuse "
                           "these crops", " ".join(map(str, self.crop_shape)), MIN_CROP_SIZE)
        try:
            self.hu_window = check_window(a.hu_window)
        except ValueError as exc:
            raise CropError(f"--hu-window: {exc}") from exc
        if a.threads < 1:
            raise CropError(f"--threads must be >= 1, got {a.threads}")
        self.out = named_output(a.out, "--out", "crop store to write (crops/subset0.h5)")
        # named after the store, not the subset: a second store of one subset in the folder (another shape or HU
        # window) removed the first one's table
        self.skipped_path = Path(a.skipped) if a.skipped else self.out.parent / f"{self.out.stem}.skipped.tsv"
        self.cache_dir = Path(a.cache_dir) if a.cache_dir else self.out.parent / f".{self.out.name}.cache"
        self.root = Path(a.root)
        self._cache: diskcache.Cache | None = None  # opened once the store's room is reserved
        self._cache_unreadable = False
        self._cache_was_empty_folder = False  # --cache-dir: an empty folder of the user's (kept, emptied)
        self._interrupted: Callable[[], int] = lambda: 0  # Ctrl-C/SIGTERM came (deferred_sigint, in the crop loop)
        t0 = time.perf_counter()

        table = read_subset_candidates(a.candidates, a.subset, allow_empty=a.allow_empty_subset)
        self._check_output_folders()
        # one luna-crops at a time per store and per resume cache: a second run on one --out deleted the first's
        # live temp store, and the first then removed the second's skipped table; two on one cache left an
        # orphaned half of it that refused every later run. Hidden lock files beside them, removed at the end
        with contextlib.ExitStack() as locks:
            for target, what in ((self.out, "crop store"), (self.cache_dir, "resume cache")):
                target.parent.mkdir(parents=True, exist_ok=True)
                path = target.parent / f".{target.name}.lock"
                locks.enter_context(locked(path, f"{target}: the {what} is in use by another luna-crops run "
                                                 f"({path} is locked); wait for it, or give this run its own --out "
                                                 "and --cache-dir"))
            return self._run_locked(table, t0)

    def _run_locked(self, table: pd.DataFrame, t0: float) -> CropResult:
        a = self.args
        jobs = self._make_jobs(table)
        if not jobs:
            logger.warning("%s: no candidates of subset %s; writing an empty store", a.candidates, a.subset)

        try:
            # Ctrl-C is checked between scans: raised anywhere, it was often lost in a thread pool's weakref callback
            with deferred_sigint() as self._interrupted, \
                    ThreadPoolExecutor(max_workers=a.threads, thread_name_prefix="crops") as pool:
                for job in pool.map(self._inspect, jobs):  # pre-pass: headers only, fast; bad files found here
                    self._stop_if_interrupted()
                    if job.error is not None and a.on_bad_scan == "fail":
                        raise CropError(job.error)
                    if job.error is not None:
                        logger.warning("bad scan, its candidates are skipped: %s", job.error)
                # only now: a rerun with a mistyped --root or a bad scan header keeps the previous store (hours
                # of work on LUNA16); removed before the new one reserves its room
                self._remove_old_outputs()
                result = self._crop_all(pool, table, jobs)
        except BaseException:
            self._keep_cache_if_useful()  # the workers are done: the count of cached scans is final
            raise
        self._cache.close()
        remove_cache_folder(self.cache_dir)
        result.seconds = time.perf_counter() - t0
        n_bad = len(result.bad_scans)
        logger.info("wrote %s: %d crops of %d scans (%d scans from cache%s) in %.1f s; removed cache %s",
                    self.out, result.n_cropped, result.n_scans - n_bad, result.n_scans_from_cache,
                    f"; {n_bad} bad scan(s) skipped, listed in {self.skipped_path}" if n_bad else "", result.seconds,
                    self.cache_dir)
        return result

    # ---- steps

    def _stop_if_interrupted(self) -> None:
        raise_for(self._interrupted())

    def _check_output_folders(self) -> None:
        """Every folder the run writes can be written (created if missing), and no output is an input or lies in
        the subset's scan folder, before any scan is read or any earlier output removed."""
        a = self.args
        for path, option in ((self.out, "--out"), (self.skipped_path, "--skipped")):
            check_not_an_input(path, {"--candidates": [a.candidates]}, what=option)
            check_outside_scan_folders(path, [self.root / a.subset / "scan.mhd"], what=option, root=self.root)
        if self.out.resolve() == self.skipped_path.resolve():
            raise OutputError(f"--out {self.out} and --skipped {self.skipped_path} are one file; name two")
        check_writable_dir(self.out.parent, "output folder")
        for path, option in ((self.out, "--out"), (self.skipped_path, "--skipped")):
            if path.is_dir():
                raise OutputError(f"{path}: is a folder; {option} names a file")
        if self.skipped_path.parent != self.out.parent:
            check_writable_dir(self.skipped_path.parent, "folder of the skipped table")
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise OutputError(f"{self.cache_dir}: resume cache folder is a file")
        check_cache_folder(self.cache_dir, [("data folder", self.root), ("output folder", self.out.parent),
                                            ("folder of the skipped table", self.skipped_path.parent)])
        # an empty folder of the user's stays a folder; a new one, or an earlier run's cache, may go whole
        self._cache_was_empty_folder = self.cache_dir.is_dir() and not any(self.cache_dir.iterdir())
        # the cache folder itself only when it exists (a resumed run): a failed check must not leave one behind
        if self.cache_dir.is_dir():
            check_writable_dir(self.cache_dir, "resume cache folder")
        elif self.cache_dir.parent != self.out.parent:
            check_writable_dir(self.cache_dir.parent, "folder of the resume cache")

    def _remove_old_outputs(self) -> None:
        """A previous store/skipped table and temp files left by a killed job: a rerun replaces them."""
        for path in (self.out, self.skipped_path):
            try:
                if path.exists():
                    logger.info("removing previous %s", path)
                    path.unlink()
                for tmp in path.parent.glob(f".{path.name}.*.tmp"):
                    logger.info("removing temp file %s left by an earlier run", tmp)
                    tmp.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"{path}: cannot remove the previous output ({describe_os_error(exc)})") from exc

    def _keep_cache_if_useful(self) -> None:
        """After a failure: a cache holding finished scans is kept for the next run (and said so); one without
        any is removed (an empty folder the user gave as --cache-dir is emptied of luna's files, and stays)."""
        n_scans = None  # not known: the cache was not opened by this run, or cannot be read
        if self._cache is None and self._cache_was_empty_folder:
            n_scans = 0  # the user's empty folder, never opened: nothing in it to keep or say
        if self._cache is not None:
            n_scans = complete_entries(self._cache)
            self._cache.close()
        if not self.cache_dir.is_dir() or self._cache_unreadable:
            return
        if n_scans == 0:
            if self._cache_was_empty_folder:
                clear_cache_folder(self.cache_dir)
            else:
                remove_cache_folder(self.cache_dir)
            return
        logger.warning("kept the resume cache %s%s: a rerun resumes from it (delete it to start afresh)",
                       self.cache_dir, f" ({n_scans} scans)" if n_scans is not None else "")

    def _check_cache_space(self, cache: diskcache.Cache, jobs: list[_ScanJob]) -> None:
        """The crops not cached yet fit in the cache's file system (after the store's reservation, when both
        share one), so a full disk stops the run now and not after hours."""
        crop_bytes = int(np.prod(self.crop_shape)) * 2
        need = 0
        try:
            for job in jobs:
                if job.error is None and job.inside.any():
                    key = cache_key(job.identity, self.crop_shape, self.hu_window, job.centers_xyz)
                    if (*key, "rows") not in cache:
                        need += int(job.inside.sum()) * crop_bytes + CACHE_BYTES_PER_SCAN
            free = free_bytes(self.cache_dir)
        except (OSError, sqlite3.Error) as exc:
            raise cache_error(self.cache_dir, exc) from exc
        if need > free:
            raise OutputError(f"{self.cache_dir}: not enough space for the resume cache (it needs "
                              f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free)")

    def _make_jobs(self, table: pd.DataFrame) -> list[_ScanJob]:
        jobs = []
        centers = table[["coord_x", "coord_y", "coord_z"]].to_numpy(dtype=np.float64)
        groups = table.groupby("series_uid", sort=False).indices
        for uid in pd.unique(table["series_uid"]):  # scans in order of first appearance in the table
            positions = np.sort(np.asarray(groups[uid], dtype=np.int64))
            jobs.append(_ScanJob(str(uid), self.root / self.args.subset / f"{uid}.mhd", positions, centers[positions]))
        return jobs

    def _inspect(self, job: _ScanJob) -> _ScanJob:
        """Header, data-file checks, identity and each candidate's voxel and crop start, without the voxels."""
        try:
            job.geometry, job.shape_irc = read_geometry(job.path)
            job.identity = self._identity(job.path)
        except ScanError as exc:
            job.error = str(exc)
            return job
        job.center_irc = xyz_to_irc(job.centers_xyz, job.geometry)
        job.inside = is_inside(job.center_irc, job.shape_irc)
        job.start_irc = crop_start(job.center_irc, self.crop_shape, job.shape_irc)
        return job

    @staticmethod
    def _identity(path: Path) -> tuple:
        try:
            return scan_identity(path)
        except OSError as exc:
            raise ScanError(f"{path}: scan file vanished ({exc.strerror})") from exc

    def _plan_rows(self, jobs: list[_ScanJob], n_rows: int) -> np.ndarray:
        """Store rows of the kept candidates (TSV order); returns the kept mask over the subset table."""
        keep = np.zeros(n_rows, dtype=bool)
        for job in jobs:
            if job.error is None:
                keep[job.positions[job.inside]] = True
        out_index = np.cumsum(keep) - 1
        for job in jobs:
            if job.error is None:
                job.out_rows = out_index[job.positions[job.inside]]
        return keep

    def _process(self, job: _ScanJob, cache: diskcache.Cache) -> tuple[np.ndarray, bool, dict[str, float]]:
        """One scan's crops (cached); returns (crops, from_cache, seconds per phase). Runs in a worker thread."""
        times: dict[str, float] = {}
        if not job.inside.any():  # nothing to cut: the voxels are not needed
            return np.zeros((0, *self.crop_shape), dtype=np.int16), False, times
        key = cache_key(job.identity, self.crop_shape, self.hu_window, job.centers_xyz)
        rows_expected = {"center_irc": job.center_irc, "crop_start_irc": job.start_irc, "inside": job.inside}
        t0 = time.perf_counter()
        try:
            hit = cache_get(cache, key)
        except (OSError, sqlite3.Error) as exc:
            raise cache_error(self.cache_dir, exc) from exc
        times["cache read"] = time.perf_counter() - t0
        if hit is not None:
            crops, rows = hit
            if crops.shape == (int(job.inside.sum()), *self.crop_shape) and all(
                    np.array_equal(rows.get(k), v) for k, v in rows_expected.items()):
                return crops, True, times
        t0 = time.perf_counter()
        volume, geometry = read_scan(job.path)
        times["scan read"] = time.perf_counter() - t0
        if geometry != job.geometry or volume.shape != job.shape_irc or self._identity(job.path) != job.identity:
            raise ScanError(f"{job.path}: scan changed while the crop job ran")
        t0 = time.perf_counter()
        crops, center_irc, start_irc, inside = cut_scan_crops(volume, geometry, job.centers_xyz,
                                                              self.crop_shape, self.hu_window)
        del volume
        times["cut"] = time.perf_counter() - t0
        rows = {"center_irc": center_irc, "crop_start_irc": start_irc, "inside": inside}
        if not all(np.array_equal(rows[k], v) for k, v in rows_expected.items()):
            raise RuntimeError(f"{job.path}: crop placement differs between header and volume")  # a bug, not input
        t0 = time.perf_counter()
        try:
            cache_put(cache, key, crops, rows)
        except (OSError, sqlite3.Error) as exc:
            raise cache_error(self.cache_dir, exc) from exc
        times["cache write"] = time.perf_counter() - t0
        return crops, False, times

    def _crop_all(self, pool: ThreadPoolExecutor, table: pd.DataFrame, jobs: list[_ScanJob]) -> CropResult:
        """Reserve the store, open the cache, then cut (or take from the cache) and write every good scan."""
        a = self.args
        keep = self._plan_rows(jobs, len(table))
        fields_all = {
            "candidate_id": table["candidate_id"].to_numpy(np.int64),
            "series_uid": table["series_uid"].astype(str).to_numpy(),
            "center_xyz": table[["coord_x", "coord_y", "coord_z"]].to_numpy(np.float64),
            "is_nodule": table["is_nodule"].to_numpy(np.int8),
            "diameter_mm": table["diameter_mm"].to_numpy(np.float32),
        }
        late_bad: list[_ScanJob] = []
        n_from_cache = n_read = 0
        n_total = len(jobs)
        good = [j for j in jobs if j.error is None]
        n_done = n_total - len(good)  # bad scans (skip mode) are done already
        writer = StoreWriter(self.out, int(keep.sum()), self.crop_shape, self.hu_window, subset=a.subset,
                             compression=a.compression, n_scans=len(good))  # reserves the store's room
        t0 = time.perf_counter()
        n_crops = 0
        phase_s: dict[str, float] = {}
        pending: dict[Future, _ScanJob] = {}
        wrote_skipped = False
        try:
            try:
                cache = self._cache = open_cache(self.cache_dir)
            except OutputError:
                self._cache_unreadable = True  # the error says what to do; no "a rerun resumes from it"
                raise
            self._check_cache_space(cache, jobs)
            queue = iter(good)
            max_in_flight = a.threads + 1  # bounds memory: volumes being cut + results waiting to be written

            def submit_next() -> None:
                job = next(queue, None)
                if job is not None:
                    pending[pool.submit(self._process, job, cache)] = job

            for _ in range(max_in_flight):
                submit_next()
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                self._stop_if_interrupted()
                for future in done:
                    job = pending.pop(future)
                    try:
                        crops, from_cache, times = future.result()
                        for phase, seconds in times.items():
                            phase_s[phase] = phase_s.get(phase, 0.0) + seconds
                        status = "from cache" if from_cache else ("read" if job.inside.any() else "no crops")
                    except ScanError as exc:
                        status = "bad scan"
                        if a.on_bad_scan == "fail":
                            raise
                        job.error = str(exc)
                        late_bad.append(job)
                        logger.warning("bad scan, its candidates are skipped: %s", exc)
                    else:
                        n_from_cache += from_cache
                        n_read += (not from_cache) and bool(job.inside.any())
                        t_write = time.perf_counter()
                        self._write_scan(writer, job, crops, fields_all)
                        phase_s["store write"] = phase_s.get("store write", 0.0) + time.perf_counter() - t_write
                        n_crops += len(job.out_rows)
                    n_done += 1
                    elapsed = time.perf_counter() - t0
                    # the rate of scans read here (a cached scan takes a fraction of that): unknown until one is
                    eta = format_eta(elapsed / n_read * (n_total - n_done)) if n_read else "unknown"
                    logger.info("scan %d/%d done (%s) %s: %d crops; %d crops in %.1f s (%.1f crops/s), ETA %s",
                                n_done, n_total, status, job.series_uid,
                                0 if job.error else len(job.out_rows), n_crops, elapsed,
                                n_crops / max(elapsed, 1e-9), eta)
                    submit_next()
            if late_bad:  # a scan failed only when its voxels were read: rows change, rebuild from the cache
                writer.abort()
                keep = self._plan_rows(jobs, len(table))
                writer = StoreWriter(self.out, int(keep.sum()), self.crop_shape, self.hu_window, subset=a.subset,
                                     compression=a.compression, n_scans=len(good) - len(late_bad))
                for job in jobs:
                    self._stop_if_interrupted()
                    if job.error is None:
                        crops, _, _ = self._process(job, cache)
                        self._write_scan(writer, job, crops, fields_all)
            self._stop_if_interrupted()  # the last point before the outputs are written
            skipped = self._skipped_table(table, jobs)
            write_tsv(skipped, self.skipped_path)
            wrote_skipped = True
            t_commit = time.perf_counter()
            writer.commit()
            phase_s["store write"] = phase_s.get("store write", 0.0) + time.perf_counter() - t_commit
        except BaseException:
            for other in pending:  # nothing new starts; the running ones finish before the pool closes
                other.cancel()
            writer.abort()
            if wrote_skipped:  # the store failed to commit: no skipped table without its store
                self.skipped_path.unlink(missing_ok=True)
            raise
        n_outside = int((skipped["reason"].str.startswith("outside scan")).sum())
        bad_scans = [str(j.path) for j in jobs if j.error is not None]
        n_nodules = int(table.loc[table["candidate_id"].isin(skipped["candidate_id"]), "is_nodule"].eq(1).sum())
        # a warning when any is: a wrong origin in a header puts every candidate of its scan outside
        logger.log(logging.WARNING if len(skipped) else logging.INFO,
                   "%d candidates skipped (outside scan: %d, bad scan: %d; %d of them nodules); listed in %s",
                   len(skipped), n_outside, len(skipped) - n_outside, n_nodules, self.skipped_path)
        logger.info("%d of %d scans from cache, %d read", n_from_cache, n_total, n_read)
        logger.info("time per phase (s, summed over threads): %s",
                    ", ".join(f"{k} {v:.2f}" for k, v in sorted(phase_s.items())))
        return CropResult(self.out, self.skipped_path, len(table), int(keep.sum()), n_outside,
                          len(skipped) - n_outside, bad_scans, n_total, n_from_cache, n_read, phase_seconds=phase_s)

    def _write_scan(self, writer: StoreWriter, job: _ScanJob, crops: np.ndarray, fields_all: dict) -> None:
        writer.add_scan(job.series_uid, job.geometry, job.shape_irc)
        rows = job.positions[job.inside]
        fields = {name: values[rows] for name, values in fields_all.items()}
        fields["center_irc"] = job.center_irc[job.inside]
        fields["crop_start_irc"] = job.start_irc[job.inside]
        writer.write_rows(job.out_rows, crops, fields)

    def _skipped_table(self, table: pd.DataFrame, jobs: list[_ScanJob]) -> pd.DataFrame:
        reasons = np.full(len(table), "", dtype=object)
        for job in jobs:
            if job.error is not None:
                reasons[job.positions] = f"bad scan: {job.error}"
                continue
            for k in np.flatnonzero(~job.inside):
                reasons[job.positions[k]] = (f"outside scan: center_irc {tuple(int(v) for v in job.center_irc[k])} "
                                             f"not in shape_irc {tuple(job.shape_irc)}")
        mask = reasons != ""
        skipped = table.loc[mask, ["candidate_id", "series_uid", "coord_x", "coord_y", "coord_z"]].copy()
        skipped["reason"] = reasons[mask].astype(str)
        return skipped.reset_index(drop=True)[SKIPPED_COLUMNS]


main = CropApp.console


if __name__ == "__main__":
    main()
