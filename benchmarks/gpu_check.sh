#!/usr/bin/env bash
# GPU check of the training loop (< 5 min): on a CUDA machine, train with and without bf16 autocast,
# report samples/s and GPU utilisation (nvidia-smi, sampled every 0.5 s during each timed phase), and check
# that the data loader keeps up (loader-only crops/s vs. training samples/s, per worker count).
#
#   bash benchmarks/gpu_check.sh [--crops H5 ... --splits TSV]   # default: a generated store of random crops
#
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3), GPU_CHECK_SAMPLES (timed
# training samples per variant, default 8192), GPU_CHECK_BATCH (default 32), GPU_CHECK_ALLOW_CPU=1 (run the
# same steps on the CPU with tiny sizes: only to test this script). Exits 0 with a message when no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]]; then
    echo "gpu_check: no CUDA device visible to torch ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo 'torch not importable')); nothing to check."
    exit 0
  fi
  echo "gpu_check: no CUDA; GPU_CHECK_ALLOW_CPU=1, running the steps on the CPU with tiny sizes (script test only)"
  : "${GPU_CHECK_SAMPLES:=64}"
fi

SMI_LOG=$(mktemp)
SMI_PID=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$SMI_LOG" 2>/dev/null &
  SMI_PID=$!
fi
cleanup() { [[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null || true; rm -f "$SMI_LOG"; }
trap cleanup EXIT

timeout 280 "$PYTHON" - "$SMI_LOG" "$@" <<'PY'
import argparse, contextlib, datetime, io, logging, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from train import make_random_store  # noqa: E402
from luna.data import CropDataset, EpochSampler, make_loader  # noqa: E402
from luna.training import LunaTrainingApp  # noqa: E402
import os  # noqa: E402

smi_log = Path(sys.argv[1])
p = argparse.ArgumentParser()
p.add_argument("--crops", nargs="+")
p.add_argument("--splits")
args = p.parse_args(sys.argv[2:])
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
samples = int(os.environ.get("GPU_CHECK_SAMPLES", "8192"))
batch = int(os.environ.get("GPU_CHECK_BATCH", "32"))
logging.basicConfig(level=logging.WARNING)
if cuda:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")


def utilisation(start: datetime.datetime, end: datetime.datetime) -> str:
    values = []
    for line in smi_log.read_text().splitlines() if smi_log.exists() else []:
        parts = [s.strip() for s in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
        except (ValueError, IndexError):
            continue
        if start <= stamp <= end:
            values.append((float(parts[1]), float(parts[2])))
    if not values:
        return "n/a"
    util = sorted(v[0] for v in values)
    return f"mean {sum(util) / len(util):.0f}% median {util[len(util) // 2]:.0f}% (n={len(util)}), " \
           f"mem {max(v[1] for v in values):.0f} MiB"


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if args.crops:
        crops, splits = args.crops, args.splits
    else:
        crops, splits = make_random_store(tmp, n=2000 if cuda else 200, n_pos=200 if cuda else 20)
    rows = []
    for amp in ("off", "on"):
        for workers in ((0, 4) if cuda else (0,)):
            argv = ["--crops", *crops, "--splits", splits, "--out", str(tmp / f"o-{amp}-{workers}"),
                    "--tb-dir", "none", "--device", device, "--amp", amp, "--batch-size", str(batch),
                    "--num-workers", str(workers), "--samples-per-epoch", str(4 * batch)]
            app = LunaTrainingApp(argv)
            with contextlib.redirect_stderr(io.StringIO()):
                app.setup()
                app._train_epoch(1)  # warm-up (cuDNN autotuning, allocator, workers)
                app.sampler.samples_per_epoch = samples
                if cuda:
                    torch.cuda.synchronize()
                t0, w0 = time.perf_counter(), datetime.datetime.now()
                app._train_epoch(2)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                w1 = datetime.datetime.now()
            rate = samples / elapsed
            rows.append((f"train amp={amp} workers={workers}", rate, utilisation(w0, w1)))
            print(f"{rows[-1][0]:<28s} {rate:9.1f} samples/s   GPU: {rows[-1][2]}", flush=True)
            del app
    base = CropDataset(crops, splits, "train", int16=True)
    best_train = max(r[1] for r in rows)
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
    best_workers = max(loader_rates, key=loader_rates.get)
    keeps_up = loader_rates[best_workers] >= best_train
    print(f"fastest training: {best_train:.1f} samples/s; fastest loader: {loader_rates[best_workers]:.1f} crops/s "
          f"({best_workers} workers) -> loader {'keeps up' if keeps_up else 'is the BOTTLENECK'}")
    amp_on = max(r[1] for r in rows if "amp=on" in r[0])
    amp_off = max(r[1] for r in rows if "amp=off" in r[0])
    print(f"bf16 autocast speed-up: {amp_on / amp_off:.2f}x")
PY
echo "gpu_check: done"
