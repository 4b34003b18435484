#!/usr/bin/env bash
# GPU check of the training loop (about 5 min on one GPU, plus about a minute per multi-GPU run). On a CUDA
# machine it reports:
#   * training samples/s with and without bf16 autocast, each with the GPU utilisation (nvidia-smi, sampled
#     every 0.5 s during the timed phase, of the GPUs the row ran on): streamed from HDF5 by the DataLoader
#     ("train amp=off|on workers=W", --data-on-device never) next to resident on the device ("train resident
#     amp=off|on", --data-on-device always: crops in one int16 tensor, batches gathered and augmented there),
#     and the resident rate against the best loader row;
#   * whether the loader keeps up (loader-only crops/s per worker count vs. the fastest training row);
#   * multi-GPU scaling when torch sees more than one GPU: the resident bf16 training under torchrun with 1, 2
#     and all visible GPUs, samples/s and the factor against 1 GPU (one line saying why it was skipped otherwise);
#   * end to end: two epochs + one resumed through luna-train's main() with the recipe of the config's `train`
#     section (default config/config.yaml), shortened (epochs, samples per epoch, a selection pass each epoch).
#
#   bash benchmarks/gpu_check.sh [--crops H5 ... --splits TSV [--test-fold N] [--selection-fraction F]]
#                                [--config YAML]
#   (default: a generated store of random crops and a splits.tsv of its scans, test fold 0)
#
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3), GPU_CHECK_SAMPLES (timed
# training samples per variant and per process in the scaling runs, default 8192), GPU_CHECK_BATCH (default
# 32), GPU_CHECK_TIMEOUT (seconds for all the steps, default 540), GPU_CHECK_ALLOW_CPU=1 (run the same steps
# on the CPU with tiny sizes: only to test this script; GPU_CHECK_SCALING_ON_CPU=1 then also runs the scaling
# step as gloo processes). Exits 0 with a message when no CUDA.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header above, without the shebang and the #s
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
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
  export GPU_CHECK_SAMPLES="${GPU_CHECK_SAMPLES:-16}" GPU_CHECK_BATCH="${GPU_CHECK_BATCH:-4}"  # emulated bf16 on a CPU without it: ~1 sample/s
fi

SMI_LOG=$(mktemp)
SMI_PID=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvidia-smi --query-gpu=timestamp,index,uuid,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$SMI_LOG" 2>/dev/null &
  SMI_PID=$!
fi
cleanup() { [[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null || true; rm -f "$SMI_LOG"; }
trap cleanup EXIT

timeout "${GPU_CHECK_TIMEOUT:-540}" "$PYTHON" benchmarks/gpu_check_steps.py "$SMI_LOG" "$@"
echo "gpu_check: done"
