"""The HDF5 crop store: one file per subset, written atomically, read lazily (one handle per process).

Layout (format version 1), rows in candidates.tsv order:
  crops           int16 (N, I, R, C), HU clipped to the window, one crop per chunk
  candidate_id    int64 (N,)          the row's line number in the input candidates CSV minus 2
  series_uid      str (N,)
  center_xyz      float64 (N, 3)      world mm
  center_irc      int64 (N, 3)        nearest voxel of the centre
  crop_start_irc  int64 (N, 3)        where the crop starts in the scan (may be negative)
  is_nodule       int8 (N,)           -1 when the candidate list has no class column
  diameter_mm     float32 (N,)
  attrs: format_version, crop_shape, hu_window, subset, n_scans
  geometry/<series_uid> attrs: origin_xyz, spacing_xyz, direction (9), shape_irc
No timestamps are stored, so the same inputs give identical arrays wherever the job ran.

Writing is disk-full safe. HDF5 cannot recover from a failed write: the file can then neither be flushed nor
closed, and the library crashes (segfault) when it is closed or at exit. So :class:`StoreWriter` never lets HDF5
meet a full disk: it reserves the store's size up front (``fallocate`` of an upper bound: every crop
uncompressed plus per-row and per-scan metadata; HDF5 trims the file to its real size on close), so "no space"
is a one-line :class:`luna.io.OutputError` before any crop is cut. Where the file system cannot reserve space
(no ``fallocate``), the free space is checked instead. A compressed store whose bound does not fit is written
unreserved (it may well fit: only its metadata's room is required). Should a write still fail, the HDF5 file
is abandoned unclosed (its temp file removed) and :func:`hdf5_left_broken` tells the caller to end the process with
``os._exit`` rather than let HDF5 crash on the way out (luna-crops does).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from luna.geometry import Geometry
from luna.io import OutputError, describe_os_error

FORMAT_VERSION = 1
ROW_FIELDS = ("candidate_id", "series_uid", "center_xyz", "center_irc", "crop_start_irc", "is_nodule", "diameter_mm")
_ROW_DTYPES = {
    "candidate_id": np.int64,
    "center_xyz": np.float64,
    "center_irc": np.int64,
    "crop_start_irc": np.int64,
    "is_nodule": np.int8,
    "diameter_mm": np.float32,
}
COMPRESSIONS = ("none", "lzf", "gzip1", "gzip4")
# upper bounds of what a store holds beside the crops (measured: ~260 bytes per row, ~1.4 KiB per scan)
RESERVE_PER_ROW = 1024
RESERVE_PER_SCAN = 8192
RESERVE_BASE = 1 << 20

_ABANDONED: list[Any] = []  # HDF5 objects of stores whose writes failed: never closed, never finalized


def hdf5_left_broken() -> bool:
    """True when a store write failed and its HDF5 file was abandoned unclosed: end the process with
    ``os._exit`` (after flushing output), since HDF5 would crash trying to close it at exit."""
    return bool(_ABANDONED)


def _os_error_of(exc: BaseException) -> OSError:
    """h5py's OSError/RuntimeError of a failed write as an OSError with the errno its message reports."""
    if isinstance(exc, OSError) and exc.errno:
        return exc
    match = re.search(r"errno = (\d+)", str(exc))
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OSError(int(match.group(1)) if match else 0, message[:200])


def _fallocate(path: Path, size: int) -> bool:
    """Reserve ``size`` bytes for ``path`` (Linux ``fallocate``; no emulation by writing zeros); False where the
    file system or platform cannot, OSError (ENOSPC, EDQUOT, EFBIG) where there is not the room."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fallocate is None:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    fd = os.open(path, os.O_RDWR)
    try:
        before = os.fstat(fd).st_size
        if fallocate(fd, 0, 0, size) == 0:
            return True
        code = ctypes.get_errno()
        os.ftruncate(fd, before)  # a failed fallocate may leave blocks allocated: give them back
    finally:
        os.close(fd)
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code))


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged process may still write in ``folder``'s file system."""
    return shutil.disk_usage(folder).free


class StoreError(ValueError):
    """A crop store that cannot be read; the message names the file."""


def check_distinct_stores(paths: Sequence[str | os.PathLike]) -> None:
    """Each crop store once (its candidates would count twice): StoreError naming the repeat and the first."""
    seen: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise StoreError(f"{path}: crop store given twice (also as {seen[resolved]})")
        seen[resolved] = str(path)


def _compression_kwargs(compression: str) -> dict:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression.startswith("gzip"):
        return {"compression": "gzip", "compression_opts": int(compression[4:])}
    raise ValueError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")


class StoreWriter:
    """Write a store under a temporary name; ``commit()`` renames it into place, ``abort()`` removes it.

    The room for the whole store is reserved when it is created (see the module docstring): no space is an
    :class:`OutputError` naming the store here, not hours later. Any failed write is an OutputError naming it.
    Use as a context manager: leaving the block by an exception aborts, so a failed job leaves nothing that
    looks finished.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_rows: int,
        crop_shape: Sequence[int],
        hu_window: Sequence[int],
        subset: str = "",
        compression: str = "none",
        n_scans: int = 0,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.n_rows = int(n_rows)
        self.crop_shape = tuple(int(v) for v in crop_shape)
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._geometry: h5py.Group | None = None
        self._broken = False
        self._written = np.zeros(self.n_rows, dtype=bool)
        compression_kwargs = _compression_kwargs(compression) if self.n_rows else {}
        metadata_bytes = RESERVE_BASE + self.n_rows * RESERVE_PER_ROW + int(n_scans) * RESERVE_PER_SCAN
        self.reserve_bytes = metadata_bytes + self.n_rows * int(np.prod(self.crop_shape)) * 2
        # a compressed store needs less than the bound, by an amount known only once written: it is reserved when
        # the bound fits, else written unreserved (a disk filling later is then found later)
        required = self.reserve_bytes if compression == "none" else metadata_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if free_bytes(self.path.parent) < required:  # before HDF5 touches the disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            with self._hdf5():
                self._file = h5py.File(self.tmp_path, "w", track_order=False)
                self._create_layout(self._file, hu_window, subset, compression_kwargs)
                self._file.close()
                self._file = None
            try:
                _fallocate(self.tmp_path, self.reserve_bytes)
            except OSError as exc:
                if compression == "none" or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
            with self._hdf5():
                self._file = h5py.File(self.tmp_path, "r+")  # HDF5 trims the reserved tail when it closes
                self._datasets = {name: self._file[name] for name in ("crops", *ROW_FIELDS)}  # held open: errors
                self._geometry = self._file["geometry"]  # surface at the write, not in a destructor
        except OutputError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputError(
                    f"{self.path}: not enough space for the crop store ({describe_os_error(exc)}: it needs up to "
                    f"{self.reserve_bytes / 2**20:.1f} MiB, {free_bytes(self.path.parent) / 2**20:.1f} MiB "
                    "are free)") from exc
            raise OutputError(f"{self.path}: cannot write the crop store ({describe_os_error(exc)})") from exc
        except BaseException:
            self.abort()
            raise

    def _create_layout(self, f: h5py.File, hu_window: Sequence[int], subset: str, compression_kwargs: dict) -> None:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["crop_shape"] = np.asarray(self.crop_shape, dtype=np.int64)
        f.attrs["hu_window"] = np.asarray(hu_window, dtype=np.int64)
        f.attrs["subset"] = subset
        chunks = (1, *self.crop_shape) if self.n_rows else None
        f.create_dataset("crops", shape=(self.n_rows, *self.crop_shape), dtype=np.int16, chunks=chunks,
                         track_times=False, **compression_kwargs)
        for name, dtype in _ROW_DTYPES.items():
            shape = (self.n_rows, 3) if name in ("center_xyz", "center_irc", "crop_start_irc") else (self.n_rows,)
            f.create_dataset(name, shape=shape, dtype=dtype, track_times=False)
        f.create_dataset("series_uid", shape=(self.n_rows,), dtype=h5py.string_dtype("utf-8"), track_times=False)
        f.create_group("geometry", track_order=False)

    @contextlib.contextmanager
    def _hdf5(self) -> Iterator[None]:
        """HDF5 calls: a failure (h5py raises OSError or RuntimeError) marks the file broken (never to be closed
        again) and becomes an OutputError naming the store."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self._broken = True
            raise OutputError(f"{self.path}: cannot write the crop store ({describe_os_error(_os_error_of(exc))})"
                              ) from exc

    def add_scan(self, series_uid: str, geometry: Geometry, shape_irc: Sequence[int]) -> None:
        """Record one scan's geometry."""
        with self._hdf5():
            g = self._geometry.require_group(series_uid)
            g.attrs["origin_xyz"] = geometry.origin_xyz
            g.attrs["spacing_xyz"] = geometry.spacing_xyz
            g.attrs["direction"] = geometry.direction.reshape(9)
            g.attrs["shape_irc"] = np.asarray(shape_irc, dtype=np.int64)

    def write_rows(self, rows: Sequence[int] | np.ndarray, crops: np.ndarray, fields: dict) -> None:
        """Write crops and per-row fields at the given row positions (positions need not be contiguous)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        crops = np.asarray(crops)
        if crops.shape != (len(rows), *self.crop_shape) or crops.dtype != np.int16:
            raise ValueError(f"crops must be int16 {(len(rows), *self.crop_shape)}, got {crops.dtype} {crops.shape}")
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        in_order = bool(np.all(order == np.arange(len(order))))  # the crop stage's case: no extra copy
        ds = self._datasets
        # contiguous runs are written as slices (fast); h5py needs increasing indices for fancy writes
        runs = np.split(np.arange(len(rows)), np.nonzero(np.diff(rows) != 1)[0] + 1)
        with self._hdf5():
            for run in runs:
                lo, hi = int(rows[run[0]]), int(rows[run[-1]]) + 1
                src = slice(int(run[0]), int(run[-1]) + 1) if in_order else order[run]
                ds["crops"][lo:hi] = crops[src]
                for name in ROW_FIELDS:
                    values = np.asarray(fields[name])[src]
                    ds[name][lo:hi] = values
        self._written[rows] = True

    def commit(self) -> Path:
        """Check every row was written, close and rename into place."""
        missing = np.flatnonzero(~self._written)
        if len(missing):
            self.abort()
            raise RuntimeError(f"{self.path}: {len(missing)} rows never written (first: {missing[0]})")
        with self._hdf5():
            self._file.attrs["n_scans"] = len(self._geometry)
            self._file.flush()  # write errors raise here; a dataset closed by a destructor would only print them
            self._file.close()
            self._file, self._datasets, self._geometry = None, {}, None
        try:
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the crop store ({describe_os_error(exc)})") from exc
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file; a file whose writes failed is abandoned unclosed (see the module
        docstring), its temp file removed all the same."""
        if self._file is not None and not self._broken:
            try:
                self._file.flush()  # fails on a full disk: then the file is abandoned, not closed
                self._file.close()
                self._datasets, self._geometry = {}, None
                self._file = None
            except Exception:  # noqa: BLE001 - closing a broken file must not hide the original error
                self._broken = True
        if self._broken and self._file is not None:
            _ABANDONED.append((self._file, self._datasets, self._geometry))
            self._file = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class CropStore:
    """Lazy reader of one crop store.

    The row table is loaded once (small); crops are read on demand through a handle opened on first use in
    each process, so a store can be handed to DataLoader workers (the handle is never pickled).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such crop store")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a crop store (luna-crops writes one .h5 file a subset)")
        try:
            with h5py.File(self.path, "r") as f:
                version = int(f.attrs.get("format_version", -1))
                if version != FORMAT_VERSION:
                    raise StoreError(f"{self.path}: crop store format version {version}, expected {FORMAT_VERSION}")
                self.crop_shape = tuple(int(v) for v in f.attrs["crop_shape"])
                self.hu_window = tuple(int(v) for v in f.attrs["hu_window"])
                self.subset = str(f.attrs.get("subset", ""))
                center = f["center_xyz"][:]
                center_irc = f["center_irc"][:]
                start = f["crop_start_irc"][:]
                self.table = pd.DataFrame({
                    "candidate_id": f["candidate_id"][:],
                    "series_uid": f["series_uid"].asstr()[:],
                    "coord_x": center[:, 0] if len(center) else np.zeros(0),
                    "coord_y": center[:, 1] if len(center) else np.zeros(0),
                    "coord_z": center[:, 2] if len(center) else np.zeros(0),
                    "is_nodule": f["is_nodule"][:],
                    "diameter_mm": f["diameter_mm"][:],
                })
                self.center_irc = center_irc
                self.crop_start_irc = start
                crops = f["crops"]
                n = len(self.table)
                if crops.dtype != np.int16 or crops.shape != (n, *self.crop_shape):
                    raise StoreError(f"{self.path}: inconsistent crop store: crops are {crops.dtype} "
                                     f"{tuple(crops.shape)} where its {n} rows and crop_shape {self.crop_shape} need "
                                     f"int16 {(n, *self.crop_shape)}")
                if center_irc.shape != (n, 3) or start.shape != (n, 3) or center.shape != (n, 3):
                    raise StoreError(f"{self.path}: inconsistent crop store: center_xyz, center_irc or "
                                     f"crop_start_irc do not hold 3 values for each of its {n} rows")
                self.geometries = {
                    uid: (Geometry.from_dict({k: g.attrs[k] for k in ("origin_xyz", "spacing_xyz", "direction")}),
                          tuple(int(v) for v in g.attrs["shape_irc"]))
                    for uid, g in f["geometry"].items()
                }
        except StoreError:
            raise
        except (OSError, KeyError) as exc:
            raise StoreError(f"{self.path}: not a readable luna crop store ({exc})") from exc
        except ValueError as exc:  # pandas: per-row arrays of different lengths
            raise StoreError(f"{self.path}: inconsistent crop store ({exc})") from exc

    def __len__(self) -> int:
        return len(self.table)

    def _handle(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            self._file = h5py.File(self.path, "r")
            self._pid = pid
        return self._file

    def crop(self, index: int) -> np.ndarray:
        """One crop, int16 (I, R, C) (read as :meth:`crops` reads, with its range check)."""
        return self.crops([int(index)])[0]

    def crops(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Several crops (all when indices is None), int16 (n, I, R, C), in the order given.

        One ``read_direct`` per run of consecutive rows wanted in consecutive order (a scan's crops are
        consecutive rows, so loading a role's crops is a few hundred reads), else per crop, in file order:
        h5py's fancy indexing (``ds[sorted_list]``) manages ~300 crops/s on the same store (docs/benchmarks.md,
        "HDF5 batch reads").
        """
        ds = self._handle()["crops"]
        if indices is None:
            try:
                return ds[:]
            except OSError as exc:  # a damaged chunk (h5py: "filter returned failure during read")
                raise StoreError(f"{self.path}: cannot read the crops ({exc}); the store is damaged: make it "
                                 "again (luna-crops)") from None
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        out = np.empty((len(idx), *self.crop_shape), dtype=np.int16)
        if not len(idx):
            return out
        n_rows = ds.shape[0]
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        bad = (rows < -n_rows) | (rows >= n_rows)
        if bad.any():
            raise IndexError(f"{self.path}: crop index {int(rows[bad][0])} out of range (store holds {n_rows})")
        rows = np.where(rows < 0, rows + n_rows, rows)
        # runs: the row and the output position both step by one
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(order) != 1)) + 1
        for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()):
            row, position = int(rows[lo]), int(order[lo])
            try:
                ds.read_direct(out, np.s_[row:row + hi - lo], np.s_[position:position + hi - lo])
            except OSError as exc:  # a damaged chunk (h5py: "filter returned failure during read")
                rows_read = f"row {row}" if hi - lo == 1 else f"rows {row}-{row + hi - lo - 1}"
                raise StoreError(f"{self.path}: cannot read the crops of {rows_read} ({exc}); the store is damaged: "
                                 "make it again (luna-crops)") from None
        return out

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def stores_mismatch(stores: Sequence[CropStore]) -> str | None:
    """The first store whose crop shape or HU window differs from the first store's, or that holds a scan an
    earlier store holds, as a one-line message (None when they all agree): crops of another shape cannot share
    a batch, the same int16 values under another HU window would mean other tissue, and a scan in two stores (a
    copy of a store, one subset cut twice) would count its candidates twice: in training, in the selection set
    that chooses, and in the metrics."""
    for store in stores[1:]:
        if store.crop_shape != stores[0].crop_shape:
            return (f"{store.path}: crop shape {list(store.crop_shape)} differs from "
                    f"{stores[0].path}'s {list(stores[0].crop_shape)}")
        if store.hu_window != stores[0].hu_window:
            return (f"{store.path}: HU window {list(store.hu_window)} differs from "
                    f"{stores[0].path}'s {list(stores[0].hu_window)}")
    owner: dict[str, Path] = {}
    for store in stores:
        for uid in dict.fromkeys([*store.geometries, *store.table["series_uid"].astype(str).unique()]):
            if uid in owner:
                return (f"{store.path} and {owner[uid]} both hold scan {uid}: its candidates would count twice (a "
                        "copy of a store, or one subset cut twice?)")
            owner[uid] = store.path
    return None


def read_crops(stores: Sequence[CropStore], store_of: np.ndarray, row_of: np.ndarray,
               crop_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Crops from several stores, int16 (n, I, R, C), item k being row ``row_of[k]`` of ``stores[store_of[k]]``;
    one :meth:`CropStore.crops` call per store (so one read per run of consecutive rows). ``crop_shape`` is
    needed only when ``stores`` is empty."""
    store_of = np.asarray(store_of, dtype=np.int64)
    row_of = np.asarray(row_of, dtype=np.int64)
    shape = tuple(stores[0].crop_shape) if stores else tuple(crop_shape or ())
    out = np.empty((len(store_of), *shape), dtype=np.int16)
    for position in np.unique(store_of):
        where = np.flatnonzero(store_of == position)
        out[where] = stores[int(position)].crops(row_of[where])
    return out
