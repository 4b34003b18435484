"""Writing files so that nothing half-written is ever left at a declared path: the one I/O layer of the stages.

* :func:`atomic_path` — write to a temp name in the same folder (``.<name>.<pid>.tmp``), fsync, then
  ``os.replace`` onto the final name; on any failure the temp file is removed and the final path untouched.
* :func:`write_tsv` — every TSV of the pipeline in one format: tab-separated, ``\\n`` line ends, floats in
  their shortest round-trip form (``repr``), undefined values (NaN) as ``NaN``.
* :func:`write_bytes`, :func:`copy_file` — small files through :func:`atomic_path`.

Only the standard library and pandas are imported here.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import pandas as pd

NA_REP = "NaN"


class OutputError(OSError):
    """An output that cannot be written (no space, read-only, not a folder); the one-line message names the path.

    Raised with the message alone, so ``str(exc)`` is that line (no ``[Errno N]`` prefix)."""


def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temp name an atomic write of ``path`` uses: a hidden file beside it, unique per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def temp_files_of(path: str | os.PathLike) -> list[Path]:
    """The :func:`tmp_path_for` files of ``path`` from any process (a killed run's, or a live one's): regular
    files only."""
    path = Path(path)
    return [tmp for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
            if tmp.is_file() and not tmp.is_symlink()]


def describe_os_error(exc: OSError) -> str:
    """``no space left on device`` / ``permission denied`` ...: the reason of an OSError, lower case, one line."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied or read-only file system"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way: not a folder"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]


def named_output(value: str | os.PathLike, option: str, what: str) -> Path:
    """``value`` as a Path; OutputError when it is empty (an unset shell variable): ``Path("")`` is the current
    folder, where an evaluation first removed the report files it found."""
    if not str(value).strip():
        raise OutputError(f"{option}: empty path; name the {what}")
    return Path(value)


def check_output_file(path: str | os.PathLike) -> Path:
    """The path an atomic write replaces: ``path``, or a symlink's target; OutputError when something other than
    a regular file is there (a folder, a FIFO, a device)."""
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputError(f"{str(path)!r}: an output needs a file name")
    try:
        target = path.resolve(strict=False) if path.is_symlink() else path
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise OutputError(f"{path}: cannot follow the symlink ({exc})") from None
    if target.exists() and not target.is_file():
        kind = "a folder" if target.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise OutputError(f"{path}: is {kind}; an output is written to a temp file and renamed onto it")
    return target


def _resolved_output(out: str | os.PathLike, what: str) -> Path:
    """``out`` resolved; a symlink loop is OutputError naming the option (Path.resolve raises RuntimeError)."""
    try:
        return Path(out).resolve()
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"{what} {out}: cannot follow the symlink ({exc})") from None


def _resolved_input(path: str | os.PathLike) -> Path | None:
    """An input resolved, or None when it cannot be (a symlink loop: its reader says so)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return None


def check_not_an_input(out: str | os.PathLike, inputs: dict[str, Sequence[str | os.PathLike]],
                       what: str = "--out") -> None:
    """OutputError when the output ``out`` is (or, through a symlink, points at) one of the ``inputs`` (option
    name -> paths): the write would replace the input it was computed from."""
    target = _resolved_output(out, what)
    for option, paths in inputs.items():
        for path in paths:
            if path is not None and _resolved_input(path) == target:
                raise OutputError(f"{what} {out} is the input {option} {path}; write the output elsewhere")


def check_outside_scan_folders(out: str | os.PathLike, scan_paths: Iterable[str | os.PathLike],
                               what: str = "--out", root: str | os.PathLike | None = None) -> None:
    """OutputError when the output ``out`` would land in a folder of scans (the folders of ``scan_paths``, and
    with ``root`` every :func:`scan_folders` of that data folder, selected or not): a table written there is
    taken for data, or replaces a scan's header."""
    # folders, not files, resolved: a subset folder of symlinks to a shared copy is still the subset folder
    parents = {_resolved_output(Path(out).parent, what), _resolved_output(out, what).parent}
    folders = {Path(path).parent for path in scan_paths} | set(scan_folders(root) if root is not None else [])
    for folder in sorted(folders):
        if _resolved_input(folder) in parents:
            raise OutputError(f"{what} {out} lies in the scan folder {folder}; write it elsewhere")


def scan_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder directly under the data folder ``root`` that is a subset (``subset*``) or holds ``.mhd``
    headers: where no output may go, whichever subsets a run selects (a table written over another subset's
    scan header destroyed it)."""
    root = Path(root)
    try:
        folders = [p for p in sorted(root.iterdir()) if p.is_dir()]
    except OSError:
        return []
    return [f for f in folders if f.name.startswith("subset") or next(f.glob("*.mhd"), None) is not None]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on a clean exit it is fsynced and renamed onto ``path``, else removed.

    The parent folder is created. An OSError while writing becomes :class:`OutputError` naming ``path``. A
    symlink at ``path`` is written through (its target replaced); anything else that is not a regular file (a
    folder, a FIFO, a device) is refused: the rename would replace it.
    """
    path = check_output_file(path)
    tmp = tmp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({describe_os_error(exc)})") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_tsv(frame: pd.DataFrame, path: str | os.PathLike, sep: str = "\t") -> Path:
    """Write a table atomically: floats shortest round-trip, NaN as ``NaN``, no index."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep=sep, index=False, na_rep=NA_REP, lineterminator="\n")
    return path


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write bytes atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a (small) file atomically."""
    return write_bytes(Path(src).read_bytes(), dst)


def check_writable_dir(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before hours of work.

    Raises :class:`OutputError` naming the folder: ``<folder>: cannot write to the <what> (<reason>)``."""
    folder = Path(folder)
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"0")
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write to the {what} ({describe_os_error(exc)})") from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def lock_path(path: str | os.PathLike, busy: str) -> IO[bytes] | None:
    """Take an exclusive, non-blocking POSIX record lock (``lockf``) on ``path`` (created) and return its open
    file, which holds the lock until closed (or the process ends): :class:`OutputError` ``busy`` when another
    process holds it. A record lock, not ``flock``: forked workers do not inherit it, so an orphaned worker of
    a killed run cannot keep the next run out. None where the OS has no ``fcntl``, or the file system no locks
    (some NFS: a warning; two runs at once are then not refused)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    path = Path(path)
    while True:
        try:
            handle = open(path, "a+b")  # noqa: SIM115 - held open while the lock is
        except OSError as exc:  # a folder in the way, another user's lock file in a shared folder
            raise OutputError(f"{path}: cannot open the lock file ({describe_os_error(exc)})") from exc
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                logging.getLogger("luna.io").warning("%s: cannot lock (%s); two runs at once would not be refused",
                                                     path, exc.strerror or exc)
                return None
            raise OutputError(busy) from exc
        if _same_file(handle, path):
            return handle
        # the holder released and removed the file between this open and this lock: the lock is on a file no
        # longer at ``path``, which a third run could create and lock anew; lock the file there now instead
        handle.close()


def _same_file(handle: IO[bytes], path: Path) -> bool:
    """Whether ``path`` still names the open file ``handle`` (not removed, not replaced)."""
    try:
        on_disk = path.stat()
    except OSError:
        return False
    held = os.fstat(handle.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def release_lock(handle: IO[bytes] | None, path: str | os.PathLike | None = None) -> None:
    """Close a :func:`lock_path` file; with ``path``, remove the lock file first (while still held, so no run
    locks it after this one; a run that opened it before the removal finds it gone once it holds the lock, and
    locks a new file there: :func:`lock_path`; also when the file system gave no lock and ``handle`` is
    None)."""
    if path is not None:
        with contextlib.suppress(OSError):
            Path(path).unlink()
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def locked(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """:func:`lock_path` held within the block, then released and its file removed (:func:`release_lock`)."""
    handle = lock_path(path, busy)
    try:
        yield
    finally:
        release_lock(handle, path)
