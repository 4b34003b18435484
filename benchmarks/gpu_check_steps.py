"""Python half of benchmarks/gpu_check.sh (run that script, not this file); argv[1] is the nvidia-smi log the
shell samples into (timestamp, index, uuid, utilisation, memory), the rest are the options below.

What it prints, in order:
  * timed training rows (one warm epoch of GPU_CHECK_SAMPLES samples each, luna-train's default recipe), each with
    the GPU utilisation sampled during it: ``train amp=off|on workers=W`` (crops streamed from HDF5 by the
    DataLoader, --data-on-device never) and ``train resident amp=off|on`` (crops held in one int16 tensor on the
    device, batches gathered, balanced and augmented there, --data-on-device always);
  * ``loader only, W workers``: crops/s of the DataLoader alone; then whether the fastest loader keeps up with
    the fastest training row, the resident path's rate against the best loader row per amp setting, and the bf16
    speed-up of each path;
  * multi-GPU scaling when torch sees more than one GPU: the resident bf16 training as 1, 2 and all visible
    processes under torchrun (--standalone, one process per GPU, DistributedDataParallel), samples/s over all
    processes read from luna.training's progress log of epoch 2, and the factor against 1 process; with one
    GPU or none, one line saying it was skipped and why;
  * end to end: two epochs through LunaTrainingApp.main() with the recipe of the config's ``train`` section
    (luna.runner.config_argv, as scripts/train.py builds it), then a third resumed from the state folder;
    model.pt must load on the CPU with weights_only=True.

Without --crops it trains on benchmarks/train.py's generated store of random crops, with a splits.tsv
(series_uid, subset, fold) made by luna.splits.make_splits over that store's scans (the first fold count
from 5 whose test fold 0 and selection set both hold nodules and other candidates); with --crops give
--splits (luna-split's) and, optionally, --test-fold."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, "benchmarks")
from train import make_random_store  # noqa: E402
from luna.data import CropDataset, EpochSampler, make_loader  # noqa: E402
from luna.runner import config_argv  # noqa: E402
from luna.splits import fold_roles, make_splits, read_fold_roles, write_splits_tsv  # noqa: E402
from luna.store import CropStore  # noqa: E402
from luna.training import LunaTrainingApp  # noqa: E402

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):  # --help, or no log path: this is gpu_check.sh's half
    print(__doc__)
    print("\nusage: bash benchmarks/gpu_check.sh [--crops H5 ... --splits TSV [--test-fold N] "
          "[--selection-fraction F]] [--config YAML]")
    sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
smi_log = Path(sys.argv[1])
p = argparse.ArgumentParser()
p.add_argument("--crops", nargs="+")
p.add_argument("--splits")
p.add_argument("--test-fold", type=int, default=0, help="luna-train --test-fold")
p.add_argument("--selection-fraction", type=float, default=0.2, help="luna-train --selection-fraction")
p.add_argument("--config", default="config/config.yaml",
               help="pipeline config whose `train` section is the end-to-end run's recipe")
args = p.parse_args(sys.argv[2:])
if args.crops and not args.splits:
    p.error("--crops needs --splits (a splits.tsv written by luna-split)")
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
samples = int(os.environ.get("GPU_CHECK_SAMPLES", "8192"))
batch = int(os.environ.get("GPU_CHECK_BATCH", "32"))
scaling_on_cpu = os.environ.get("GPU_CHECK_SCALING_ON_CPU", "0") == "1"
logging.basicConfig(level=logging.WARNING)
if cuda:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible GPU(s), "
          f"{torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")

SMI_STAMP = "%Y/%m/%d %H:%M:%S.%f"
LOG_STAMP = "%Y-%m-%d %H:%M:%S,%f"  # luna.runner.LOG_FORMAT's asctime


def gpu_ids(count: int) -> set[str]:
    """nvidia-smi's names (UUID, and index when CUDA_VISIBLE_DEVICES does not renumber) of torch's first
    ``count`` CUDA devices: the utilisation of a row is that of the GPUs it ran on, not of idle neighbours."""
    ids: set[str] = set()
    for i in range(count):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        if uuid is not None:
            ids.add(f"gpu-{uuid}".lower())
    if not ids or "CUDA_VISIBLE_DEVICES" not in os.environ:
        ids |= {str(i) for i in range(count)}
    return ids


def utilisation(start: datetime.datetime, end: datetime.datetime, gpus: set[str] | None = None) -> str:
    """GPU utilisation (mean, median over the samples) and peak memory of ``gpus`` between start and end, from
    the nvidia-smi log; every GPU's lines when none of them names one of ``gpus`` (e.g. a MIG slice)."""
    lines = []
    for line in smi_log.read_text().splitlines() if smi_log.exists() else []:
        parts = [s.strip() for s in line.split(",")]
        try:
            lines.append((datetime.datetime.strptime(parts[0], SMI_STAMP), {parts[1], parts[2].lower()},
                          float(parts[3]), float(parts[4])))
        except (ValueError, IndexError):
            continue
    if gpus and any(names & gpus for _, names, _, _ in lines):
        lines = [line for line in lines if line[1] & gpus]
    values = [(util, mem) for stamp, _, util, mem in lines if start <= stamp <= end]
    if not values:
        return "n/a"
    util = sorted(v[0] for v in values)
    return f"mean {sum(util) / len(util):.0f}% median {util[len(util) // 2]:.0f}% (n={len(util)}), " \
           f"mem {max(v[1] for v in values):.0f} MiB"


def make_fold_splits(crops: list[str], path: Path, test_fold: int, fraction: float) -> str:
    """splits.tsv over the scans of the generated store: the first fold count (5, 4, 3, 6, ...) whose test
    fold and selection set both hold nodules and other candidates, so luna-train accepts it."""
    tables = [CropStore(c).table for c in crops]
    scans = {uid: "bench" for t in tables for uid in t["series_uid"]}
    for k in (5, 4, 3, *range(6, 11)):
        splits = make_splits(scans, k)
        if not (splits["fold"] == test_fold).any():
            continue
        roles = fold_roles(splits, test_fold, fraction)
        ok = True
        for role in ("test", "selection", "train"):
            labels = [t.loc[t["series_uid"].map(roles) == role, "is_nodule"].to_numpy() > 0 for t in tables]
            n_pos = sum(int(lab.sum()) for lab in labels)
            n_neg = sum(int((~lab).sum()) for lab in labels)
            ok = ok and n_pos > 0 and (n_neg > 0 or role == "train")
        if ok:
            write_splits_tsv(splits, path)
            print(f"splits: {len(splits)} scans in {k} folds by UID hash; test fold {test_fold}, selection "
                  f"fraction {fraction}", flush=True)
            return str(path)
    raise SystemExit("gpu_check: no fold count gives test fold and selection set with nodules; use --crops/--splits")


def timed_train(argv: list[str], n_samples: int) -> tuple[float, datetime.datetime, datetime.datetime]:
    """Samples/s of one warm training epoch of ``n_samples`` in this process (after a short warm-up epoch for
    cuDNN autotuning, the allocator and the workers), and its wall-clock window for the utilisation."""
    app = LunaTrainingApp(argv)
    with contextlib.redirect_stderr(io.StringIO()):
        app.setup()
        app._train_epoch(1)
        app.sampler.samples_per_epoch = n_samples
        if cuda:
            torch.cuda.synchronize()
        t0, w0 = time.perf_counter(), datetime.datetime.now()
        app._train_epoch(2)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        w1 = datetime.datetime.now()
    del app
    if cuda:
        torch.cuda.empty_cache()
    return n_samples / elapsed, w0, w1


def recipe_argv(config: Path) -> list[str]:
    """luna-train flags of the config's ``train`` section as scripts/train.py builds them (config_argv without
    ``gpus``, which picks the process count, not a flag): the end-to-end run checks the recipe that is run."""
    train = dict((yaml.safe_load(config.read_text()) or {}).get("train") or {})
    train.pop("gpus", None)
    return config_argv(train)


def epoch_rate(log_text: str, epoch: int) -> tuple[float, int, datetime.datetime, datetime.datetime] | None:
    """Batches/s of one process over training epoch ``epoch`` from luna.training's log (the progress line with
    the most batches: its rate counts from the epoch's start), the batches it counts, and the epoch's window
    (its "Epoch N of" line to its "done in" line) for the utilisation; None when the lines are missing."""
    # the logger is luna.training, or __main__ under python -m luna.training
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: "
    starts = re.findall(stamp + rf"Epoch {epoch} of ", log_text, re.M)
    progress = re.findall(stamp + rf"E{epoch} Training (\d+)/\d+ batches, ([\d.]+) batches/s", log_text, re.M)
    ends = re.findall(stamp + rf"E{epoch} Training \d+/\d+ batches done in", log_text, re.M)
    if not (starts and progress and ends):
        return None
    _, n, rate = max(progress, key=lambda m: int(m[1]))
    return (float(rate), int(n), datetime.datetime.strptime(starts[-1], LOG_STAMP),
            datetime.datetime.strptime(ends[-1], LOG_STAMP))


def torchrun_rate(argv: list[str], nproc: int, log_path: Path, timeout_s: float) -> tuple[float, str] | str:
    """Samples/s over all ``nproc`` processes of ``python -m luna.training argv`` under torchrun (the command
    luna.runner.run_rule_torchrun starts), from epoch 2's progress line, with the utilisation of the GPUs used;
    or a line saying why there is no rate (exit status, timeout, log lines missing)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "luna.training", *argv]
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: a hung collective must not outlive us
            proc.wait()
            code = None
    text = log_path.read_text()
    tail = " | ".join(line for line in text.splitlines()[-3:])
    if code is None:
        return f"timed out after {timeout_s:.0f} s: {tail}"
    if code != 0:
        return f"exit {code}: {tail}"
    found = epoch_rate(text, 2)
    if found is None:
        return f"no epoch-2 progress lines in the log: {tail}"
    rate, _, w0, w1 = found
    return rate * batch * nproc, utilisation(w0, w1, gpu_ids(nproc) if cuda else None)


def print_row(label: str, rate: float, util: str) -> None:
    """One timed row: label, samples/s and the GPU utilisation, aligned with the other rows."""
    print(f"{label:<28s} {rate:9.1f} samples/s   GPU: {util}", flush=True)


failures: list[str] = []
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if args.crops:
        crops, splits = args.crops, args.splits
    else:
        made = make_random_store(tmp, n=2000 if cuda else 200, n_pos=200 if cuda else 20)
        crops = made[0] if isinstance(made, tuple) else made  # (stores, old splits) or just the stores
        splits = make_fold_splits(crops, tmp / "splits_folds.tsv", args.test_fold, args.selection_fraction)
    fold_argv = ["--test-fold", str(args.test_fold), "--selection-fraction", str(args.selection_fraction)]
    one_gpu = gpu_ids(1) if cuda else None

    # Timed rows (luna-train's default recipe): from the loader per worker count, then resident on the device
    rows: dict[str, float] = {}
    for amp in ("off", "on"):
        for workers in [*((0, 4) if cuda else (0,)), "resident"]:
            resident = workers == "resident"
            label = f"train resident amp={amp}" if resident else f"train amp={amp} workers={workers}"
            argv = ["--crops", *crops, "--splits", splits, *fold_argv, "--out", str(tmp / f"o-{amp}-{workers}"),
                    "--tb-dir", "none", "--device", device, "--amp", amp, "--batch-size", str(batch),
                    "--num-workers", "0" if resident else str(workers), "--samples-per-epoch", str(4 * batch),
                    "--data-on-device", "always" if resident else "never"]
            rate, w0, w1 = timed_train(argv, samples)
            rows[label] = rate
            print_row(label, rate, utilisation(w0, w1, one_gpu))

    roles = read_fold_roles(splits, args.test_fold, args.selection_fraction)
    base = CropDataset(crops, roles, "train", int16=True)
    loader_rates = {}
    for workers in ((0, 2, 4, 8) if cuda else (0, 1)):
        sampler = EpochSampler(base.labels, ratio=1, samples_per_epoch=min(samples, 4096), seed=0)
        loader = make_loader(base, sampler, batch_size=batch, num_workers=workers, pin_memory=cuda)
        it = iter(loader)
        next(it)
        n, t0 = 0, time.perf_counter()
        for crops_t, _, _ in it:
            n += len(crops_t)
        loader_rates[workers] = n / (time.perf_counter() - t0)
        print(f"loader only, {workers} workers      {loader_rates[workers]:9.1f} crops/s", flush=True)
        del it, loader
    fastest = max(rows, key=rows.get)
    best_workers = max(loader_rates, key=loader_rates.get)
    keeps_up = loader_rates[best_workers] >= rows[fastest]
    print(f"fastest training: {rows[fastest]:.1f} samples/s ({fastest}); fastest loader: "
          f"{loader_rates[best_workers]:.1f} crops/s ({best_workers} workers) -> loader "
          f"{'keeps up' if keeps_up else 'is the BOTTLENECK'}")

    def best_loader_row(amp: str) -> str:
        return max((k for k in rows if k.startswith(f"train amp={amp} ")), key=rows.get)

    print("resident vs best loader: " + "; ".join(
        f"amp={amp} {rows[f'train resident amp={amp}']:.1f} vs {rows[best_loader_row(amp)]:.1f} samples/s "
        f"({best_loader_row(amp).split()[-1]}) -> {rows[f'train resident amp={amp}'] / rows[best_loader_row(amp)]:.2f}x"
        for amp in ("off", "on")))
    print(f"bf16 autocast speed-up: loader {rows[best_loader_row('on')] / rows[best_loader_row('off')]:.2f}x, "
          f"resident {rows['train resident amp=on'] / rows['train resident amp=off']:.2f}x")

    # Multi-GPU scaling: the resident bf16 training as 1, 2 and all visible processes under torchrun; each
    # process trains the same number of batches per epoch (4^k, so the last progress mark is the epoch's end)
    n_gpus = torch.cuda.device_count() if cuda else 0
    if n_gpus > 1 or (scaling_on_cpu and not cuda):
        counts = sorted({1, 2, n_gpus}) if cuda else [1, 2]
        scale_amp = "on" if cuda else "off"  # CPU test: fp32, as the CPU emulates bf16 slowly
        unit = "GPU" if cuda else "process"
        per_process = 4
        while per_process * 4 <= max(samples // batch, 1):
            per_process *= 4
        print(f"multi-GPU scaling: resident training amp={scale_amp}, {per_process} batches of {batch} per "
              f"process per epoch, epoch 2's rate from luna.training's progress log"
              f"{'' if cuda else ' (GPU_CHECK_SCALING_ON_CPU=1: gloo processes on the CPU, script test only)'}",
              flush=True)
        scaling: dict[int, float] = {}
        for nproc in counts:
            argv = ["--crops", *crops, "--splits", splits, *fold_argv, "--out", str(tmp / f"scale-{nproc}"),
                    "--tb-dir", "none", "--device", device, "--amp", scale_amp, "--batch-size", str(batch),
                    "--num-workers", "0", "--data-on-device", "always", "--epochs", "2", "--selection-interval",
                    "2", "--samples-per-epoch", str(per_process * batch * nproc)]
            result = torchrun_rate(argv, nproc, tmp / f"scale-{nproc}.log", timeout_s=240)
            label = f"torchrun {nproc} {unit}{'' if nproc == 1 else 's' if cuda else 'es'}"
            if isinstance(result, str):
                failures.append(f"multi-GPU scaling, {label}: {result}")
                print(f"{label:<28s} FAILED: {result}", flush=True)
                continue
            scaling[nproc] = result[0]
            print_row(label, *result)
        if 1 in scaling:
            print(f"multi-GPU scaling vs 1 {unit}: " + ", ".join(
                f"{n}: {scaling[n]:.1f} samples/s = {scaling[n] / scaling[1]:.2f}x ({scaling[n] / scaling[1] / n:.0%} "
                f"per {unit})" for n in sorted(scaling)))
    elif cuda:
        print(f"multi-GPU scaling: skipped, torch sees 1 GPU (CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); it needs 2 or more")
    else:
        print("multi-GPU scaling: skipped, no CUDA device (CPU fallback; GPU_CHECK_SCALING_ON_CPU=1 runs it as gloo "
              "processes on the CPU, to test the script only)")

    # End to end on the device with the config's recipe: two epochs through main() (selection pass each epoch,
    # history, checkpoint), then a third epoch resumed from the state folder; model.pt must load on the CPU
    # with weights_only=True.
    import pandas as pd  # noqa: E402
    from luna.model import load_model  # noqa: E402

    recipe = recipe_argv(Path(args.config))
    out, state = tmp / "e2e", tmp / "e2e-state"
    overrides = ["--samples-per-epoch", str(min(samples, 2048)), "--selection-interval", "1", "--device", device]
    print(f"end-to-end recipe: {args.config} `train` section -> {' '.join(recipe)}; overridden for a short check: "
          f"--epochs 2 (then 3, resumed) {' '.join(overrides)}", flush=True)
    base_argv = ["--crops", *crops, "--splits", splits, *fold_argv, *recipe, *overrides, "--out", str(out),
                 "--state", str(state), "--tb-dir", "none"]
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        codes = [LunaTrainingApp([*base_argv, "--epochs", "2"]).main(),
                 LunaTrainingApp([*base_argv, "--epochs", "3", "--resume"]).main()]
    if any(codes):
        print(log.getvalue()[-3000:], file=sys.stderr)
        raise SystemExit(f"gpu_check: luna-train main() returned {codes}")
    history = pd.read_csv(out / "history.tsv", sep="\t")
    model, ckpt = load_model(out / "model.pt", map_location="cpu")
    selection = history[history["split"] == "selection"]
    print(f"main() 2 epochs + 1 resumed on {device}: {time.perf_counter() - t0:.1f} s; history epochs "
          f"{sorted(set(history['epoch']))} (rows {len(history)}); selection AUC per epoch "
          f"{', '.join(f'{a:.3f}' for a in selection['auc'])}; model.pt loads on CPU (kept epoch {ckpt.get('epoch')}, "
          f"test fold {ckpt.get('test_fold')}, threshold {ckpt.get('threshold')}, tta {(ckpt.get('args') or {}).get('tta')})")
if failures:
    raise SystemExit("gpu_check: " + "; ".join(failures))
