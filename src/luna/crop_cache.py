"""The crop stage's per-scan resume cache (diskcache): one entry per scan, so a killed job reruns only the
scans it had not finished (luna.crops; contract in docs/design.md, "Caching, resuming, failing cleanly").

An entry is the scan's crops as a raw file plus its per-row arrays and the crops' checksum, written last so that
their presence marks a complete entry; an entry whose bytes no longer match is a miss (the scan is cut again).
Keys hold the scan file's identity, the crop parameters, the exact centres and
CACHE_FORMAT_VERSION. Cache failures (OSError, sqlite3.Error) become one OutputError line naming the folder.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Sequence

import diskcache
import numpy as np

from luna.io import OutputError, describe_os_error

CACHE_FORMAT_VERSION = 2  # of a cached per-scan result; bump when cutting or the cached value changes (2: checksum)
CACHE_SIZE_LIMIT_BYTES = 2**40  # a subset of LUNA16 V2 is ~11 GB of crops; never evict while a job runs
CACHE_BYTES_PER_SCAN = 64 * 1024  # beside the crops: the entry's database row and per-row arrays (upper bound)


def cache_key(identity: tuple, crop_shape: Sequence[int], hu_window: Sequence[int], centers_xyz: np.ndarray) -> tuple:
    """The diskcache key of one scan's result: scan file identity, crop parameters, the exact centres, version."""
    centers = np.ascontiguousarray(centers_xyz, dtype=np.float64)
    digest = hashlib.sha256(centers.tobytes()).hexdigest()
    # "luna.crops" names the stage, not a module: it stays, so caches written before the split still match
    return ("luna.crops", CACHE_FORMAT_VERSION, tuple(identity), tuple(int(v) for v in crop_shape),
            tuple(int(v) for v in hu_window), len(centers), digest)


class _BufferReader:
    """File-like view of an array's bytes: diskcache streams them to its file in 4 MiB slices, no copy."""

    def __init__(self, array: np.ndarray) -> None:
        self._view = memoryview(np.ascontiguousarray(array)).cast("B")
        self._pos = 0

    def read(self, size: int = -1) -> memoryview:
        end = len(self._view) if size < 0 else min(self._pos + size, len(self._view))
        chunk = self._view[self._pos:end]
        self._pos = end
        return chunk


def _digest(crops: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(crops)).cast("B"), digest_size=16).hexdigest()


def cache_put(cache: diskcache.Cache, key: tuple, crops: np.ndarray, rows: dict[str, np.ndarray]) -> None:
    """Store one scan's result: the crops as a raw file, then the per-row arrays and the crops' checksum (written
    last: their presence marks a complete entry, so a job killed mid-write leaves a miss, never half a result)."""
    cache.set((*key, "crops"), _BufferReader(crops), read=True, retry=True)
    cache.set((*key, "rows"), {"shape": crops.shape, "blake2b": _digest(crops), **rows}, retry=True)


def cache_get(cache: diskcache.Cache, key: tuple) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """One scan's cached (crops, per-row arrays), or None when not (completely) cached."""
    rows = cache.get((*key, "rows"), default=None, retry=True)
    if rows is None:
        return None
    handle = cache.get((*key, "crops"), default=None, read=True, retry=True)
    if handle is None:
        return None
    crops = np.empty(rows.pop("shape"), dtype=np.int16)
    digest = rows.pop("blake2b")
    buffer = memoryview(crops).cast("B")
    with handle:
        n_read = 0
        while n_read < len(buffer):
            n = handle.readinto(buffer[n_read:])
            if not n:
                return None  # shorter than recorded: treat as not cached
            n_read += n
        if handle.read(1):
            return None  # longer than recorded
    if _digest(crops) != digest:
        return None  # bytes changed on disk since they were cached: cut the scan again
    return crops, rows


def open_cache(cache_dir: str | os.PathLike) -> diskcache.Cache:
    """The resume cache of one subset: large entries, never evicted (it is removed whole after the commit)."""
    try:
        return diskcache.Cache(str(cache_dir), size_limit=CACHE_SIZE_LIMIT_BYTES, eviction_policy="none",
                               cull_limit=0)
    except (OSError, sqlite3.Error) as exc:
        raise cache_error(Path(cache_dir), exc) from exc


def complete_entries(cache: diskcache.Cache) -> int | None:
    """How many scans the cache holds completely (reads only: works on a full disk); None when it cannot tell."""
    try:
        return sum(1 for key in cache.iterkeys() if isinstance(key, tuple) and key[-1] == "rows")
    except (OSError, sqlite3.Error):
        return None


def cache_error(cache_dir: Path, exc: BaseException) -> OutputError:
    """A failed read or write of the resume cache (diskcache: OSError, sqlite3.Error) as one line naming it."""
    if isinstance(exc, OSError):
        reason = describe_os_error(exc)
    else:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        corrupt = isinstance(exc, sqlite3.DatabaseError) and ("not a database" in message or "malformed" in message)
        reason = ("no space left on device" if "disk is full" in message
                  else "permission denied or read-only file system" if "readonly" in message
                  else f"{message}: corrupt? delete the folder to start afresh" if corrupt
                  else message)
    return OutputError(f"{cache_dir}: cannot use the resume cache ({reason})")
