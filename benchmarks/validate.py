"""Benchmark of the validation stage (run on demand, not part of the test suite): candidates/s.

Builds a synthetic crop store (lung-like noise, a soft-tissue sphere in every 4th crop; 16 candidates per
scan), a LunaModel whose head is fitted on 64 of the crops (so probabilities spread instead of saturating),
then measures on the chosen device:

- the prediction loop (luna.inference.predict: HDF5 read in a background thread + forward pass) for
  fp32 / bf16 autocast x contiguous / channels_last_3d, each compared with fp32 contiguous: largest
  probability difference, decisions at 0.5 that flip, AUC and CPM (must be equal for a default to change).
  Evaluation itself is always float32 (docs/design.md, "Precision policy"); the bf16 rows wrap the same
  predict call in ``torch.autocast`` to measure what that policy gives up;
- batch sizes for the evaluation settings (float32, the model's memory format);
- the HDF5 read + float32 conversion alone (is the loop I/O-bound?);
- the whole app (``ValidationApp``: predictions, metrics, FROC, plots, submission) with its defaults.

    .venv/bin/python benchmarks/validate.py                  # writes benchmarks/results/validate.md
    .venv/bin/python benchmarks/validate.py --quick          # small smoke run, prints only
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import luna.validation
from luna.app import RawDefaultsHelpFormatter
from luna.device import cpu_has_native_bf16, resolve_device
from luna.geometry import Geometry
from luna.inference import crops_to_tensor, predict, read_batch, rows_of_scans
from luna.froc import froc
from luna.io import atomic_path
from luna.metrics import auc_score
from luna.model import LunaModel, load_checkpoint, load_model, save_checkpoint
from luna.splits import make_splits, write_splits_tsv
from luna.store import CropStore, StoreWriter
from luna.validation import ValidationApp, use_channels_last

CROP_SHAPE = (32, 48, 48)
PER_SCAN = 16


def make_inputs(root: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Store, splits, annotations and a head-fitted model in ``root``."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 4 == 0).astype(np.int8)
    crops = rng.normal(-800.0, 60.0, (n, *CROP_SHAPE)).astype(np.float32)
    i, r, c = np.ogrid[:CROP_SHAPE[0], :CROP_SHAPE[1], :CROP_SHAPE[2]]
    for k in np.flatnonzero(labels):
        radius = rng.uniform(2.5, 6.0)
        offset = rng.integers(-3, 4, 3)
        sphere = (i - 16 - offset[0]) ** 2 + (r - 24 - offset[1]) ** 2 + (c - 24 - offset[2]) ** 2 <= radius ** 2
        crops[k][sphere] = rng.normal(40.0, 20.0, int(sphere.sum()))
    for k in np.flatnonzero(labels == 0)[::3]:  # vessel-like bright blobs on some negatives: a harder task
        sphere = (i - 16) ** 2 + (r - 24 - rng.integers(-8, 9)) ** 2 + (c - 24) ** 2 <= rng.uniform(1.5, 4.0) ** 2
        crops[k][sphere] = rng.normal(0.0, 40.0, int(sphere.sum()))
    crops = np.clip(np.rint(crops), -1000, 1000).astype(np.int16)
    uids = np.array([f"1.2.826.0.1.{k // PER_SCAN}" for k in range(n)], dtype=object)
    centers = np.column_stack([np.arange(n) * 30.0 % 300, np.full(n, 100.0), np.arange(n) % PER_SCAN * 10.0])
    geometry = Geometry(np.zeros(3), np.ones(3))
    store = root / "subset0.h5"
    with StoreWriter(store, n, CROP_SHAPE, (-1000, 1000), subset="subset0", compression="none") as writer:
        for uid in dict.fromkeys(uids):
            writer.add_scan(uid, geometry, (200, 512, 512))
        writer.write_rows(np.arange(n), crops, {
            "candidate_id": np.arange(n), "series_uid": uids, "center_xyz": centers,
            "center_irc": np.rint(centers[:, ::-1]).astype(np.int64),
            "crop_start_irc": np.rint(centers[:, ::-1]).astype(np.int64) - np.array(CROP_SHAPE) // 2,
            "is_nodule": labels, "diameter_mm": np.where(labels > 0, 6.0, 0.0).astype(np.float32)})
        writer.commit()
    # splits.tsv: every scan in subset0, so in fold 0, the model's test fold
    splits = write_splits_tsv(make_splits({uid: "subset0" for uid in uids}, "subsets"), root / "splits.tsv")
    annotations = root / "annotations.csv"
    positive = labels > 0
    pd.DataFrame({"seriesuid": uids[positive], "coordX": centers[positive, 0], "coordY": centers[positive, 1],
                  "coordZ": centers[positive, 2], "diameter_mm": 6.0}).to_csv(annotations, index=False)
    model = fit_head(crops[:64], labels[:64])
    checkpoint = save_checkpoint(root / "model.pt", model, epoch=1, extra={"test_fold": 0, "threshold": 0.5})
    return {"store": store, "splits": splits, "annotations": annotations, "model": checkpoint}


def fit_head(crops: np.ndarray, labels: np.ndarray, steps: int = 300) -> LunaModel:
    """Seeded LunaModel, tail BatchNorm statistics from the crops, head fitted on frozen features."""
    torch.manual_seed(0)
    model = LunaModel().eval()
    x = crops_to_tensor(crops)
    with torch.no_grad():
        model.tail_batchnorm.running_mean.fill_(float(x.mean()))
        model.tail_batchnorm.running_var.fill_(float(x.var()))
        features = x
        for block in (model.tail_batchnorm, model.block1, model.block2, model.block3, model.block4):
            features = block(features)
        features = features.reshape(len(x), -1)
    y = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.Adam(model.head_linear.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.head_linear(features), y).backward()
        optimizer.step()
    return model


def cpm_of(rows: pd.DataFrame, probability: np.ndarray, annotations: Path) -> float:
    frame = rows[["series_uid", "coord_x", "coord_y", "coord_z"]].copy()
    frame["probability"] = probability.astype(np.float64)
    return froc(frame, pd.read_csv(annotations), rows["series_uid"].unique()).cpm


def time_predict(model_path: Path, store: CropStore, rows: pd.DataFrame, labels: np.ndarray, device: torch.device,
                 *, amp: bool, channels_last: bool, batch_size: int, repeats: int):
    """Best rate of ``repeats`` runs of luna.inference.predict (float32), with ``amp`` under bf16 autocast: the
    forward pass autocast as training's is, probabilities and losses still from float32 logits."""
    best, probability = 0.0, None
    for _ in range(repeats):
        model, _ = load_model(model_path, map_location=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            prediction = predict(model, [store], rows, labels, batch_size=batch_size, device=device,
                                 channels_last=channels_last)
        best = max(best, prediction.rate)
        probability = prediction.probability
    return best, probability


def time_read(store: CropStore, rows: pd.DataFrame, batch_size: int) -> float:
    store_of = rows["store"].to_numpy()
    row_of = rows["row"].to_numpy()
    t0 = time.perf_counter()
    for lo in range(0, len(rows), batch_size):
        read_batch([store], store_of[lo:lo + batch_size], row_of[lo:lo + batch_size], pin=False)
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="candidates in the store")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the format comparison")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--quick", action="store_true",
                        help="128 candidates, 1 repeat, print only; no bf16 rows on a CPU without native bf16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "validate.md"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats, args.batch_sizes = 128, 1, [32, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="luna-bench-validate-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = make_inputs(root, args.n)
        print(f"inputs: {args.n} crops in {time.perf_counter() - t0:.1f} s", flush=True)
        store = CropStore(paths["store"])
        rows = rows_of_scans([store], None)
        labels = (rows["is_nodule"].to_numpy() > 0).astype(np.int64)

        # warm-up (page cache, oneDNN kernels)
        time_predict(paths["model"], store, rows.iloc[:64], labels[:64], device, amp=False, channels_last=False,
                     batch_size=64, repeats=1)

        variants = []
        reference = None
        # emulated bf16 (a CPU without it) runs at ~1 candidate/s: minutes even for the smoke run's 128
        skip_bf16 = args.quick and device.type == "cpu" and not cpu_has_native_bf16()
        for amp in (False,) if skip_bf16 else (False, True):
            for channels_last in (False, True):
                rate, probability = time_predict(paths["model"], store, rows, labels, device, amp=amp,
                                                 channels_last=channels_last, batch_size=args.batch_size,
                                                 repeats=args.repeats)
                if reference is None:
                    reference = probability
                variants.append({
                    "precision": "bf16 autocast" if amp else "fp32",
                    "memory format": "channels_last_3d" if channels_last else "contiguous",
                    "candidates/s": rate,
                    "max abs dp": float(np.abs(probability - reference).max()),
                    "flips at 0.5": int(((probability > 0.5) != (reference > 0.5)).sum()),
                    "AUC": auc_score(labels, probability),
                    "CPM": cpm_of(rows, probability, paths["annotations"]),
                })
                print(variants[-1], flush=True)

        default_amp = False  # evaluation is float32 on every device (docs/design.md, "Precision policy")
        default_cl = use_channels_last("auto", load_checkpoint(paths["model"]))  # the model's training format
        batches = []
        for batch_size in args.batch_sizes:
            rate, _ = time_predict(paths["model"], store, rows, labels, device, amp=default_amp,
                                   channels_last=default_cl, batch_size=batch_size, repeats=args.repeats)
            batches.append({"batch size": batch_size, "candidates/s": rate})
            print(batches[-1], flush=True)

        read_rate = max(time_read(store, rows, args.batch_size) for _ in range(args.repeats))
        print(f"read + convert only: {read_rate:.0f} candidates/s", flush=True)

        out_dir = root / "validation"
        app_argv = ["--model", str(paths["model"]), "--crops", str(paths["store"]), "--splits", str(paths["splits"]),
                    "--annotations", str(paths["annotations"]), "--out", str(out_dir), "--device", device.type]
        app_rates = []  # the app's own prediction-loop rate: record what its predict call returns

        def recording_predict(*a, **k):
            prediction = predict(*a, **k)
            app_rates.append(prediction.rate)
            return prediction

        luna.validation.predict = recording_predict
        try:
            t0 = time.perf_counter()
            ValidationApp(app_argv).run()
            app_seconds = time.perf_counter() - t0
        finally:
            luna.validation.predict = predict
        app_rate = app_rates[-1] if app_rates else float("nan")  # NaN: the app no longer calls luna.validation.predict
        print(f"app: {app_seconds:.1f} s, predict {app_rate:.1f} candidates/s", flush=True)
    load_end = os.getloadavg()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Validation throughput",
        "",
        f"`benchmarks/validate.py` ({dt.date.today().isoformat()}): {args.n} synthetic 32x48x48 crops "
        f"({PER_SCAN} per scan, a nodule in every 4th), LunaModel with a head fitted on 64 of them; "
        f"device **{device}** ({cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
        f"{'yes' if cpu_has_native_bf16() else 'no'}), "
        f"torch {torch.__version__}, Python {platform.python_version()}. Best of {args.repeats} runs. "
        f"Load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end "
        "(the machine is shared: absolute numbers move with the load, compare within one run).",
        "",
        f"## Precision and memory format (batch {args.batch_size})",
        "",
        "Each row compared with fp32 contiguous on the same crops.",
        "",
        "| precision | memory format | candidates/s | max abs dp | flips at 0.5 | AUC | CPM |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        lines.append(f"| {v['precision']} | {v['memory format']} | {v['candidates/s']:.1f} | {v['max abs dp']:.2e} | "
                     f"{v['flips at 0.5']} | {v['AUC']:.6f} | {v['CPM']:.6f} |")
    lines += [
        "",
        f"## Batch size (evaluation settings on {device}: {'bf16 autocast' if default_amp else 'fp32'}, "
        f"{'channels_last_3d' if default_cl else 'contiguous'})",
        "",
        "| batch size | candidates/s |",
        "|---:|---:|",
    ]
    lines += [f"| {b['batch size']} | {b['candidates/s']:.1f} |" for b in batches]
    lines += [
        "",
        "## I/O and the whole app",
        "",
        f"- HDF5 read + float32 conversion alone: **{read_rate:.0f} candidates/s** (batch {args.batch_size}); "
        "the reader thread overlaps it with the forward pass.",
        f"- `ValidationApp` with its defaults ({args.n} candidates: predictions, metrics, FROC, plots, submission): "
        f"**{app_seconds:.1f} s** in all, prediction loop **{app_rate:.1f} candidates/s**.",
        "",
        "## Defaults chosen",
        "",
    ]
    by_key = {(v["precision"], v["memory format"]): v for v in variants}
    fp32_c, fp32_cl = by_key[("fp32", "contiguous")], by_key[("fp32", "channels_last_3d")]
    bf16_cl = by_key.get(("bf16 autocast", "channels_last_3d"))
    if bf16_cl is None:
        bf16_line = "- bf16 autocast: not run (--quick on a CPU without native bf16, where it is emulated). "
    else:
        bf16_equal = (bf16_cl["flips at 0.5"] == 0 and bf16_cl["AUC"] == fp32_c["AUC"]
                      and bf16_cl["CPM"] == fp32_c["CPM"])
        bf16_line = (
            f"- bf16 autocast (channels_last_3d) runs at {bf16_cl['candidates/s'] / fp32_cl['candidates/s']:.2f}x "
            f"fp32 channels_last_3d; it moves probabilities by up to {bf16_cl['max abs dp']:.1e}, flips "
            f"{bf16_cl['flips at 0.5']} decisions at 0.5, AUC {bf16_cl['AUC']:.6f} vs {fp32_c['AUC']:.6f}, "
            f"CPM {bf16_cl['CPM']:.6f} vs {fp32_c['CPM']:.6f} ({'equal' if bf16_equal else 'not equal'}). ")
    lines += [
        f"- channels_last_3d (fp32) runs at {fp32_cl['candidates/s'] / fp32_c['candidates/s']:.2f}x contiguous, "
        f"probabilities equal to {fp32_cl['max abs dp']:.0e}: evaluation uses the memory format the model was "
        "trained with (`luna-train --channels-last`, on by default; luna-predict's `--channels-last auto`).",
        bf16_line +
        "Evaluation is always float32, on every device and with no option to change it: the selection "
        "pass of luna-train and luna-predict both run luna.inference.predict, which never autocasts; bf16 autocast "
        "is for training steps only (docs/design.md, \"Precision policy\").",
        "- CUDA: float32 as well, in the model's memory format (channels_last_3d by default).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
