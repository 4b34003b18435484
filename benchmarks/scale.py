"""Scale rehearsal: one LUNA16-sized subset through every stage, measured, then projected to 888 scans, 10 folds.

Run on demand (not part of the test suite). What it does:

1. Makes one synthetic subset of ``--scans`` full-size scans with ``luna-synth --full-size`` (512x512 slices,
   300-380 mm in z, in-plane spacing 0.46-0.98 mm, slice thickness drawn from ``--slice-thicknesses``, default
   0.625-2.5 mm as LUNA16) and LUNA16's candidate density (``--candidates-per-scan``, default 850 = 754,975 V2
   rows / 888 scans; ``--negatives-per-positive`` is derived from it), then runs every stage on it, each as its
   own process (the console scripts of .venv/bin): candidates, split (``--folds 5`` hash folds), crops (threads =
   cores), train (a short run: throughput, memory, one selection pass; ``--data-on-device auto`` and then the
   other path), predict (``--scans all``: every candidate of the subset) and evaluate (luna-evaluate over those
   predictions, with a splits table that puts every scan in the model's test fold).
   Each stage: wall time, CPU time (wait4 rusage of the process tree), peak RSS (the largest single process, from
   wait4, and the sampled sum over the process tree), the disk its outputs take (peak, sampled, and at the end),
   the load average, the CPU time other processes used meanwhile (/proc/stat minus the stage's and this
   driver's own CPU time), items and rates.
2. Does that at two sizes (``--small``, default N/4, then N) so the "What each stage holds in memory" check can
   compare the peak RSS (minus the stage's import cost, measured separately) with what the code deliberately
   holds, and show that nothing else grows with the number of candidates.
3. LUNA16-sized tables: a 754,975-row candidates CSV in LUNA16's format over the 888 official series UIDs (with
   the official annotations: 1,557 positives near the 1,186 nodules), written to a folder of 888 empty
   placeholder scans; measured: ``luna-candidates`` and ``luna-split`` (as stages), ``read_candidates_csv`` +
   ``drop_duplicate_candidates`` + ``match_diameters`` and the crop stage's ``read_subset_candidates`` (in
   processes of their own, time and peak RSS per step), ``froc`` and a 100-sample ``froc_bootstrap`` on a
   754,975-row prediction frame over 888 scans with the official annotations, and ``luna-evaluate`` over ten
   fold folders of those predictions (bootstrap 1000, as the pipeline's default).
4. Writes a markdown report (``--out``, default docs/scale.md; ``<work>/scale-quick.md`` with ``--quick``): the
   measured tables, the V2-table timings, the projection to 888 scans and 10 folds for this CPU and as formulas,
   and the memory section. The raw numbers go to ``<work>/scale.json``, the stage logs to ``<work>/logs/``.

    .venv/bin/python benchmarks/scale.py                      # 89 scans (and 22), ~ docs/scale.md
    nice -n 19 .venv/bin/python benchmarks/scale.py --quick   # smoke run: 2 and 4 scans, tiny training

The disk it needs is printed first; it refuses to start when the work folder's file system has less free space.
Without ``--keep`` each size's scans, crops and predictions are deleted when that size is done (logs and the JSON
stay).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "luna-train").exists() else REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python" if (VENV_BIN / "python").exists() else Path(sys.executable)
LUNA16_CSV = REPO / "tests" / "fixtures" / "luna16-csv"  # the official annotations and 888 series UIDs
GPU_CHECK = REPO / "benchmarks" / "results" / "gpu_check_h100.txt"

LUNA16_SCANS = 888
LUNA16_FOLDS = 10
V2_ROWS = 754_975
V2_POSITIVES = 1_557
V1_ROWS = 551_065
LUNA16_NODULES_PER_SCAN = 1186 / 888
BOOK_EPOCH_SAMPLES = 200_000
CROP_SHAPE = (32, 48, 48)
CROP_BYTES = CROP_SHAPE[0] * CROP_SHAPE[1] * CROP_SHAPE[2] * 2  # int16
FULL_XY = 512
FULL_Z_MM = (300.0, 380.0)
PER_ROW_BUDGET = 4096  # bytes per candidate a table-holding stage may grow by (a crop is 147,456)
MARKER = ".luna-scale"
JSON_TAG = "SCALE_JSON "
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

STAGE_SCRIPTS = {
    "synth": "luna-synth", "candidates": "luna-candidates", "split": "luna-split", "crops": "luna-crops",
    "train": "luna-train", "predict": "luna-predict", "evaluate": "luna-evaluate",
}


def log(msg: str) -> None:
    print(f"[scale {dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ==============================================================================================================
# measuring a process
# ==============================================================================================================

def read_proc_stat() -> dict[str, int]:
    """The machine's CPU time counters (clock ticks) from the first line of /proc/stat."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: int(v) for n, v in zip(names, parts[1:9])}


def busy_ticks(stat: dict[str, int]) -> int:
    return stat["user"] + stat["nice"] + stat["system"] + stat["irq"] + stat["softirq"]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, rss bytes) of every process (fields of /proc/<pid>/stat)."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2:].split()
        try:
            table[int(name)] = (int(rest[1]), int(rest[21]) * page)
        except (IndexError, ValueError):
            continue
    return table


def tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS over ``root`` and its descendants, number of processes)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
            count += 1
        todo.extend(children.get(pid, ()))
    return total, count


def du_bytes(paths: Sequence[Path]) -> int:
    """Bytes allocated on disk (st_blocks) under the given files and folders (hidden temp files included)."""
    total = 0
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not os.path.isdir(p):
            total += st.st_blocks * 512
            continue
        for dirpath, _dirs, files in os.walk(p):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
    return total


class Sampler(threading.Thread):
    """Samples the process tree's RSS (every 0.2 s) and the watched paths' disk use (every second)."""

    def __init__(self, pid: int, watch: Sequence[Path]) -> None:
        super().__init__(daemon=True)
        self.pid, self.watch = pid, list(watch)
        self.stop_event = threading.Event()
        self.rss_peak = self.disk_peak = self.max_procs = 0
        self.series: list[list[float]] = []  # [seconds, tree RSS MiB] about every second

    def run(self) -> None:
        last_disk = last_series = 0.0
        t0 = time.monotonic()
        while not self.stop_event.is_set():
            rss, n = tree_rss(self.pid)
            self.rss_peak = max(self.rss_peak, rss)
            self.max_procs = max(self.max_procs, n)
            now = time.monotonic()
            if now - last_series >= 1.0:
                self.series.append([round(now - t0, 1), round(rss / 2**20, 1)])
                last_series = now
            if self.watch and now - last_disk >= 1.0:
                self.disk_peak = max(self.disk_peak, du_bytes(self.watch))
                last_disk = now
            self.stop_event.wait(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        if self.watch:
            self.disk_peak = max(self.disk_peak, du_bytes(self.watch))


@dataclass
class Run:
    """One measured process: a stage, a V2 step or an import baseline."""

    name: str
    argv: list[str]
    log: str
    rc: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    maxrss_mb: float = 0.0        # largest single process of the tree (wait4 ru_maxrss)
    tree_rss_mb: float = 0.0      # sampled peak of the RSS summed over the tree
    max_procs: int = 0
    disk_peak_b: int = 0
    disk_final_b: int = 0
    others_cpu_s: float = 0.0     # CPU time of every other process on the machine meanwhile
    steal_s: float = 0.0
    load_start: list[float] = field(default_factory=list)
    load_end: list[float] = field(default_factory=list)
    started: str = ""
    rss_series: list[list[float]] = field(default_factory=list)  # [s, tree RSS MiB] about every second
    result: dict[str, Any] | None = None  # a worker's JSON
    info: dict[str, Any] = field(default_factory=dict)  # parsed from the log


def measure(name: str, argv: Sequence[Any], log_path: Path, watch: Sequence[Path] = (), check: bool = True,
            cwd: Path | None = None) -> Run:
    """Run ``argv`` as a child process, output to ``log_path``, and measure it (see :class:`Run`)."""
    argv = [str(a) for a in argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = Run(name, argv, str(log_path), started=dt.datetime.now().isoformat(timespec="seconds"))
    hz = os.sysconf("SC_CLK_TCK")
    stat0, self0, run.load_start = read_proc_stat(), os.times(), [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write("# " + " ".join(argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO)
    sampler = Sampler(proc.pid, [Path(p) for p in watch])
    sampler.start()
    _, status, ru = os.wait4(proc.pid, 0)
    run.wall_s = time.perf_counter() - t0
    proc.returncode = run.rc = os.waitstatus_to_exitcode(status)
    sampler.stop()
    stat1, self1 = read_proc_stat(), os.times()
    run.load_end = [round(v, 2) for v in os.getloadavg()]
    run.user_s, run.sys_s = ru.ru_utime, ru.ru_stime
    run.cpu_s = ru.ru_utime + ru.ru_stime
    run.maxrss_mb = ru.ru_maxrss / 1024
    run.tree_rss_mb = max(sampler.rss_peak / 2**20, run.maxrss_mb if sampler.rss_peak == 0 else 0)
    run.max_procs = sampler.max_procs
    run.rss_series = sampler.series
    run.disk_peak_b, run.disk_final_b = sampler.disk_peak, du_bytes([Path(p) for p in watch])
    driver_cpu = (self1.user - self0.user) + (self1.system - self0.system)
    machine_busy = (busy_ticks(stat1) - busy_ticks(stat0)) / hz
    run.others_cpu_s = max(0.0, machine_busy - run.cpu_s - driver_cpu)
    run.steal_s = (stat1["steal"] - stat0["steal"]) / hz
    text = log_path.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith(JSON_TAG):
            run.result = json.loads(line[len(JSON_TAG):])
            break
    log(f"{name}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, peak RSS {run.maxrss_mb:.0f} MiB "
        f"(tree {run.tree_rss_mb:.0f} MiB), disk {run.disk_final_b / 1e6:.1f} MB (peak {run.disk_peak_b / 1e6:.1f}), "
        f"others used {run.others_cpu_s / max(run.wall_s, 1e-9):.2f} cores" + (f", EXIT {run.rc}" if run.rc else ""))
    if check and run.rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise SystemExit(f"{name} failed (exit {run.rc}); log {log_path}:\n{tail}")
    return run


# ==============================================================================================================
# log parsing
# ==============================================================================================================

def _t(line: str) -> float | None:
    m = LOG_TIME.match(line)
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_train_log(text: str, batch_size: int, samples_per_epoch: int) -> dict[str, Any]:
    info: dict[str, Any] = {}
    lines = text.splitlines()
    for line in lines:
        if "training data: " in line:
            info["data_decision"] = line.split("training data: ", 1)[1]
            info["resident"] = "resident on" in info["data_decision"]
        m = re.search(r"test fold (\d+): (\d+) scans, (\d+) crops \((\d+) positive\), held out; train: (\d+) scans, "
                      r"(\d+) crops \((\d+) positive\); selection: (\d+) scans, (\d+) crops \((\d+) positive\)", line)
        if m:
            v = [int(x) for x in m.groups()]
            info.update(test_fold=v[0], test_scans=v[1], test_crops=v[2], train_scans=v[4], train_crops=v[5],
                        train_pos=v[6], sel_scans=v[7], sel_crops=v[8], sel_pos=v[9])
        m = re.search(r"loaded (\d+) training and (\d+) selection crops onto \S+ in ([\d.]+) s", line)
        if m:
            info["resident_load_s"] = float(m.group(3))
        if "cpu: ATen capability" in line:
            info["cpu_report"] = line.split("; ", 1)[-1]
    # steady training rate per epoch: from the first batch's line to the epoch's "done" line
    rates, epoch_s = [], []
    for epoch in range(1, 100):
        first = next((_t(l) for l in lines if f"E{epoch} Training 1/" in l), None)
        done = next((_t(l) for l in lines if re.search(rf"E{epoch} Training \d+/\d+ batches done", l)), None)
        start = next((_t(l) for l in lines if re.search(rf"Epoch {epoch} of \d+,", l)), None)
        if first is None or done is None:
            break
        if start is not None:
            epoch_s.append(done - start)
        steady = samples_per_epoch - min(batch_size, samples_per_epoch)
        if done > first and steady > 0:
            rates.append(steady / (done - first))
    info["train_epoch_s"] = epoch_s
    info["samples_per_s_epochs"] = rates
    if rates:
        info["samples_per_s"] = max(rates[1:] or rates)  # epoch 1 carries warm-up; later epochs are steady
    sel_start = next((_t(l) for l in lines if re.search(r"E\d+ Selection: \d+ crops", l)), None)
    sel_end = None
    for l in lines:
        m = re.search(r"predicted (\d+)/(\d+) selection crops \(100\.0%\), ([\d.]+)/s", l)
        if m:
            sel_end = _t(l)
            info["selection_crops"] = int(m.group(2))
            info["selection_rate_log"] = float(m.group(3))
    if sel_start and sel_end and sel_end > sel_start:
        info["selection_s"] = sel_end - sel_start
    first_line, last_line = next((_t(l) for l in lines if _t(l)), None), None
    for l in reversed(lines):
        if _t(l):
            last_line = _t(l)
            break
    if first_line and last_line:
        info["logged_span_s"] = last_line - first_line
    return info


def parse_predict_log(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for line in text.splitlines():
        m = re.search(r"predicted (\d+)/(\d+) candidates \(100\.0%\), ([\d.]+)/s", line)
        if m:
            info["predicted"] = int(m.group(2))
            info["rate_log"] = float(m.group(3))
        m = re.search(r"wrote .*: (\d+) candidates of (\d+) scans in ([\d.]+) s", line)
        if m:
            info["scans"] = int(m.group(2))
            info["app_s"] = float(m.group(3))
    return info


def parse_crops_log(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for line in text.splitlines():
        m = re.search(r"(\d+) crops in ([\d.]+) s \(([\d.]+) crops/s\)", line)
        if m:
            info["crops"], info["cut_loop_s"], info["rate_log"] = int(m.group(1)), float(m.group(2)), float(m.group(3))
        if "time per phase" in line:
            info["phases"] = line.split(": ", 2)[-1]
    return info


def parse_synth_log(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if "summary: {" in line:
            return json.loads(line.split("summary: ", 1)[1])
    return {}


# ==============================================================================================================
# machine, disk
# ==============================================================================================================

def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cores": os.cpu_count(), "threads_used": threads}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for key in ("Model name", "Hypervisor vendor", "L3 cache", "Thread(s) per core"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
            if m:
                info[key.lower().replace(" ", "_").replace("(s)", "s")] = m.group(1).strip()
    except OSError:
        pass
    with open("/proc/meminfo") as fh:
        mem = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in fh if ":" in l}
    info["ram_gb"] = round(mem.get("MemTotal", 0) / 2**30, 1)
    info["mem_available_gb_at_start"] = round(mem.get("MemAvailable", 0) / 2**30, 1)
    code = ("import json, torch, numpy, h5py, pandas, SimpleITK as s; "
            "from luna.cpu_speed import cpu_report; "
            "print(json.dumps({'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), "
            "'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'cpu_report': cpu_report(), "
            "'numpy': numpy.__version__, 'h5py': h5py.__version__, 'pandas': pandas.__version__, "
            "'SimpleITK': s.Version_VersionString(), 'cuda': torch.cuda.is_available()}))")
    out = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, check=False)
    try:
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        info["torch_error"] = out.stderr[-300:]
    info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    info["nice"] = os.nice(0)
    return info


def mean_slices(thicknesses: Sequence[float]) -> float:
    """Mean slice count of luna.synth's full-size scans: extent uniform in FULL_Z_MM, thickness uniform in the list."""
    extent = sum(FULL_Z_MM) / 2
    return sum(extent / t for t in thicknesses) / len(thicknesses)


def disk_need(n_scans: int, cps: float, thicknesses: Sequence[float]) -> dict[str, float]:
    """Bytes one size needs at its peak: scans, the crop store plus its resume cache (the crop stage holds both
    until the store is committed), predictions and the rest."""
    scan_b = mean_slices(thicknesses) * FULL_XY * FULL_XY * 2
    scans = n_scans * scan_b
    crops = n_scans * cps * CROP_BYTES
    small = n_scans * cps * 600 + 200e6  # tables, predictions, models, logs
    return {"scans": scans, "crops": crops, "peak": scans + 2 * crops + small, "final": scans + crops + small}


def gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB"


def drop_page_cache(paths: Sequence[Path]) -> int:
    """fsync + posix_fadvise(DONTNEED) each file (the VM host may still cache them): a cold read."""
    n = 0
    for p in paths:
        files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else []
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return n


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ==============================================================================================================
# workers: small measured processes (``scale.py --worker NAME ...``), each printing one JSON line
# ==============================================================================================================

def _rss_now() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Steps:
    """Time and RSS of consecutive steps inside one process."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.base = {"rss_mb": _rss_now(), "peak_mb": _peak()}

    def run(self, name: str, fn, *args, **kwargs):
        before, t0 = _rss_now(), time.perf_counter()
        value = fn(*args, **kwargs)
        self.steps.append({"step": name, "s": time.perf_counter() - t0, "rss_before_mb": before,
                           "rss_after_mb": _rss_now(), "peak_mb": _peak()})
        return value

    def emit(self, **extra: Any) -> None:
        print(JSON_TAG + json.dumps({"base": self.base, "steps": self.steps, **extra}), flush=True)


def worker_v2_candidates(csv: str, annotations: str) -> None:
    from luna.luna16 import drop_duplicate_candidates, match_diameters, read_annotations_csv, read_candidates_csv

    s = Steps()
    cand = s.run("read_candidates_csv", read_candidates_csv, csv)
    n_rows = len(cand)
    cand, dup = s.run("drop_duplicate_candidates", drop_duplicate_candidates, cand, csv)
    ann = s.run("read_annotations_csv", read_annotations_csv, annotations)
    diameter = s.run("match_diameters", match_diameters, cand, ann)
    s.emit(rows=n_rows, kept=len(cand), duplicates=dup.n_dropped, matched=int((diameter > 0).sum()),
           scans=int(cand["seriesuid"].nunique()),
           frame_bytes_per_row=int(cand.memory_usage(deep=True).sum()) / max(len(cand), 1))


def worker_crop_table(tsv: str, subset: str) -> None:
    from luna.crops import read_subset_candidates

    s = Steps()
    table = s.run("read_subset_candidates", read_subset_candidates, tsv, subset)
    s.emit(rows_of_subset=len(table), frame_bytes_per_row=int(table.memory_usage(deep=True).sum()) / max(len(table), 1))


def worker_store_table(stores: Sequence[str]) -> None:
    """What opening crop stores costs (the per-row tables every training and predict process holds)."""
    from luna.inference import rows_of_scans
    from luna.store import CropStore

    s = Steps()
    opened = s.run("CropStore(...) (per-row table)", lambda: [CropStore(p) for p in stores])
    rows = s.run("rows_of_scans (all scans)", rows_of_scans, opened, None)
    n = sum(len(o) for o in opened)
    deep = sum(int(o.table.memory_usage(deep=True).sum()) + o.center_irc.nbytes + o.crop_start_irc.nbytes
               for o in opened)
    s.emit(rows=n, table_bytes_per_row=deep / max(n, 1),
           rows_frame_bytes_per_row=int(rows.memory_usage(deep=True).sum()) / max(len(rows), 1))


def worker_v2_froc(pred_files: Sequence[str], annotations: str, excluded: str | None, uids_file: str,
                   n_bootstrap: int) -> None:
    import numpy as np
    import pandas as pd

    from luna.evaluation import read_predictions_tsv
    from luna.froc import froc, froc_bootstrap
    from luna.luna16 import read_annotations_csv
    from luna.metrics import metric_row
    from luna.validation import as_written

    uids = [l.strip() for l in Path(uids_file).read_text().splitlines() if l.strip()]
    s = Steps()
    frames = s.run("read_predictions_tsv (10 fold files)", lambda: [read_predictions_tsv(p) for p in pred_files])
    pred = s.run("concat", pd.concat, frames, ignore_index=True)
    del frames
    ann = s.run("read annotations", read_annotations_csv, annotations)
    exc = s.run("read annotations_excluded", read_annotations_csv, excluded, True) if excluded else None
    result = s.run("froc (888 scans, top 100 per scan)", froc, pred, ann, uids, exc, 100)
    s.run(f"froc_bootstrap ({n_bootstrap} samples)", froc_bootstrap, pred, ann, uids, exc, 100,
          n_bootstrap=n_bootstrap, seed=0)
    s.run("metric_row (AUC, loss, P/R over all rows)", metric_row, pred["is_nodule"].to_numpy(),
          pred["probability"].to_numpy(), pred["loss"].to_numpy(), epoch=1, split="test", threshold=0.5)
    s.run("validation.as_written (float32 -> shortest decimal)", as_written,
          pred["probability"].to_numpy(dtype=np.float32))
    s.emit(rows=len(pred), frame_bytes_per_row=int(pred.memory_usage(deep=True).sum()) / max(len(pred), 1),
           scans=len(uids), cpm=result.cpm, n_nodules=result.n_nodules, n_hit=result.n_hit,
           n_candidates_top100=result.n_candidates, n_ignored_excluded=result.n_ignored_excluded)


def worker_v2_make_csv(out: str, uids_file: str, annotations: str, excluded: str | None, rows: int, seed: int) -> None:
    """A candidates_V2-sized CSV in LUNA16's format (seriesuid,coordX,coordY,coordZ,class, CRLF)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    uids = [l.strip() for l in Path(uids_file).read_text().splitlines() if l.strip()]
    ann = pd.read_csv(annotations)
    exc = pd.read_csv(excluded) if excluded else None
    n_pos = min(V2_POSITIVES, max(len(ann), int(round(rows * V2_POSITIVES / V2_ROWS))))
    # positives: one per nodule, then a second one on randomly chosen nodules, jittered by <= d/8
    pick = np.r_[np.arange(len(ann)), rng.choice(len(ann), n_pos - len(ann), replace=n_pos - len(ann) > len(ann))]
    a = ann.iloc[pick]
    d = a["diameter_mm"].to_numpy()[:, None]
    pos_xyz = a[["coordX", "coordY", "coordZ"]].to_numpy() + rng.uniform(-1, 1, (len(a), 3)) * d / 8
    pos = pd.DataFrame({"seriesuid": a["seriesuid"].to_numpy(), "coordX": pos_xyz[:, 0], "coordY": pos_xyz[:, 1],
                        "coordZ": pos_xyz[:, 2], "class": 1})
    n_dup = max(1, rows // 15_000)  # exact repeats, dropped with one warning (the reader's duplicate path)
    n_neg = rows - n_pos - n_dup
    # negatives: some on excluded findings, the rest spread over the scans (gamma-distributed counts per scan)
    parts = []
    n_exc = 0
    if exc is not None and len(exc):
        e = exc.sample(n=min(len(exc), n_neg // 50), random_state=seed)
        xyz = e[["coordX", "coordY", "coordZ"]].to_numpy() + rng.uniform(-0.5, 0.5, (len(e), 3))
        parts.append(pd.DataFrame({"seriesuid": e["seriesuid"].to_numpy(), "coordX": xyz[:, 0], "coordY": xyz[:, 1],
                                   "coordZ": xyz[:, 2], "class": 0}))
        n_exc = len(e)
    weights = rng.gamma(3.0, 1.0, len(uids))
    counts = rng.multinomial(n_neg - n_exc, weights / weights.sum())
    z0 = {u: float(z) for u, z in ann.groupby("seriesuid")["coordZ"].mean().items()}
    uid_col = np.repeat(np.asarray(uids, dtype=object), counts)
    zc = np.repeat(np.asarray([z0.get(u, float(rng.uniform(-250, -50))) for u in uids]), counts)
    xyz = np.c_[rng.uniform(-170, 170, len(uid_col)), rng.uniform(-200, 120, len(uid_col)),
                zc + rng.uniform(-150, 150, len(uid_col))]
    parts.append(pd.DataFrame({"seriesuid": uid_col, "coordX": xyz[:, 0], "coordY": xyz[:, 1], "coordZ": xyz[:, 2],
                               "class": 0}))
    table = pd.concat([pos, *parts], ignore_index=True)
    for c in ("coordX", "coordY", "coordZ"):
        table[c] = table[c].round(2)
    table = table.drop_duplicates(["seriesuid", "coordX", "coordY", "coordZ"])
    while len(table) < rows - n_dup:  # rounding collisions (rare): top up
        extra = table[table["class"] == 0].sample(n=rows - n_dup - len(table), random_state=seed + 1).copy()
        extra["coordX"] = (extra["coordX"] + rng.uniform(-0.5, 0.5, len(extra))).round(2)
        table = pd.concat([table, extra], ignore_index=True).drop_duplicates(["seriesuid", "coordX", "coordY", "coordZ"])
    table = table.iloc[: rows - n_dup]
    order = np.argsort(table["seriesuid"].to_numpy(), kind="stable")  # grouped by scan, as LUNA16's file
    table = table.iloc[order].reset_index(drop=True)
    dups = table[table["class"] == 0].sample(n=n_dup, random_state=seed + 2)
    at = np.sort(rng.choice(np.arange(len(table) + 1), n_dup))
    pieces, last = [], 0
    for k, i in enumerate(at):
        pieces.append(table.iloc[last:i])
        pieces.append(dups.iloc[[k]])
        last = i
    pieces.append(table.iloc[last:])
    table = pd.concat(pieces, ignore_index=True)
    table.to_csv(out, index=False, float_format="%.2f", lineterminator="\r\n")
    print(JSON_TAG + json.dumps({"rows": len(table), "positives": int(table["class"].sum()), "duplicates": n_dup,
                                 "on_excluded": n_exc, "scans": len(uids),
                                 "rows_per_scan_min_max": [int(counts.min()), int(counts.max())]}), flush=True)


def worker_v2_make_folds(candidates_tsv: str, model: str, history: str, folds_dir: str, seed: int) -> None:
    """Ten fold folders for luna-evaluate: model.pt (the rehearsal's, its test fold set to N), history.tsv, and
    predictions.tsv over fold N's rows of the V2 candidates (fold = subset number), probabilities drawn per class."""
    import numpy as np
    import pandas as pd

    from luna.candidates import read_candidates_tsv
    from luna.evaluation import PREDICTION_COLUMNS
    from luna.io import write_tsv
    from luna.model import atomic_torch_save, load_checkpoint

    rng = np.random.default_rng(seed)
    cand = read_candidates_tsv(candidates_tsv)
    y = cand["is_nodule"].fillna(0).to_numpy(dtype=np.int64)
    p = np.where(y == 1, rng.beta(4.0, 1.5, len(y)), rng.beta(0.6, 12.0, len(y))).astype(np.float32)
    p = np.clip(p, np.float32(1e-7), np.float32(1 - 1e-7))
    loss = (-np.log(np.where(y == 1, p, 1 - p))).astype(np.float32)
    as_text = lambda v: v.astype(str).astype(np.float64)  # float32 -> shortest decimal, as predictions.tsv holds it
    fold = cand["subset"].str.extract(r"(\d+)$")[0].astype(np.int64).to_numpy()
    frame = pd.DataFrame({
        "candidate_id": cand["candidate_id"].to_numpy(np.int64), "series_uid": cand["series_uid"].astype(str),
        "coord_x": cand["coord_x"], "coord_y": cand["coord_y"], "coord_z": cand["coord_z"], "is_nodule": y,
        "diameter_mm": cand["diameter_mm"].astype(np.float32), "probability": as_text(p), "loss": as_text(loss),
        "fold": fold})[PREDICTION_COLUMNS]
    ckpt = load_checkpoint(model)
    written = []
    for f in sorted(set(fold.tolist())):
        d = Path(folds_dir) / str(f)
        d.mkdir(parents=True, exist_ok=True)
        write_tsv(frame[frame["fold"] == f], d / "predictions.tsv")
        shutil.copyfile(history, d / "history.tsv")
        ckpt["test_fold"] = int(f)
        atomic_torch_save(ckpt, d / "model.pt")
        written.append(str(d))
    print(JSON_TAG + json.dumps({"folds": written, "rows": len(frame)}), flush=True)


WORKERS = {
    "v2-candidates": worker_v2_candidates, "crop-table": worker_crop_table,
    "store-table": worker_store_table, "v2-froc": worker_v2_froc, "v2-make-csv": worker_v2_make_csv,
    "v2-make-folds": worker_v2_make_folds,
}


def run_worker(argv: list[str]) -> None:
    name, rest = argv[0], argv[1:]
    if name == "v2-froc":
        files = rest[0].split(",")
        WORKERS[name](files, rest[1], rest[2] or None, rest[3], int(rest[4]))
    elif name == "store-table":
        WORKERS[name](rest)
    elif name == "v2-make-csv":
        WORKERS[name](rest[0], rest[1], rest[2], rest[3] or None, int(rest[4]), int(rest[5]))
    elif name == "v2-make-folds":
        WORKERS[name](rest[0], rest[1], rest[2], rest[3], int(rest[4]))
    else:
        WORKERS[name](*rest)


def worker_argv(name: str, *args: Any) -> list[str]:
    return [str(PYTHON), str(Path(__file__).resolve()), "--worker", name, *[str(a) for a in args]]


# ==============================================================================================================
# the rehearsal at one size
# ==============================================================================================================

def bin_(name: str) -> str:
    return str(VENV_BIN / name)


def scan_stats(root: Path) -> dict[str, Any]:
    """Shapes and spacings from the .mhd headers; candidates per scan from candidates.csv."""
    import pandas as pd

    shapes, spacings = [], []
    for mhd in sorted(root.glob("subset*/*.mhd")):
        header = dict(l.split(" = ", 1) for l in mhd.read_text().splitlines() if " = " in l)
        shapes.append([int(v) for v in header["DimSize"].split()])      # x y z
        spacings.append([float(v) for v in header["ElementSpacing"].split()])
    cand = pd.read_csv(root / "candidates.csv")
    per_scan = cand.groupby("seriesuid").size()
    voxels = [x * y * z for x, y, z in shapes]
    return {
        "n_scans": len(shapes), "slices_mean": sum(s[2] for s in shapes) / len(shapes),
        "slices_min_max": [min(s[2] for s in shapes), max(s[2] for s in shapes)],
        "xy": sorted({(s[0], s[1]) for s in shapes}),
        "spacing_xy_min_max": [min(s[0] for s in spacings), max(s[0] for s in spacings)],
        "spacing_z_values": sorted({round(s[2], 4) for s in spacings}),
        "voxels_total": sum(voxels), "voxels_max": max(voxels), "scan_bytes_max": max(voxels) * 2,
        "scan_bytes_mean": sum(voxels) * 2 / len(voxels),
        "candidates": int(len(cand)), "positives": int(cand["class"].sum()),
        "candidates_per_scan_mean": float(per_scan.mean()),
        "candidates_per_scan_min_max": [int(per_scan.min()), int(per_scan.max())],
    }


def choose_fold(candidates_tsv: Path, uids: list[str], selection_fraction: float) -> dict[str, Any]:
    """A fold count (5, else fewer) and a test fold whose roles train can accept: the training set has nodules
    and non-nodules, the test fold a nodule, the selection set (fraction tried upwards, else none) both."""
    import pandas as pd

    from luna.splits import fold_roles, make_splits

    cand = pd.read_csv(candidates_tsv, sep="\t", dtype={"series_uid": str})
    pos = cand.groupby("series_uid")["is_nodule"].sum().to_dict()
    neg = (cand.groupby("series_uid")["is_nodule"].count() - cand.groupby("series_uid")["is_nodule"].sum()).to_dict()
    for k in (5, 4, 3, 2):
        splits = make_splits({u: "subset0" for u in uids}, k)
        order = sorted(set(splits["fold"]), key=lambda f: (-(splits["fold"] == f).sum(), f))
        for fraction in [selection_fraction, 0.3, 0.4, 0.5, 0.0]:
            for f in order:
                roles = fold_roles(splits, f, fraction)
                count = {r: [sum(pos.get(u, 0) for u, x in roles.items() if x == r),
                             sum(neg.get(u, 0) for u, x in roles.items() if x == r)] for r in ("train", "selection", "test")}
                if count["train"][0] < 1 or count["train"][1] < 1 or count["test"][0] < 1:
                    continue
                if fraction > 0 and (count["selection"][0] < 1 or count["selection"][1] < 1):
                    continue
                return {"folds": k, "test_fold": int(f), "selection_fraction": fraction, "roles": count}
    raise SystemExit("no fold assignment gives training, selection and test sets with nodules; use more scans")


def run_size(n: int, args: argparse.Namespace, work: Path, logs: Path) -> dict[str, Any]:
    """Every stage on one synthetic subset of ``n`` scans."""
    import pandas as pd

    tag = f"n{n}"
    base = work / tag
    if base.exists():
        shutil.rmtree(base)
    data, res = base / "data", base / "results"
    res.mkdir(parents=True)
    out: dict[str, Any] = {"n_scans": n, "stages": {}}
    st = out["stages"]
    threads = args.threads
    exp_pos = args.nodules_per_scan * (1 + 0.3)
    npp = max(1.0, (args.candidates_per_scan - exp_pos) / exp_pos)
    out["negatives_per_positive"] = round(npp, 2)

    log(f"--- size {n} scans: synthesize (negatives per positive {npp:.1f} for ~{args.candidates_per_scan:g} "
        f"candidates per scan)")
    st["synth"] = measure("synth", [
        bin_("luna-synth"), "--out", data, "--jobs", args.synth_jobs, "--n-subsets", 1, "--scans-per-subset", n,
        "--full-size", "--nodules-per-scan", args.nodules_per_scan, "--negatives-per-positive", f"{npp:.4f}",
        "--slice-thicknesses-mm", *args.slice_thicknesses, "--seed", args.seed + n,
    ], logs / f"{tag}_synth.log", watch=[data])
    st["synth"].info = parse_synth_log(Path(st["synth"].log).read_text())
    out["data"] = scan_stats(data)
    d = out["data"]
    log(f"data: {d['n_scans']} scans, {d['candidates']} candidates ({d['candidates_per_scan_mean']:.0f}/scan), "
        f"slices mean {d['slices_mean']:.0f} (range {d['slices_min_max']}), spacing xy {d['spacing_xy_min_max']}, "
        f"z {d['spacing_z_values']}, {gb(d['voxels_total'] * 2)} of voxels")

    st["candidates"] = measure("candidates", [bin_("luna-candidates"), "--root", data, "--out",
                                              res / "candidates.tsv"], logs / f"{tag}_candidates.log",
                               watch=[res / "candidates.tsv"])
    uids = sorted(p.stem for p in data.glob("subset*/*.mhd"))
    choice = choose_fold(res / "candidates.tsv", uids, args.selection_fraction)
    out["fold_choice"] = choice
    st["split"] = measure("split", [bin_("luna-split"), "--root", data, "--folds", choice["folds"], "--out",
                                    res / "splits.tsv"], logs / f"{tag}_split.log", watch=[res / "splits.tsv"])

    crops_dir = res / "crops"
    store = crops_dir / "subset0.h5"
    if not args.warm:
        drop_page_cache([data / "subset0"])
    st["crops"] = measure("crops", [bin_("luna-crops"), "--candidates", res / "candidates.tsv", "--root", data,
                                    "--subset", "subset0", "--out", store, "--threads", threads],
                          logs / f"{tag}_crops.log", watch=[crops_dir])
    st["crops"].info = parse_crops_log(Path(st["crops"].log).read_text())
    out["store_bytes"] = store.stat().st_size
    out["store_rows"] = st["crops"].info.get("crops", 0)

    # the per-row tables of a store (what every training and predict process holds)
    st["store-table"] = measure("store table", worker_argv("store-table", store), logs / f"{tag}_store_table.log")

    # training: auto decides resident or streaming; then the other path
    fold = choice["test_fold"]
    train_common = ["--crops", store, "--splits", res / "splits.tsv", "--test-fold", fold,
                    "--selection-fraction", choice["selection_fraction"], "--epochs", args.epochs,
                    "--samples-per-epoch", args.samples_per_epoch, "--batch-size", args.batch_size,
                    "--selection-interval", args.epochs, "--threads", threads, "--tb-dir", "none"]
    if choice["selection_fraction"] == 0:
        train_common += ["--keep", "last", "--threshold", "0.5"]
    fold_dir = res / "folds" / str(fold)
    if not args.warm:
        drop_page_cache([store])
    st["train"] = measure("train (data-on-device auto)", [bin_("luna-train"), *train_common, "--out", fold_dir,
                                                          "--data-on-device", "auto"],
                          logs / f"{tag}_train.log", watch=[fold_dir, res / "folds" / f".{fold}.train_state"])
    st["train"].info = parse_train_log(Path(st["train"].log).read_text(), args.batch_size, args.samples_per_epoch)
    resident = bool(st["train"].info.get("resident"))
    log(f"train: {st['train'].info.get('data_decision', '?')}; "
        f"{st['train'].info.get('samples_per_s', float('nan')):.1f} samples/s")
    if args.both_paths:
        other = "never" if resident else "always"
        need = (st["train"].info.get("train_crops", 0) + st["train"].info.get("sel_crops", 0)) * CROP_BYTES
        if other == "always" and need > 0.45 * mem_available():
            out["other_path_skipped"] = (f"resident would take {gb(need)}, more than 0.45 of the "
                                         f"{gb(mem_available())} available now")
            log(f"train (other path) skipped: {out['other_path_skipped']}")
        else:
            other_dir = res / "folds" / f"{fold}-{other}"
            if not args.warm:
                drop_page_cache([store])
            st["train-other"] = measure(f"train (data-on-device {other})", [
                bin_("luna-train"), *train_common, "--out", other_dir, "--data-on-device", other],
                logs / f"{tag}_train_{other}.log", watch=[other_dir, res / "folds" / f".{fold}-{other}.train_state"])
            st["train-other"].info = parse_train_log(Path(st["train-other"].log).read_text(), args.batch_size,
                                                     args.samples_per_epoch)

    # predict every candidate of the subset with the fold's model; evaluate needs a fold folder and a splits
    # table in which every predicted scan belongs to the model's test fold, and refuses scans the model.pt
    # records as trained or chosen on: its copy here lists none (a timing rehearsal; no metric is reported)
    eval_in = res / "eval_in" / str(fold)
    eval_in.mkdir(parents=True)
    os.symlink(fold_dir / "history.tsv", eval_in / "history.tsv")
    from luna.model import atomic_torch_save, load_checkpoint

    ckpt = load_checkpoint(fold_dir / "model.pt")
    ckpt["train_series_uids"], ckpt["selection_series_uids"] = [], []
    atomic_torch_save(ckpt, eval_in / "model.pt")
    if not args.warm:
        drop_page_cache([store])
    st["predict"] = measure("predict (--scans all)", [
        bin_("luna-predict"), "--model", fold_dir / "model.pt", "--crops", store, "--scans", "all",
        "--threads", threads, "--batch-size", args.predict_batch, "--out", eval_in / "predictions.tsv"],
        logs / f"{tag}_predict.log", watch=[eval_in / "predictions.tsv"])
    st["predict"].info = parse_predict_log(Path(st["predict"].log).read_text())
    from luna.io import write_tsv

    write_tsv(pd.DataFrame({"series_uid": uids, "subset": "subset0", "fold": fold}), res / "eval_splits.tsv")
    excluded = data / "annotations_excluded.csv"
    st["evaluate"] = measure("evaluate", [
        bin_("luna-evaluate"), "--folds", eval_in, "--splits", res / "eval_splits.tsv", "--out", res / "validation",
        "--annotations", data / "annotations.csv", "--annotations-excluded", excluded,
        "--bootstrap", args.bootstrap], logs / f"{tag}_evaluate.log", watch=[res / "validation"])
    out["model"] = str(fold_dir / "model.pt")
    out["history"] = str(fold_dir / "history.tsv")
    out["disk_total_b"] = du_bytes([base])
    return out


# ==============================================================================================================
# LUNA16-sized tables
# ==============================================================================================================

def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def official_tables(work: Path, seed: int) -> dict[str, Any]:
    """The official annotations and series UIDs (tests/fixtures/luna16-csv; excluded findings where present)."""
    import pandas as pd

    ann = LUNA16_CSV / "annotations.csv"
    exc = LUNA16_CSV / "annotations_excluded.csv"  # not in the repository (3.4 MB): FROC then counts every FP
    uids_src = LUNA16_CSV / "seriesuids.csv"
    uids_file = work / "v2" / "seriesuids.txt"
    uids_file.parent.mkdir(parents=True, exist_ok=True)
    if uids_src.is_file():
        uids = [l.strip() for l in uids_src.read_text().splitlines() if l.strip()]
        note = f"the 888 official series UIDs ({_shown(uids_src)})"
    else:  # the 601 annotated scans' UIDs plus made-up ones
        import random

        uids = sorted(set(pd.read_csv(ann)["seriesuid"]))
        r = random.Random(seed)
        while len(uids) < LUNA16_SCANS:
            uids.append("1.3.6.1.4.1.14519.5.2.1.6279.6001." + str(r.randrange(10**29, 10**30)))
        note = "the 601 annotated scans' UIDs and 287 made-up ones"
    uids_file.write_text("\n".join(sorted(uids)) + "\n")
    return {"annotations": str(ann), "excluded": str(exc) if exc.is_file() else "", "uids_file": str(uids_file),
            "uids_note": note, "n_uids": len(uids)}


def run_v2(args: argparse.Namespace, work: Path, logs: Path, model: str | None, history: str | None) -> dict[str, Any]:
    v2 = work / "v2"
    if v2.exists():
        shutil.rmtree(v2)
    v2.mkdir(parents=True)
    tables = official_tables(work, args.seed)
    out: dict[str, Any] = {"tables": tables, "stages": {}}
    st = out["stages"]
    uids = Path(tables["uids_file"]).read_text().split()
    root = v2 / "root"
    for i, uid in enumerate(uids):  # 888 empty placeholder scans: the candidates and split stages only glob them
        folder = root / f"subset{i * LUNA16_FOLDS // len(uids)}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{uid}.mhd").touch()
    csv = v2 / "candidates_V2.csv"
    log(f"--- LUNA16-sized tables: writing a {args.v2_rows:,}-row candidates CSV over {tables['uids_note']}")
    made = measure("make V2 CSV (setup, not a stage)", worker_argv(
        "v2-make-csv", csv, tables["uids_file"], tables["annotations"], tables["excluded"], args.v2_rows, args.seed),
        logs / "v2_make_csv.log")
    out["csv"] = made.result
    st["candidates"] = measure("V2 luna-candidates", [
        bin_("luna-candidates"), "--root", root, "--candidates", csv, "--annotations", tables["annotations"],
        "--out", v2 / "candidates.tsv"], logs / "v2_candidates.log", watch=[v2 / "candidates.tsv"])
    st["split"] = measure("V2 luna-split (888 scans, subsets)", [
        bin_("luna-split"), "--root", root, "--folds", "subsets", "--out", v2 / "splits.tsv"],
        logs / "v2_split.log", watch=[v2 / "splits.tsv"])
    st["functions"] = measure("V2 read_candidates_csv + drop_duplicate_candidates + match_diameters", worker_argv(
        "v2-candidates", csv, tables["annotations"]), logs / "v2_functions.log")
    st["crop-table"] = measure("V2 crop stage's read_subset_candidates(subset0)", worker_argv(
        "crop-table", v2 / "candidates.tsv", "subset0"), logs / "v2_crop_table.log")
    if model and history:
        folds_dir = v2 / "folds"
        made = measure("make V2 fold folders (setup, not a stage)", worker_argv(
            "v2-make-folds", v2 / "candidates.tsv", model, history, folds_dir, args.seed), logs / "v2_make_folds.log")
        folders = made.result["folds"] if made.result else []
        pred_files = ",".join(str(Path(f) / "predictions.tsv") for f in folders)
        st["froc"] = measure(f"V2 froc + froc_bootstrap({args.v2_bootstrap})", worker_argv(
            "v2-froc", pred_files, tables["annotations"], tables["excluded"], tables["uids_file"],
            args.v2_bootstrap), logs / "v2_froc.log")
        ev = [bin_("luna-evaluate"), "--folds", *folders, "--splits", v2 / "splits.tsv", "--out", v2 / "validation",
              "--annotations", tables["annotations"], "--bootstrap", args.bootstrap]
        if tables["excluded"]:
            ev += ["--annotations-excluded", tables["excluded"]]
        st["evaluate"] = measure(f"V2 luna-evaluate (10 folds, bootstrap {args.bootstrap})", ev, logs / "v2_evaluate.log",
                                 watch=[v2 / "validation"])
    out["disk_total_b"] = du_bytes([v2])
    return out


# ==============================================================================================================
# report
# ==============================================================================================================

def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}"


def mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.1f}"


def hours(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def stage_items(name: str, size: dict[str, Any], r: Run, args: argparse.Namespace) -> tuple[str, str]:
    d = size["data"]
    if name == "synth":
        return (f"{d['n_scans']} scans, {d['voxels_total'] / 1e9:.2f} Gvoxels, {d['candidates']:,} cand.",
                f"{r.cpu_s / d['n_scans']:.1f} CPU s/scan; {d['voxels_total'] * 2 / 1e6 / r.wall_s:.0f} MB/s")
    if name == "candidates":
        return f"{d['candidates']:,} candidates", f"{d['candidates'] / r.wall_s:,.0f} rows/s"
    if name == "split":
        return f"{d['n_scans']} scans", "-"
    if name == "crops":
        n = r.info.get("crops", size.get("store_rows", 0))
        return (f"{n:,} crops of {d['n_scans']} scans ({d['voxels_total'] * 2 / 1e9:.1f} GB read)",
                f"{n / r.wall_s:,.0f} crops/s; {d['voxels_total'] * 2 / 1e6 / r.wall_s:.0f} MB/s of scans")
    if name.startswith("train"):
        i = r.info
        samples = args.epochs * args.samples_per_epoch
        path = "resident" if i.get("resident") else "streaming"
        sel = i.get("selection_crops", 0)
        rate = i.get("samples_per_s", float("nan"))
        sel_rate = sel / i["selection_s"] if i.get("selection_s") else float("nan")
        return (f"{samples:,} samples ({path}), {sel:,} selection crops",
                f"{fmt(rate)} samples/s (steady); selection {fmt(sel_rate)} crops/s")
    if name == "predict":
        n = r.info.get("predicted", 0)
        return f"{n:,} candidates of {r.info.get('scans', d['n_scans'])} scans", f"{n / r.wall_s:,.1f} cand./s (loop {fmt(r.info.get('rate_log'))}/s)"
    if name == "evaluate":
        return f"{d['candidates']:,} predictions, bootstrap {args.bootstrap}", "-"
    if name == "store-table":
        rows = (r.result or {}).get("rows", 0)
        return f"{rows:,} store rows", "-"
    return "-", "-"


def stage_table(size: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = ["| stage | wall s | CPU s | others' CPU (cores) | peak RSS MiB (largest process) | peak RSS MiB (tree) | "
            "disk written MB (peak during) | items | rate |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in size["stages"].items():
        items, rate = stage_items(name, size, r, args)
        label = r.name + ("" if r.rc == 0 else f" **(exit {r.rc})**")
        disk = "-" if not r.disk_final_b and not r.disk_peak_b else f"{mb(r.disk_final_b)} ({mb(r.disk_peak_b)})"
        rows.append(f"| {label} | {r.wall_s:,.1f} | {r.cpu_s:,.1f} | {r.others_cpu_s / max(r.wall_s, 1e-9):.2f} | "
                    f"{r.maxrss_mb:,.0f} | {r.tree_rss_mb:,.0f} | {disk} | {items} | {rate} |")
    return rows


def rss_over_time(stages: dict[str, Run], min_wall_s: float = 20.0) -> list[str]:
    """Tree RSS at fractions of each long stage's wall time: flat once the stage is under way means nothing
    accumulates per candidate, scan or batch."""
    cuts = (0.1, 0.25, 0.5, 0.75, 0.9)
    rows = ["RSS of the process tree during each stage longer than "
            f"{min_wall_s:.0f} s (MiB at a fraction of its wall time; sampled every second):", "",
            "| stage | " + " | ".join(f"{c:.0%}" for c in cuts) + " | peak |", "|---|" + "---:|" * (len(cuts) + 1)]
    for r in stages.values():
        if r.wall_s < min_wall_s or len(r.rss_series) < 5:
            continue
        T = r.rss_series[-1][0]
        vals = [min(r.rss_series, key=lambda p: abs(p[0] - c * T))[1] for c in cuts]
        rows.append(f"| {r.name} | " + " | ".join(f"{v:,.0f}" for v in vals) + f" | {r.tree_rss_mb:,.0f} |")
    return rows if len(rows) > 4 else []


def steps_table(r: Run) -> list[str]:
    res = r.result or {}
    rows = [f"Process peak RSS {r.maxrss_mb:,.0f} MiB, {r.wall_s:.1f} s wall (imports included); RSS after imports "
            f"{res.get('base', {}).get('rss_mb', 0):,.0f} MiB.", "",
            "| step | s | RSS before MiB | RSS after MiB | process peak so far MiB |", "|---|---:|---:|---:|---:|"]
    for s in res.get("steps", []):
        rows.append(f"| {s['step']} | {s['s']:.2f} | {s['rss_before_mb']:,.0f} | {s['rss_after_mb']:,.0f} | "
                    f"{s['peak_mb']:,.0f} |")
    return rows


def holds(name: str, size: dict[str, Any], args: argparse.Namespace) -> tuple[str, float | None]:
    """What the code deliberately holds in the stage (text) and its big part in bytes at this size."""
    d, st = size["data"], size["stages"]
    threads = args.threads
    per_scan_crops = d["candidates_per_scan_min_max"][1] * CROP_BYTES
    if name == "synth":
        return (f"{args.synth_jobs} scan(s) being rendered at once (one per job; the largest scan here is "
                f"{d['voxels_max'] / 1e6:.0f} Mvoxels: its int16 volume, lung and wall masks and the float work "
                "arrays of the slab being rendered), plus every CSV row as Python lists until the CSVs are written; "
                "judged per voxel of the largest scan", None)
    if name == "candidates":
        return "the whole candidate CSV (read as strings, then numbers) and the output table", None
    if name == "split":
        return "the list of scans", None
    if name == "crops":
        big = threads * d["scan_bytes_max"] + (threads + 1) * per_scan_crops
        return (f"the whole candidates.tsv (every subset's rows), and up to {threads} scan volume(s) being cut plus "
                f"{threads + 1} scans' crops in flight (max_in_flight = threads + 1); the big part is that bound "
                f"with the largest scan and the most crops of a scan: {threads} x {d['scan_bytes_max'] / 1e6:.0f} MB + "
                f"{threads + 1} x {per_scan_crops / 1e6:.0f} MB", big)
    if name.startswith("train"):
        r = st[name]
        if r.info.get("resident"):
            n = r.info.get("train_crops", 0) + r.info.get("sel_crops", 0)
            sel = r.info.get("sel_crops", 0)
            return (f"resident: every training and selection crop in one int16 tensor ({n:,} x 147,456 B), the "
                    "per-row tables of every store given, the model. Under torchrun each process's selection pass "
                    "copies its share of the selection crops (`luna.selection.evaluate_selection`; one process "
                    f"uses the resident tensor as it is; {sel:,} selection crops here)", n * CROP_BYTES)
        return ("streaming: the per-row tables of every store given, one loader batch (num_workers 0 on the CPU), "
                "the model; per-sample outputs of one epoch", None)
    if name == "predict":
        return ("the per-row tables of every store given, the rows predicted and their predictions frame, two "
                f"batches of {args.predict_batch} crops (the reader thread reads ahead one)", None)
    if name == "evaluate":
        return "every prediction (pandas), the FROC entries, the ROC/PR curves over every prediction", None
    if name == "store-table":
        return "the store's per-row table (candidate_id, series_uid, centre, label, diameter) and geometry", None
    return "-", None


def memory_check(sizes: list[dict[str, Any]], baselines: dict[str, Run], args: argparse.Namespace) -> list[str]:
    """Per stage and size: working set (peak RSS - the script's start-up peak), the deliberate big part, what is
    left unexplained, and how that grows per extra candidate between the sizes."""
    rows = ["| stage | what the code holds (from the code) | " + " | ".join(
        f"{s['n_scans']} scans: candidates; working set = peak - start-up; deliberate big part; unexplained (MiB)"
        for s in sizes) + " | unexplained growth per extra candidate | verdict |",
        "|---|---|" + "---|" * len(sizes) + "---:|---|"]
    for name in sizes[-1]["stages"]:
        if name == "store-table" or not all(name in s["stages"] for s in sizes):
            continue
        stage = "train" if name.startswith("train") else name
        base = baselines[stage].maxrss_mb if stage in baselines else 0.0
        cells, unexplained, cands, per_voxel = [], [], [], []
        text = ""
        for s in sizes:
            r = s["stages"][name]
            text, big = holds(name, s, args)
            peak = r.tree_rss_mb if name == "synth" else r.maxrss_mb
            working = peak - base
            big_mib = (big or 0) / 2**20
            left = max(0.0, working - big_mib)
            n = s["data"]["candidates"]
            cells.append(f"{n:,}; {working:,.0f}; {fmt(big_mib, 0) if big else '-'}; {left:,.0f}")
            unexplained.append(left)
            cands.append(n)
            if name == "synth":
                per_voxel.append(working * 2**20 / (args.synth_jobs * s["data"]["voxels_max"]))
        dn = cands[-1] - cands[0]
        slope = (unexplained[-1] - unexplained[0]) * 2**20 / dn if len(sizes) > 1 and dn else float("nan")
        if name == "synth":
            spread = max(per_voxel) / min(per_voxel) if min(per_voxel) > 0 else float("nan")
            verdict = (f"{' / '.join(f'{v:.1f}' for v in per_voxel)} B per voxel of the largest scan per job: "
                       + ("ok: follows the largest scan, not the candidates" if spread < 1.5 else
                          "**differs between sizes: check**"))
            rows.append(f"| {name} | {text} | " + " | ".join(cells) + " | (per voxel instead) | " + verdict + " |")
            continue
        fractions = {s["fold_choice"]["selection_fraction"] > 0 for s in sizes}
        if not math.isfinite(slope):
            verdict = "one size only"
        elif stage == "train" and len(fractions) > 1:
            verdict = ("not comparable: one size had no selection set (no selection pass, whose batch of "
                       f"{2 * args.batch_size} crops takes more memory)")
        elif dn < 10_000:
            verdict = f"{'ok' if slope <= PER_ROW_BUDGET else 'grows?'} (too few extra candidates to tell)"
        elif slope <= PER_ROW_BUDGET:
            verdict = f"ok: grows by per-row tables only (< {PER_ROW_BUDGET:,} B per candidate)"
        else:
            verdict = f"**grows by {slope / 1e3:,.0f} KB per candidate beyond the deliberate holds**"
        if stage == "train" and all(s["stages"][name].info.get("resident") for s in sizes) and dn:
            copy = [s["stages"][name].info.get("sel_crops", 0) * CROP_BYTES for s in sizes]
            verdict += (f"; the selection-pass copy of the resident selection crops accounts for "
                        f"{(copy[-1] - copy[0]) / dn / 1e3:,.1f} KB per extra candidate")
        rows.append(f"| {name} | {text} | " + " | ".join(cells) + f" | {fmt(slope, 0)} B | {verdict} |")
    return rows


def projection(sizes: list[dict[str, Any]], v2: dict[str, Any] | None, args: argparse.Namespace,
               machine: dict[str, Any], baselines: dict[str, Run]) -> list[str]:
    s = sizes[-1]
    st, d = s["stages"], s["data"]
    n, cands = d["n_scans"], d["candidates"]
    rows_total = V2_ROWS
    scans_total = LUNA16_SCANS
    cps_luna = rows_total / scans_total
    lines = []
    # crops
    crop = st["crops"]
    crops_per_s = crop.info.get("crops", cands) / crop.wall_s
    crop_s_scan = crop.wall_s / n
    store_b_per_crop = s["store_bytes"] / max(s["store_rows"], 1)
    crop_10 = crop.wall_s * (scans_total / n) * 1.0
    # train
    tr = st["train"]
    stream = st["train"] if not st["train"].info.get("resident") else st.get("train-other", st["train"])
    sps = tr.info.get("samples_per_s", float("nan"))
    sel_crops = tr.info.get("selection_crops", 0)
    sel_rate = sel_crops / tr.info["selection_s"] if tr.info.get("selection_s") else float("nan")
    startup_s = baselines["train"].wall_s if "train" in baselines else 0.0
    setup_s = stream.wall_s - sum(stream.info.get("train_epoch_s", [])) - (stream.info.get("selection_s") or 0)
    setup_per_cand = max(0.0, setup_s - startup_s) / max(
        stream.info.get("train_crops", 1) + stream.info.get("sel_crops", 0) + stream.info.get("test_crops", 0), 1)
    sel_per_fold = 0.9 * args.projection_selection_fraction * rows_total
    epoch_s = BOOK_EPOCH_SAMPLES / sps if sps == sps else float("nan")
    E = args.projection_epochs
    train_fold_s = startup_s + setup_per_cand * rows_total + E * epoch_s + E * sel_per_fold / sel_rate
    # predict
    pr = st["predict"]
    pred_rate = pr.info.get("predicted", cands) / pr.wall_s
    pred_fold_s = (rows_total / LUNA16_FOLDS) / pred_rate
    gpu_sps = None
    if GPU_CHECK.is_file():
        m = re.search(r"fastest training: ([\d.]+) samples/s", GPU_CHECK.read_text())
        gpu_sps = float(m.group(1)) if m else None
    v2s = (v2 or {}).get("stages", {})
    cand_s = v2s["candidates"].wall_s if "candidates" in v2s else st["candidates"].wall_s * rows_total / cands
    split_s = v2s["split"].wall_s if "split" in v2s else st["split"].wall_s
    eval_s = v2s["evaluate"].wall_s if "evaluate" in v2s else st["evaluate"].wall_s * rows_total / cands
    synth_s = st["synth"].wall_s / n * scans_total
    scans_b = d["scan_bytes_mean"] * scans_total
    store_total = store_b_per_crop * rows_total
    lines += [
        f"Measured rates from the {n}-scan run (this machine: {machine.get('cores')} cores, "
        f"{machine.get('model_name', '?')}, {machine.get('cpu_capability', '?')}); LUNA16: {scans_total} scans, "
        f"{rows_total:,} V2 candidates ({cps_luna:.0f} per scan), 10 subsets = 10 folds. The book's epoch: "
        f"{BOOK_EPOCH_SAMPLES:,} samples; projected with {E} epochs, selection every epoch on "
        f"{args.projection_selection_fraction:g} of the other folds' scans ({sel_per_fold:,.0f} crops per pass), as the "
        "README's LUNA16 example.",
        "",
        "| stage | scales with | formula (per run) | this CPU, 888 scans / 10 folds | disk |",
        "|---|---|---|---:|---|",
        f"| synthesize (not run for LUNA16: downloaded) | scans x voxels | {st['synth'].wall_s / n:.1f} s x scans "
        f"({args.synth_jobs} job(s)) | {hours(synth_s)} | {gb(scans_b)} of scans (the synthetic's mean "
        f"{d['scan_bytes_mean'] / 1e6:.0f} MB/scan; use LUNA16's own size) |",
        f"| candidates | CSV rows | {'measured on the ' + format(rows_total, ',') + '-row table' if 'candidates' in v2s else 'extrapolated linearly from ' + format(cands, ',') + ' rows (start-up dominated: an upper bound)'} | {hours(cand_s)} | "
        f"{mb(v2s['candidates'].disk_final_b) if 'candidates' in v2s else '-'} MB candidates.tsv |",
        f"| split | scans | measured on 888 scans | {hours(split_s)} | negligible |",
        f"| crops (10 subset jobs, {args.threads} threads each, one after another) | scans read (voxels) + "
        f"candidates cut and written twice (cache, store) | {crop_s_scan:.2f} s x scans at LUNA16's density "
        f"({crops_per_s:,.0f} crops/s, {d['voxels_total'] * 2 / 1e6 / crop.wall_s:.0f} MB/s of scans) | "
        f"{hours(crop_10)} (one job per subset: {hours(crop_10 / 10)} each, in parallel on a cluster) | "
        f"{gb(store_total)} of stores ({store_b_per_crop:,.0f} B per crop); a running job holds its store and its "
        f"cache: +{gb(store_total / 10)} per job while it runs |",
        f"| train, per fold (CPU) | epochs x samples per epoch / samples/s, + selection passes x selection crops / "
        f"inference rate, + start-up + opening the stores ~ candidates (streaming, as a LUNA16 fold must: see "
        f"below) | {startup_s:.0f} s + {setup_per_cand * 1e3:.3f} ms x {rows_total:,} + {E} x "
        f"{BOOK_EPOCH_SAMPLES:,} / {fmt(sps)} + {E} x {sel_per_fold:,.0f} / {fmt(sel_rate)} | "
        f"{hours(train_fold_s)} per fold, {hours(10 * train_fold_s)} for 10 folds (epoch {hours(epoch_s)}) | "
        "model.pt + state: < 10 MB per fold |",
    ]
    if gpu_sps:
        lines.append(f"| train, per fold (GPU, H100: {gpu_sps:,.0f} samples/s, benchmarks/results/gpu_check_h100.txt) | "
                     f"same | {E} x {BOOK_EPOCH_SAMPLES:,} / {gpu_sps:,.0f} + selection passes (GPU inference rate not "
                     f"measured) | {hours(E * BOOK_EPOCH_SAMPLES / gpu_sps)} per fold for the training steps "
                     f"({hours(BOOK_EPOCH_SAMPLES / gpu_sps)} per epoch) | - |")
    lines += [
        f"| predict, per fold (test fold's candidates) | candidates predicted | candidates / {pred_rate:,.1f} per s "
        f"| {hours(pred_fold_s)} per fold, {hours(10 * pred_fold_s)} for 10 folds | "
        f"{mb(st['predict'].disk_final_b / max(pr.info.get('predicted', cands), 1) * rows_total)} MB of predictions |",
        f"| evaluate (10 folds pooled) | predictions (+ bootstrap x scans) | "
        f"{'measured on ' + format(rows_total, ',') + ' predictions' if 'evaluate' in v2s else 'extrapolated linearly from ' + format(cands, ',') + ' predictions'}, "
        f"bootstrap {args.bootstrap} | {hours(eval_s)} | "
        f"{mb(v2s['evaluate'].disk_final_b) if 'evaluate' in v2s else '-'} MB |",
        "",
        f"Total on this CPU (crops, 10 x train, 10 x predict, evaluate): "
        f"**{hours(cand_s + split_s + crop_10 + 10 * train_fold_s + 10 * pred_fold_s + eval_s)}**. "
        f"Disk: LUNA16's scans + {gb(store_total)} of crop stores + {gb(store_total / 10)} per crop job running.",
    ]
    return lines


def write_report(path: Path, report: dict[str, Any], args: argparse.Namespace) -> None:
    m, sizes, v2 = report["machine"], report["sizes"], report.get("v2")
    L: list[str] = []
    L += ["# Scale rehearsal: one LUNA16-sized subset, measured, projected to 888 scans and 10 folds", "",
          f"Written by `benchmarks/scale.py` ({' '.join(report['argv'])}) on {report['started']} in "
          f"{report['minutes']:.1f} min.{' **Smoke run (--quick): tiny training, few scans; not for conclusions.**' if args.quick else ''}",
          "",
          *([f"**{args.scans} scans, not the ~89 of one LUNA16 subset:** every stage is measured per scan and per "
             "candidate at full size and LUNA16's density, and the projection below uses those rates; a full "
             "89-scan subset would take about 7x this run's time (the per-scan stages) on this machine.", ""]
            if args.scans < 80 and not args.quick else []),
          f"Machine: {m.get('model_name', '?')} ({m.get('hypervisor_vendor', 'bare metal')} VM), {m.get('cores')} cores, "
          f"{m.get('ram_gb')} GiB RAM ({m.get('mem_available_gb_at_start')} GiB available at the start), "
          f"{m.get('platform')}; Python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} threads, "
          f"CPU capability {m.get('cpu_capability')}), numpy {m.get('numpy')}, pandas {m.get('pandas')}, h5py "
          f"{m.get('h5py')}, SimpleITK {m.get('SimpleITK')}. `{m.get('cpu_report', '')}`. Stages ran with "
          f"{args.threads} threads; this process's niceness {m.get('nice')}.",
          f"Load average (1, 5, 15 min) at the start {m.get('load_average_at_start')}, at the end "
          f"{report.get('load_average_at_end')}. The machine may be shared: *others' CPU* is the CPU time every other "
          "process used during the stage, in cores (from /proc/stat); wall times grow with it, CPU seconds much less.",
          ""]
    for s in sizes:
        d = s["data"]
        L += [f"## {s['n_scans']} scans: measured stages", "",
              f"Data (luna-synth --full-size, one subset): {d['n_scans']} scans of {d['xy'][0][0]}x{d['xy'][0][1]}, "
              f"{d['slices_mean']:.0f} slices on average ({d['slices_min_max'][0]}-{d['slices_min_max'][1]}), in-plane "
              f"spacing {d['spacing_xy_min_max'][0]:.3f}-{d['spacing_xy_min_max'][1]:.3f} mm, slice spacing "
              f"{', '.join(f'{v:g}' for v in d['spacing_z_values'])} mm (LUNA16: 0.46-0.98 mm, 0.625-2.5 mm); "
              f"{gb(d['voxels_total'] * 2)} of scans (largest {d['scan_bytes_max'] / 1e6:.0f} MB); "
              f"{d['candidates']:,} candidates ({d['positives']} positive), {d['candidates_per_scan_mean']:.0f} per scan "
              f"({d['candidates_per_scan_min_max'][0]}-{d['candidates_per_scan_min_max'][1]}; LUNA16 V2: 850, V1: 621); "
              f"negatives per positive asked: {s['negatives_per_positive']}.",
              f"Folds: {s['fold_choice']['folds']} hash folds, test fold {s['fold_choice']['test_fold']}, selection "
              f"fraction {s['fold_choice']['selection_fraction']}. Predict runs with `--scans all` (every candidate of "
              "the subset, training scans too: the timing is what matters, not the metrics); evaluate reads those "
              "predictions with a splits table that puts every scan in the model's test fold. "
              + ("Page cache: each stage's input scans/store were dropped from it first (fsync + "
                 "posix_fadvise DONTNEED; the VM host may still cache them)." if not args.warm else
                 "Page cache: warm (--warm)."),
              ""]
        L += stage_table(s, args)
        tr = s["stages"]["train"].info
        L += ["", f"Training: `{tr.get('data_decision', '?')}`. Steady samples/s per epoch: "
              f"{', '.join(fmt(v) for v in tr.get('samples_per_s_epochs', []))} ({args.samples_per_epoch} samples per "
              f"epoch, batch {args.batch_size}, {args.epochs} epochs, selection once after the last); training part of "
              f"each epoch {', '.join(fmt(v) for v in tr.get('train_epoch_s', []))} s; the selection pass "
              f"{fmt(tr.get('selection_s'))} s for {tr.get('selection_crops', 0):,} crops; the rest of the wall time "
              "(start, imports, opening the stores, loading resident crops, writing model.pt) "
              f"{fmt(s['stages']['train'].wall_s - sum(tr.get('train_epoch_s', [])) - (tr.get('selection_s') or 0))} s."]
        if "train-other" in s["stages"]:
            o = s["stages"]["train-other"]
            L += [f"Other path: `{o.info.get('data_decision', '?')}`: peak RSS {o.maxrss_mb:,.0f} MiB against "
                  f"{s['stages']['train'].maxrss_mb:,.0f} MiB, {fmt(o.info.get('samples_per_s'))} samples/s against "
                  f"{fmt(tr.get('samples_per_s'))}."]
        elif s.get("other_path_skipped"):
            L += [f"Other path skipped: {s['other_path_skipped']}."]
        L += [""] + rss_over_time(s["stages"]) + [""]
        c = s["stages"]["crops"].info
        if c.get("phases"):
            L += [f"Crop stage phases (s, summed over threads): {c['phases']}."]
        L += [f"Disk used by this size at the end: {gb(s['disk_total_b'])}.", ""]
    if v2:
        st = v2["stages"]
        csv = v2.get("csv") or {}
        L += ["## LUNA16-sized tables (candidates_V2: 754,975 rows, 888 scans)", "",
              f"A {csv.get('rows', 0):,}-row candidates CSV in LUNA16's format over {v2['tables']['uids_note']}: "
              f"{csv.get('positives', 0):,} positives jittered around the {_shown(v2['tables']['annotations'])} nodules, "
              f"{csv.get('on_excluded', 0):,} negatives on excluded findings, the rest spread over the scans "
              f"({csv.get('rows_per_scan_min_max', ['?', '?'])[0]}-{csv.get('rows_per_scan_min_max', ['?', '?'])[1]} "
              f"per scan), {csv.get('duplicates', 0)} exact repeated rows. The scans are 888 empty placeholder files "
              "(the candidates and split stages only list them). Predictions for FROC: probabilities drawn per class "
              "(nodules Beta(4, 1.5), others Beta(0.6, 12)); fold = subset number; evaluate reads ten fold folders "
              "(the rehearsal's model.pt with its test fold set to N).", ""]
        L += ["| stage or function | wall s | CPU s | others' CPU (cores) | peak RSS MiB | disk written MB |",
              "|---|---:|---:|---:|---:|---:|"]
        for key, r in st.items():
            L.append(f"| {r.name} | {r.wall_s:,.1f} | {r.cpu_s:,.1f} | {r.others_cpu_s / max(r.wall_s, 1e-9):.2f} | "
                     f"{r.maxrss_mb:,.0f} | {mb(r.disk_final_b) if r.disk_final_b else '-'} |")
        for key in ("functions", "crop-table", "froc"):
            if key in st and st[key].result:
                L += ["", f"**{st[key].name}**, step by step (one process):", ""] + steps_table(st[key])
                res = st[key].result
                extra = {k: v for k, v in res.items() if k not in ("base", "steps")}
                L += ["", "Result: " + ", ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v:,}"
                                                  if isinstance(v, int) else f"{k} {v}" for k, v in extra.items()) + "."]
        L.append("")
    L += ["## Projection to 888 scans and 10 folds", ""] + projection(sizes, v2, args, m, report["baselines"]) + [""]
    L += ["## What each stage holds in memory", "",
          "From the code, checked against the measured peak RSS at the sizes run. *start-up* is the peak RSS of the "
          "stage's console script run with `--help` (its imports; measured: "
          + ", ".join(f"{k} {v.maxrss_mb:,.0f}" for k, v in report["baselines"].items()) + " MiB); *working set* = "
          "peak - start-up; *deliberate big part* is what the code holds on purpose and is large (the crop stage's "
          "bound on scan volumes and crops in flight, the resident training crops); "
          "*unexplained* = working set - big part (0 when the working set stays within it) is what is left: the "
          "model, activations and allocator slack (a constant) and per-row tables (pandas, Python strings). Its "
          "growth per extra candidate compares the sizes: a stage that held a crop or a volume per candidate by "
          "accident would grow by ~147 KB (a crop) per candidate; per-row tables grow by well under "
          f"{PER_ROW_BUDGET:,} B. Synthesize is judged on the tree RSS (its worker processes) per voxel of the "
          "largest scan, which is what it holds.", ""]
    L += memory_check(sizes, report["baselines"], args)
    st_tab = [s["stages"].get("store-table") for s in sizes if "store-table" in s["stages"]]
    if st_tab and st_tab[-1].result:
        r = st_tab[-1].result
        rows = r.get("rows", 0)
        step = r["steps"][0]
        rss_row = (step["rss_after_mb"] - step["rss_before_mb"]) * 2**20 / max(rows, 1)
        deep = r.get("table_bytes_per_row", float("nan"))
        both = deep + r.get("rows_frame_bytes_per_row", 0)
        L += ["", f"Opening a crop store holds its per-row table: {deep:,.0f} B per row (pandas deep size of "
              f"`CropStore.table` + the index arrays; {rss_row:,.0f} B per row of RSS, opening included) on "
              f"{rows:,} rows; `rows_of_scans` adds a copy ({both:,.0f} B per row together). Training and predict "
              f"open every subset's store (workflow/rules/train.smk, validate.smk), so at LUNA16 scale "
              f"({V2_ROWS:,} rows) each such process holds ~{both * V2_ROWS / 1e6:,.0f} MB of tables: "
              "deliberate, and small next to the crops."]
    L += ["", "### Notes on scale (from the code and these numbers)", ""] + scale_notes(report, args)
    L.append("")
    from luna.io import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L))


def scale_notes(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    notes = []
    s = report["sizes"][-1]
    st = s["stages"]
    v2 = (report.get("v2") or {}).get("stages", {})
    if "crop-table" in v2 and v2["crop-table"].result:
        r = v2["crop-table"]
        notes.append(f"- Every crop job reads the whole candidates.tsv and keeps its rows of one subset: on the V2 "
                     f"table that is {r.wall_s:.1f} s and a peak RSS of {r.maxrss_mb:,.0f} MiB per job "
                     "(`luna.crops.read_subset_candidates` reads all subsets' rows, then filters); ten jobs in "
                     "parallel pay it ten times.")
    notes.append(f"- The crop stage writes every crop twice: the diskcache resume cache, then the store; the cache is "
                 f"removed only when the store is committed. Peak disk of the crop stage here: "
                 f"{mb(st['crops'].disk_peak_b)} MB for a {mb(st['crops'].disk_final_b)} MB store. At LUNA16 scale a "
                 "subset job needs ~2x its store while it runs.")
    tr = st["train"].info
    n_train = tr.get("train_crops", 0) + tr.get("sel_crops", 0)
    if n_train:
        notes.append(f"- Resident training crops scale with the training + selection candidates: here {n_train:,} crops "
                     f"= {gb(n_train * CROP_BYTES)}; for a LUNA16 fold (9 of 10 subsets) "
                     f"{gb(0.9 * V2_ROWS * CROP_BYTES)}, so `--data-on-device auto` streams from the stores on any "
                     "machine with less than twice that free (an 80 GB GPU streams too).")
    pr = st["predict"]
    rate = pr.info.get("predicted", 1) / max(pr.wall_s, 1e-9)
    notes.append(f"- Predict on this CPU: {rate:,.1f} candidates/s, so one LUNA16 test fold ({V2_ROWS // 10:,} "
                 f"candidates) takes {hours(V2_ROWS / 10 / rate)}; the training stage's selection pass predicts "
                 "its selection crops at the same rate every `--selection-interval` epochs.")
    if "evaluate" in v2:
        notes.append(f"- luna-evaluate on all {V2_ROWS:,} predictions of 10 folds with bootstrap {args.bootstrap}: "
                     f"{v2['evaluate'].wall_s:.0f} s, peak RSS {v2['evaluate'].maxrss_mb:,.0f} MiB.")
    if "candidates" in v2:
        notes.append(f"- luna-candidates on the V2 table: {v2['candidates'].wall_s:.0f} s, peak RSS "
                     f"{v2['candidates'].maxrss_mb:,.0f} MiB.")
    return notes


# ==============================================================================================================
# main
# ==============================================================================================================

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scans", type=int, default=None, help="scans of the large size (default 89; 4 with --quick)")
    p.add_argument("--small", type=int, default=None,
                   help="scans of the small size run first for the memory check (default scans/4, 2 with --quick); "
                        "0 = one size only")
    p.add_argument("--work", default="/tmp/luna-scale", help="work folder (data, results, logs, scale.json)")
    p.add_argument("--out", default=None, help="report (default docs/scale.md; <work>/scale-quick.md with --quick)")
    p.add_argument("--keep", action="store_true", help="keep each size's data, crops and predictions")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 and 4 scans, tiny training")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of crops, train, predict")
    p.add_argument("--synth-jobs", type=int, default=None, help="luna-synth --jobs (default: cores, 1 with --quick)")
    p.add_argument("--candidates-per-scan", type=float, default=850.0,
                   help="target candidates per scan (LUNA16 V2: 754,975 / 888 = 850; V1: 621)")
    p.add_argument("--nodules-per-scan", type=float, default=round(LUNA16_NODULES_PER_SCAN, 2))
    p.add_argument("--slice-thicknesses", nargs="+", type=float, default=[0.625, 1.0, 1.25, 2.0, 2.5],
                   help="slice thicknesses (mm) drawn uniformly by luna-synth")
    p.add_argument("--selection-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=2, help="training epochs (selection after the last only)")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="default 2048 (64 with --quick)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--predict-batch", type=int, default=64)
    p.add_argument("--no-both-paths", dest="both_paths", action="store_false",
                   help="train with --data-on-device auto only (not the other path as well)")
    p.add_argument("--bootstrap", type=int, default=1000, help="luna-evaluate --bootstrap (the pipeline's default)")
    p.add_argument("--v2-rows", type=int, default=V2_ROWS, help="rows of the LUNA16-sized candidate table")
    p.add_argument("--v2-bootstrap", type=int, default=100, help="froc_bootstrap samples timed in-process")
    p.add_argument("--skip-v2", action="store_true", help="skip the LUNA16-sized tables")
    p.add_argument("--warm", action="store_true", help="do not drop the inputs from the page cache before stages")
    p.add_argument("--projection-epochs", type=int, default=10)
    p.add_argument("--projection-selection-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--report-from", metavar="JSON", default=None,
                   help="only write the report from a finished run's scale.json (to --out, default as that run)")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker or a.report_from:
        return a
    a.scans = a.scans or (4 if a.quick else 89)
    if a.small is None:
        a.small = 2 if a.quick else max(2, round(a.scans / 4))
    a.samples_per_epoch = a.samples_per_epoch or (64 if a.quick else 2048)
    a.synth_jobs = a.synth_jobs or (1 if a.quick else (os.cpu_count() or 1))
    if a.out is None:
        a.out = str(Path(a.work) / "scale-quick.md") if a.quick else str(REPO / "docs" / "scale.md")
    if a.small >= a.scans:
        a.small = 0
    return a


def _runs_from_json(o: Any) -> Any:
    """scale.json back into Run objects (dicts with Run's fields), recursively."""
    if isinstance(o, dict):
        if {"name", "argv", "log", "maxrss_mb"} <= set(o):
            return Run(**o)
        return {k: _runs_from_json(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_runs_from_json(v) for v in o]
    return o


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return
    if args.report_from:
        report = _runs_from_json(json.loads(Path(args.report_from).read_text()))
        saved = argparse.Namespace(**report["args"])
        if args.out:
            saved.out = args.out
        write_report(Path(saved.out), report, saved)
        log(f"wrote {saved.out} from {args.report_from}")
        return
    work = Path(args.work).resolve()
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise SystemExit(f"{work}: exists, is not empty and was not made by this script; choose another --work")
    sizes_n = [n for n in (args.small, args.scans) if n]

    needs = {n: disk_need(n, args.candidates_per_scan, args.slice_thicknesses) for n in sizes_n}
    v2_need = 2e9 if not args.skip_v2 else 0
    need = (sum(v["final"] for v in needs.values()) - needs[sizes_n[-1]]["final"] + needs[sizes_n[-1]]["peak"]
            if args.keep else max(v["peak"] for v in needs.values())) + v2_need
    existing = next(p for p in (work, *work.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    log(f"sizes {sizes_n} scans; disk needed at the peak ~{gb(need)} "
        + ", ".join(f"[{n} scans: scans {gb(v['scans'])}, crops {gb(v['crops'])} (x2 while cropping)]"
                    for n, v in needs.items())
        + f"{' (sizes kept: --keep)' if args.keep else ' (each size deleted when done)'}; free in {work}: {gb(free)}")
    if free < 1.1 * need:
        raise SystemExit(f"not enough free disk in {work}: need ~{gb(1.1 * need)} (with 10% margin), have {gb(free)}")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("benchmarks/scale.py work folder\n")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    t_start = time.perf_counter()
    report: dict[str, Any] = {"argv": ["benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])],
                              "started": dt.datetime.now().isoformat(timespec="seconds"),
                              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "report_from")}}
    report["machine"] = machine_info(args.threads)
    log(f"machine: {report['machine'].get('model_name')}, {report['machine'].get('cores')} cores, "
        f"{report['machine'].get('ram_gb')} GiB, {report['machine'].get('cpu_report')}")

    # the start-up cost of every stage: peak RSS of `<script> --help` (imports, argparse; no data)
    baselines = {}
    for stage, script in STAGE_SCRIPTS.items():
        baselines[stage] = measure(f"{script} --help", [bin_(script), "--help"], logs / f"help_{script}.log")
    report["baselines"] = baselines

    json_path = work / "scale.json"

    def save() -> None:
        def enc(o: Any) -> Any:
            return asdict(o) if isinstance(o, Run) else str(o)
        from luna.io import atomic_path
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(report, default=enc, indent=1))

    report["sizes"] = []
    for n in sizes_n:
        size = run_size(n, args, work, logs)
        report["sizes"].append(size)
        save()
        if not args.keep and n != sizes_n[-1]:
            shutil.rmtree(work / f"n{n}")
    big = report["sizes"][-1]
    if not args.skip_v2:
        report["v2"] = run_v2(args, work, logs, big.get("model"), big.get("history"))
        save()
    if not args.keep:
        for n in sizes_n:
            shutil.rmtree(work / f"n{n}", ignore_errors=True)
        shutil.rmtree(work / "v2", ignore_errors=True)
    report["minutes"] = (time.perf_counter() - t_start) / 60
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    save()
    write_report(Path(args.out), report, args)
    log(f"wrote {args.out} and {json_path} in {report['minutes']:.1f} min")


if __name__ == "__main__":
    main()
