"""The crop stage's per-scan resume cache (diskcache): one entry per scan, so a killed job reruns only the
scans it had not finished (luna.crops; contract in docs/design.md, "Caching, resuming, failing cleanly").

An entry is the scan's crops as a raw file plus its per-row arrays and the crops' checksum, written last so that
their presence marks a complete entry; an entry whose bytes no longer match is a miss (the scan is cut again).
Keys hold the scan file's identity, the crop parameters, the exact centres, CACHE_FORMAT_VERSION and the luna
source digest (a cache left by a failed run is not reused by other code: a store never mixes crops of two
versions). Cache failures (OSError, sqlite3.Error) become one OutputError line naming the folder.

The folder is removed whole after the store is complete, so luna only ever removes a folder it can tell is a
resume cache (:func:`check_cache_folder`: its marker file or diskcache's database, and no data or output inside).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Sequence

import diskcache
import numpy as np

from luna.io import OutputError, describe_os_error
from luna.provenance import source_digest

CACHE_FORMAT_VERSION = 2  # of a cached per-scan result; bump when cutting or the cached value changes (2: checksum)
CACHE_SIZE_LIMIT_BYTES = 2**40  # a subset of LUNA16 V2 is ~11 GB of crops; never evict while a job runs
CACHE_BYTES_PER_SCAN = 64 * 1024  # beside the crops: the entry's database row and per-row arrays (upper bound)
CACHE_MARKER = ".luna-crop-cache"  # written into every cache folder luna creates: what may be removed whole
DISKCACHE_DB = "cache.db"  # diskcache's database: a folder with it is a cache (also one made before the marker)


def cache_key(identity: tuple, crop_shape: Sequence[int], hu_window: Sequence[int], centers_xyz: np.ndarray) -> tuple:
    """The diskcache key of one scan's result: scan file identity, crop parameters, the exact centres, version."""
    centers = np.ascontiguousarray(centers_xyz, dtype=np.float64)
    digest = hashlib.sha256(centers.tobytes()).hexdigest()
    # "luna.crops" names the stage, not a module; the source digest: a resume after a luna update cuts afresh
    return ("luna.crops", CACHE_FORMAT_VERSION, source_digest(), tuple(identity), tuple(int(v) for v in crop_shape),
            tuple(int(v) for v in hu_window), len(centers), digest)


def is_cache_folder(cache_dir: str | os.PathLike) -> bool:
    """Whether a folder is a luna resume cache (its marker, or diskcache's database)."""
    cache_dir = Path(cache_dir)
    return (cache_dir / CACHE_MARKER).is_file() or (cache_dir / DISKCACHE_DB).is_file()


def check_cache_folder(cache_dir: str | os.PathLike, keep: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """Refuse a resume-cache folder that luna could not remove whole without loss: one that is, or holds, a
    ``keep`` path (``(what, path)``: the data folder, the output folders), or an existing folder with other
    files that is not a resume cache."""
    cache_dir = Path(cache_dir)
    where = cache_dir.resolve()
    for what, path in keep:
        target = Path(path).resolve()
        if target == where or where in target.parents:
            raise OutputError(f"{cache_dir}: the resume cache folder would hold the {what} {path}, and it is "
                              "removed whole after the run; give a folder of its own")
    if cache_dir.is_dir() and any(cache_dir.iterdir()) and not is_cache_folder(cache_dir):
        raise OutputError(f"{cache_dir}: exists and is not a luna resume cache (no {CACHE_MARKER} or "
                          f"{DISKCACHE_DB}), and the cache folder is removed whole after the run; give an empty "
                          "or new folder")


def clear_cache_folder(cache_dir: str | os.PathLike) -> None:
    """Empty a resume cache's folder but keep the folder (one the user made); only a cache is touched."""
    cache_dir = Path(cache_dir)
    if is_cache_folder(cache_dir):
        for child in cache_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def remove_cache_folder(cache_dir: str | os.PathLike) -> None:
    """Remove a resume cache whole; a folder that is not one (see :func:`is_cache_folder`) is left alone."""
    if is_cache_folder(cache_dir):
        shutil.rmtree(cache_dir, ignore_errors=True)


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
        cache = diskcache.Cache(str(cache_dir), size_limit=CACHE_SIZE_LIMIT_BYTES, eviction_policy="none",
                                cull_limit=0)
        (Path(cache_dir) / CACHE_MARKER).touch()
        return cache
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
