"""The HDF5 crop store: one file per subset, written atomically, read lazily (one handle per process).

Layout (format version 1), rows in candidates.tsv order:
  crops           int16 (N, I, R, C), HU clipped to the window, one crop per chunk
  candidate_id    int64 (N,)          row number in the input candidates CSV
  series_uid      str (N,)
  center_xyz      float64 (N, 3)      world mm
  center_irc      int64 (N, 3)        nearest voxel of the centre
  crop_start_irc  int64 (N, 3)        where the crop starts in the scan (may be negative)
  is_nodule       int8 (N,)           -1 when the candidate list has no class column
  diameter_mm     float32 (N,)
  attrs: format_version, crop_shape, hu_window, subset, n_scans
  geometry/<series_uid> attrs: origin_xyz, spacing_xyz, direction (9), shape_irc
No timestamps are stored, so the same inputs give identical arrays wherever the job ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import pandas as pd

from luna.geometry import Geometry

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


class StoreError(ValueError):
    """A crop store that cannot be read; the message names the file."""


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
        compression: str = "lzf",
    ) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.n_rows = int(n_rows)
        self.crop_shape = tuple(int(v) for v in crop_shape)
        self._file = h5py.File(self.tmp_path, "w", track_order=False)
        f = self._file
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["crop_shape"] = np.asarray(self.crop_shape, dtype=np.int64)
        f.attrs["hu_window"] = np.asarray(hu_window, dtype=np.int64)
        f.attrs["subset"] = subset
        chunks = (1, *self.crop_shape) if self.n_rows else None
        f.create_dataset(
            "crops", shape=(self.n_rows, *self.crop_shape), dtype=np.int16, chunks=chunks,
            track_times=False, **(_compression_kwargs(compression) if self.n_rows else {}),
        )
        for name, dtype in _ROW_DTYPES.items():
            shape = (self.n_rows, 3) if name in ("center_xyz", "center_irc", "crop_start_irc") else (self.n_rows,)
            f.create_dataset(name, shape=shape, dtype=dtype, track_times=False)
        f.create_dataset("series_uid", shape=(self.n_rows,), dtype=h5py.string_dtype("utf-8"), track_times=False)
        self._geometry = f.create_group("geometry", track_order=False)
        self._written = np.zeros(self.n_rows, dtype=bool)

    def add_scan(self, series_uid: str, geometry: Geometry, shape_irc: Sequence[int]) -> None:
        """Record one scan's geometry."""
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
        f = self._file
        # contiguous runs are written as slices (fast); h5py needs increasing indices for fancy writes
        runs = np.split(np.arange(len(rows)), np.nonzero(np.diff(rows) != 1)[0] + 1)
        for run in runs:
            lo, hi = int(rows[run[0]]), int(rows[run[-1]]) + 1
            src = slice(int(run[0]), int(run[-1]) + 1) if in_order else order[run]
            f["crops"][lo:hi] = crops[src]
            for name in ROW_FIELDS:
                values = np.asarray(fields[name])[src]
                f[name][lo:hi] = values
        self._written[rows] = True

    def commit(self) -> Path:
        """Check every row was written, close and rename into place."""
        missing = np.flatnonzero(~self._written)
        if len(missing):
            self.abort()
            raise RuntimeError(f"{self.path}: {len(missing)} rows never written (first: {missing[0]})")
        self._file.attrs["n_scans"] = len(self._geometry)
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file."""
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - closing a broken file must not hide the original error
            pass
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
                self.geometries = {
                    uid: (Geometry.from_dict({k: g.attrs[k] for k in ("origin_xyz", "spacing_xyz", "direction")}),
                          tuple(int(v) for v in g.attrs["shape_irc"]))
                    for uid, g in f["geometry"].items()
                }
        except (OSError, KeyError) as exc:
            raise StoreError(f"{self.path}: not a readable luna crop store ({exc})") from exc

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

        One ``read_direct`` per crop, in file order: ~10,000 crops/s, where h5py's fancy indexing
        (``ds[sorted_list]``) manages ~300/s on the same store (docs/benchmarks.md, "HDF5 batch reads").
        """
        ds = self._handle()["crops"]
        if indices is None:
            return ds[:]
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        out = np.empty((len(idx), *self.crop_shape), dtype=np.int16)
        n_rows = ds.shape[0]
        for k in np.argsort(idx, kind="stable"):
            i = int(idx[k])
            if not -n_rows <= i < n_rows:
                raise IndexError(f"{self.path}: crop index {i} out of range (store holds {n_rows})")
            ds.read_direct(out, np.s_[i], np.s_[int(k)])
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


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of a store as numpy arrays (for tests and comparisons between runs)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for name in ("crops", *ROW_FIELDS):
            ds = f[name]
            out[name] = ds.asstr()[:] if name == "series_uid" else ds[:]
    return out
