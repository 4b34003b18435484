"""The data set on disk: :func:`synthesize` writes every scan's ``.mhd``/``.raw`` (in parallel processes when
asked), then the LUNA16 CSVs with CRLF line ends, each to a temporary name and renamed, ``candidates.csv`` last
so that its presence marks a complete set. A marker file (``.luna-synth.json``) lets it refuse folders it did
not write and remove the stale scans of an earlier run. Kept apart so that the scan-building modules stay pure.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from luna import __version__
from luna.ct import write_scan
from luna.io import describe_os_error, write_bytes
from luna.synth.config import ANNOTATIONS_HEADER, CANDIDATES_HEADER, ScanPlan, SynthConfig, SynthError, plan_dataset
from luna.synth.rendering import synthesize_scan

logger = logging.getLogger(__name__)

MARKER_NAME = ".luna-synth.json"


# ----------------------------------------------------------------------------------------------------------
# The data set on disk
# ----------------------------------------------------------------------------------------------------------

def _write_csv_atomic(path: Path, header: Iterable[str] | None, rows: Iterable[list[str]]) -> None:
    """A CSV with LUNA16's CRLF line ends, written to a temporary name and renamed."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if header is not None:
        writer.writerow(list(header))
    writer.writerows(rows)
    write_bytes(buf.getvalue().encode("ascii"), path)


def _make_scan_files(root: str, plan: ScanPlan, config: SynthConfig) -> dict[str, Any]:
    """Worker: build one scan, write its .mhd/.raw atomically, return its table rows and counts."""
    scan = synthesize_scan(plan, config)
    path = Path(root) / plan.subset / f"{plan.series_uid}.mhd"
    write_scan(path, scan.volume, scan.geometry, compress=False)
    nbytes = path.stat().st_size + path.with_suffix(".raw").stat().st_size
    return {
        "index": plan.index, "annotations": scan.annotation_rows, "excluded": scan.excluded_rows,
        "candidates": scan.candidate_rows, "candidate_kinds": scan.candidate_kinds, "stats": scan.stats,
        "voxels": int(scan.volume.size), "bytes": nbytes, "shape": scan.volume.shape,
        "nodule_kinds": [n["kind"] for n in scan.nodules],
        "nodule_attachments": [n["attachment"] for n in scan.nodules],
    }


def _prepare_root(root: Path, plans: list[ScanPlan], config: SynthConfig) -> None:
    """Create root; refuse a folder with LUNA16-like content not made by luna.synth; drop stale files."""
    marker = root / MARKER_NAME
    if root.exists() and not root.is_dir():
        raise SynthError(f"{root}: output path exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, a read-only file system
        raise SynthError(f"{root}: cannot write to the output folder ({describe_os_error(exc)})") from None
    ours = marker.is_file()
    held = sorted(p.name for p in root.iterdir())
    if held and not ours:  # a LUNA16 copy, a project, a scan folder: nothing of it is luna.synth's to replace
        raise SynthError(f"{root}: folder holds {held[0]}{f' and {len(held) - 1} more' if len(held) > 1 else ''} "
                         f"but was not written by luna.synth (no {MARKER_NAME}); refusing to write into it: give "
                         "a new or empty folder")
    (root / "candidates.csv").unlink(missing_ok=True)  # an interrupted run must not look complete
    meta = {"generator": "luna.synth", "version": __version__, "config": config.to_dict()}
    write_bytes((json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(), marker)
    if not ours:
        return
    wanted = {(p.subset, p.series_uid) for p in plans}
    subsets = {p.subset for p in plans}
    for folder in sorted(root.glob("subset*")):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_dir() and f.name.startswith(".tmp-"):  # ct.write_scan's temp folder of a killed run
                shutil.rmtree(f, ignore_errors=True)
            elif f.suffix in (".mhd", ".raw", ".zraw") and (folder.name, f.stem) not in wanted:
                f.unlink()
        if folder.name not in subsets and not any(folder.iterdir()):
            folder.rmdir()


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: on Linux the worker is killed when the parent dies, so that a killed run's workers
    cannot go on writing scans into the folder a rerun is filling (elsewhere: it stops before its first scan if the
    parent is already gone)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the getppid check below still catches a parent already gone
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
    # SIGTERM and Ctrl-C's SIGINT to the process group are the parent's to act on (luna.app.sigterm_unwinds: it
    # cancels the queued scans and ends the workers); a worker ended by SIGTERM first made the parent's error a
    # misleading "a scan worker process died", and one interrupted by SIGINT printed its traceback (a second
    # Ctrl-C left the parent waiting on its pool at exit)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def synthesize(root: Path, config: SynthConfig, jobs: int = 1) -> dict[str, Any]:
    """Write the whole data set under ``root`` (scans in parallel with ``jobs`` processes); CSVs last.

    Returns summary counts: scans, nodules, candidates, negatives per positive, flipped/FOV/contrast scans,
    voxels, bytes on disk, seconds.
    """
    root = Path(root)
    if jobs < 1:
        raise SynthError(f"jobs = {jobs}: must be >= 1")
    t0 = time.perf_counter()
    plans = plan_dataset(config)
    _prepare_root(root, plans, config)
    logger.info("synthesizing %d scans in %d subsets under %s with %d job(s)", len(plans), config.n_subsets, root, jobs)
    results: dict[int, dict[str, Any]] = {}

    def progress(done: int) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (len(plans) - done)
        logger.info("scan %d/%d done, %.1f s elapsed, ETA %.1f s", done, len(plans), elapsed, eta)

    if jobs == 1:
        for plan in plans:
            results[plan.index] = _make_scan_files(str(root), plan, config)
            progress(len(results))
    else:
        # fork on Linux: spawn/forkserver re-import the parent's __main__, which re-runs a Snakemake rule script
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(plans)), mp_context=ctx, initializer=_die_with_parent,
                                   initargs=(os.getpid(),))
        futures = []
        try:
            for plan in plans:
                futures.append(pool.submit(_make_scan_files, str(root), plan, config))
            for fut in as_completed(futures):
                res = fut.result()
                results[res["index"]] = res
                progress(len(results))
        except BaseException as exc:  # Ctrl-C, SIGTERM or a failed scan: the queued scans are cancelled here (a
            # with-block's exit ran every one; shutdown's cancel_futures alone is lost once the pool is collected),
            # the running ones end with their scan (seconds; a worker killed holding the task queue's lock hangs the
            # exit). A second SIGINT or SIGTERM (timeout's to the group right after its own to the app, a user
            # pressing Ctrl-C twice) that broke into this cleanup left the pool's thread and workers waiting on each
            # other at exit: both are ignored until the pool is shut down
            in_main = threading.current_thread() is threading.main_thread()
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} \
                if in_main else {}
            try:
                for fut in futures:
                    fut.cancel()  # a scan not yet running
                pool.shutdown(wait=True, cancel_futures=True)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if isinstance(exc, BrokenProcessPool):
                raise SynthError(f"{root}: a scan worker process died ({exc}); killed, or out of memory? (try "
                                 "fewer --jobs)") from exc
            raise
        pool.shutdown(wait=True)
    ordered = [results[p.index] for p in sorted(plans, key=lambda p: p.series_uid)]
    annotations = [row for r in ordered for row in r["annotations"]]
    excluded = [row for r in ordered for row in r["excluded"]]
    candidates = [row for r in ordered for row in r["candidates"]]
    if not annotations:  # LUNA16's annotations.csv always lists nodules: said now, not by the next stage
        dropped = sum(r["stats"]["nodules_dropped"] for r in ordered)
        logger.warning("%s: no nodule in any of the %d scans (%s): annotations.csv lists none, which luna-candidates "
                       "refuses unless given --annotations ''; nothing here can be trained or scored", root,
                       len(plans), f"{dropped} found no room: use smaller nodules or larger scans" if dropped
                       else "raise nodules_per_scan or make more scans")
    _write_csv_atomic(root / "annotations.csv", ANNOTATIONS_HEADER, annotations)
    _write_csv_atomic(root / "annotations_excluded.csv", ANNOTATIONS_HEADER, excluded)
    uids = sorted(p.series_uid for p in plans)
    _write_csv_atomic(root / "seriesuids.csv", None, [[uid] for uid in uids])
    _write_csv_atomic(root / "candidates.csv", CANDIDATES_HEADER, candidates)  # last: marks the set complete

    n_pos = sum(1 for row in candidates if row[4] == "1")
    n_neg = len(candidates) - n_pos
    kinds: dict[str, int] = {}
    for r in ordered:
        for k in r["candidate_kinds"]:
            kinds[k] = kinds.get(k, 0) + 1
    nodule_kinds: dict[str, int] = {}
    for r in ordered:
        for k in r["nodule_kinds"]:
            nodule_kinds[k] = nodule_kinds.get(k, 0) + 1
    summary = {
        "root": str(root),
        "n_subsets": config.n_subsets,
        "n_scans": len(plans),
        "n_scans_with_nodules": sum(1 for r in ordered if r["annotations"]),
        "n_nodules": len(annotations),
        "n_excluded": len(excluded),
        "n_candidates": len(candidates),
        "n_positive_candidates": n_pos,
        "n_negative_candidates": n_neg,
        "negatives_per_positive": round(n_neg / n_pos, 2) if n_pos else None,
        "candidate_kinds": dict(sorted(kinds.items())),
        "nodule_kinds": dict(sorted(nodule_kinds.items())),
        "n_juxtapleural": sum(a == "wall" for r in ordered for a in r["nodule_attachments"]),
        "n_juxtavascular": sum(a == "vessel" for r in ordered for a in r["nodule_attachments"]),
        "n_flipped": sum(p.flipped for p in plans),
        "n_circular_fov": sum(p.circular_fov for p in plans),
        "n_contrast": sum(p.contrast for p in plans),
        "n_nodules_shrunk": sum(r["stats"]["nodules_shrunk"] for r in ordered),
        "n_nodules_dropped": sum(r["stats"]["nodules_dropped"] for r in ordered),
        "n_excluded_dropped": sum(r["stats"]["excluded_dropped"] for r in ordered),
        "mean_shape_zyx": [round(float(np.mean([r["shape"][i] for r in ordered])), 1) for i in range(3)],
        "voxels": sum(r["voxels"] for r in ordered),
        "bytes": sum(r["bytes"] for r in ordered),
        "seconds": round(time.perf_counter() - t0, 2),
        "jobs": jobs,
    }
    logger.info("wrote %s: %d scans, %d nodules, %d candidates (%d positive, %.1f negatives per positive), "
                "%.0f MB, %.1f s", root, summary["n_scans"], summary["n_nodules"], summary["n_candidates"], n_pos,
                summary["negatives_per_positive"] or 0.0, summary["bytes"] / 1e6, summary["seconds"])
    if summary["n_nodules_dropped"]:
        logger.warning("%d nodule(s) found no room in their scan and were left out", summary["n_nodules_dropped"])
    if summary["n_excluded_dropped"]:
        logger.warning("%d excluded finding(s) found no room in their scan and were left out (annotations_excluded.csv "
                       "lists %d)", summary["n_excluded_dropped"], summary["n_excluded"])
    return summary
