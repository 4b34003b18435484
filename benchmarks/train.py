"""Training speed: this project's loop vs. a book-style loop on the same model and data, plus loader and
augmentation throughput. Writes a markdown table to benchmarks/results/train.md.

    .venv/bin/python benchmarks/train.py                       # a generated store of random crops
    .venv/bin/python benchmarks/train.py --crops results/crops/*.h5 --splits results/splits.tsv

Rows:
* training samples/s, book-style: the book's Chapter 12 loop — per-sample augmentation in the Dataset
  (``getCtAugmentedCandidate``), one HDF5 read per sample, eager fp32, contiguous tensors, one-hot labels,
  CrossEntropy(reduction none) then mean — vs. this loop (``LunaTrainingApp._train_epoch`` itself, with the
  defaults) and its ablations (AMP off, channels_last off). Same model, same sampler order, same crops.
* augmentation alone: the book's per-sample version vs. ``augment_batch`` on a collated batch.
* loader only: crops/s through the DataLoader with 0, 1 and 2 workers (batched HDF5 reads, int16 items as
  the trainer loads them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from luna.data import AugmentConfig, CropDataset, EpochSampler, augment_batch, augment_one_book_style, make_loader
from luna.geometry import Geometry
from luna.model import LunaModel
from luna.store import StoreWriter
from luna.device import cpu_has_native_bf16
from luna.training import LunaTrainingApp

RESULTS = Path(__file__).resolve().parent / "results" / "train.md"


def make_random_store(root: Path, n: int = 600, n_pos: int = 60, n_scans: int = 30) -> tuple[list[str], str]:
    """A store of random chest-like crops (positives with a central blob) and a splits.tsv (1 in 5 val)."""
    rng = np.random.default_rng(0)
    uids = [f"9.9.{k}" for k in range(n_scans)]
    labels = np.zeros(n, dtype=np.int8)
    labels[rng.choice(n, n_pos, replace=False)] = 1
    z, y, x = np.ogrid[:32, :48, :48]
    blob = (((z - 16) ** 2 + (y - 24) ** 2 + (x - 24) ** 2) <= 25) * 700
    path = root / "bench.h5"
    with StoreWriter(path, n, (32, 48, 48), (-1000, 1000), subset="bench") as writer:
        for uid in uids:
            writer.add_scan(uid, Geometry(np.zeros(3), np.ones(3)), (100, 200, 200))
        for start in range(0, n, 50):
            rows = np.arange(start, min(n, start + 50))
            crops = rng.normal(-700, 150, size=(len(rows), 32, 48, 48)) + labels[rows, None, None, None] * blob
            fields = {"candidate_id": rows, "series_uid": np.array([uids[i % n_scans] for i in rows], dtype=object),
                      "center_xyz": np.zeros((len(rows), 3)), "center_irc": np.zeros((len(rows), 3), int),
                      "crop_start_irc": np.zeros((len(rows), 3), int), "is_nodule": labels[rows],
                      "diameter_mm": np.zeros(len(rows), np.float32)}
            writer.write_rows(rows, np.clip(crops, -1000, 1000).astype(np.int16), fields)
        writer.commit()
    splits = root / "splits.tsv"
    splits.write_text("series_uid\tsplit\n" + "".join(f"{u}\t{'val' if k % 5 == 0 else 'train'}\n"
                                                        for k, u in enumerate(uids)))
    return [str(path)], str(splits)


class BookStyleDataset(Dataset):
    """The book's per-sample path: read one crop, augment it alone, one-hot label."""

    def __init__(self, base: CropDataset, augment: AugmentConfig) -> None:
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        crop_t, label, idx = self.base[index]
        crop_t = augment_one_book_style(crop_t, self.augment)
        label_t = torch.tensor([int(label) == 0, int(label) == 1], dtype=torch.long)
        return crop_t, label_t, idx


class BookStyleLoop:
    """The book's doTraining/computeBatchLoss on the CPU: eager fp32, contiguous, per-sample data path."""

    def __init__(self, base: CropDataset, batch_size: int) -> None:
        torch.manual_seed(0)
        self.model = LunaModel()
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.99)
        self.dataset = BookStyleDataset(base, AugmentConfig())
        self.labels = base.labels
        self.batch_size = batch_size
        self.epoch = 0

    def train(self, samples: int) -> float:
        """Train on ``samples`` samples; returns the seconds taken."""
        self.epoch += 1
        sampler = EpochSampler(self.labels, ratio=1, samples_per_epoch=samples, seed=0)
        sampler.set_epoch(self.epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)
        metrics = torch.zeros(3, samples)
        start = time.perf_counter()
        for batch_ndx, (input_t, label_t, _) in enumerate(loader):
            self.optimizer.zero_grad()
            logits, probability = self.model(input_t)
            loss = torch.nn.CrossEntropyLoss(reduction="none")(logits, label_t[:, 1])
            lo = batch_ndx * self.batch_size
            metrics[0, lo:lo + len(label_t)] = label_t[:, 1].detach()
            metrics[1, lo:lo + len(label_t)] = probability[:, 1].detach()
            metrics[2, lo:lo + len(label_t)] = loss.detach()
            loss.mean().backward()
            self.optimizer.step()
        return time.perf_counter() - start


class AppLoop:
    """``LunaTrainingApp._train_epoch`` itself, one short epoch per call."""

    def __init__(self, crops: list[str], splits: str, out: Path, batch_size: int, extra: list[str]) -> None:
        argv = ["--crops", *crops, "--splits", splits, "--out", str(out), "--tb-dir", "none", "--device", "cpu",
                "--batch-size", str(batch_size), *extra]
        self.app = LunaTrainingApp(argv)
        with contextlib.redirect_stderr(io.StringIO()):
            self.app.setup()
        self.epoch = 0

    def train(self, samples: int) -> float:
        self.epoch += 1
        self.app.sampler.samples_per_epoch = samples
        start = time.perf_counter()
        self.app._train_epoch(self.epoch)
        return time.perf_counter() - start


def interleaved_rates(loops: list, samples: int, rounds: int, warmup_samples: int) -> list[tuple[float, float]]:
    """(best, median) samples/s of each loop, timed in ``rounds`` interleaved rounds: on a shared machine a
    burst of outside load then slows every variant alike instead of whichever ran at that moment."""
    for loop in loops:
        loop.train(warmup_samples)  # oneDNN primitive creation, allocator, worker start-up
    rates: list[list[float]] = [[] for _ in loops]
    for _ in range(rounds):
        for k, loop in enumerate(loops):
            rates[k].append(samples / loop.train(samples))
    return [(max(r), float(np.median(r))) for r in rates]


def amp_gradient_error(base: CropDataset, batch_size: int) -> tuple[float, float]:
    """Relative L2 difference of all parameter gradients, bf16 autocast vs. fp32 on the same weights and
    batch, next to the difference between two fp32 batches (the SGD noise bf16 has to stay below)."""
    sampler = EpochSampler(base.labels, ratio=1, samples_per_epoch=2 * batch_size, seed=0)
    order = sampler.epoch_indices()

    def grads(indices: np.ndarray, amp: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = LunaModel().to(memory_format=torch.channels_last_3d)
        x = torch.from_numpy(base.crops_int16(indices).astype(np.float32)).unsqueeze(1)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        y = torch.from_numpy(base.labels[indices])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits, _ = model(x)
        F.cross_entropy(logits.float(), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    first, second = order[:batch_size], order[batch_size:]
    g32 = grads(first, False)
    amp_error = ((grads(first, True) - g32).norm() / g32.norm()).item()
    batch_noise = ((grads(second, False) - g32).norm() / g32.norm()).item()
    return amp_error, batch_noise


def augmentation_crops_per_s(base: CropDataset, batch_size: int, batches: int) -> tuple[float, float]:
    config = AugmentConfig()
    batch = torch.stack([base[i][0] for i in range(batch_size)])
    start = time.perf_counter()
    for _ in range(batches):
        torch.stack([augment_one_book_style(c, config) for c in batch])
    per_sample = batches * batch_size / (time.perf_counter() - start)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(batches):
        augment_batch(batch, config, generator)
    batched = batches * batch_size / (time.perf_counter() - start)
    return per_sample, batched


def loader_crops_per_s(base: CropDataset, workers: int, samples: int, batch_size: int) -> float:
    sampler = EpochSampler(base.labels, ratio=1, samples_per_epoch=samples, seed=0)
    loader = make_loader(base, sampler, batch_size=batch_size, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    for crops, _, _ in iterator:
        n += len(crops)
    rate = n / (time.perf_counter() - start)
    del iterator, loader
    return rate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", nargs="+", help="crop stores (default: a generated store of random crops)")
    p.add_argument("--splits", help="splits.tsv for --crops")
    p.add_argument("--samples", type=int, default=384, help="training samples timed per variant (all rounds)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loader-samples", type=int, default=1024, help="crops read per loader measurement")
    p.add_argument("--out", default=str(RESULTS), help="markdown table to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warmup = 2
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.crops:
            crops, splits, data_name = args.crops, args.splits, ", ".join(Path(c).name for c in args.crops)
        else:
            crops, splits = make_random_store(tmp_path)
            data_name = "generated store, 600 random crops (60 positive)"
        base = CropDataset(crops, splits, "train")
        results: list[tuple[str, float, float]] = []

        def record(name: str, best: float, median: float | None = None) -> None:
            results.append((name, best, best if median is None else median))
            print(f"{name:<72s} {best:8.1f} {'' if median is None else f'(median {median:.1f})'}", flush=True)

        variants = [
            ("train, this loop, defaults (channels_last, bf16 autocast auto, batched aug)", []),
            ("train, this loop, --amp off (channels_last fp32)", ["--amp", "off"]),
            ("train, this loop, --amp off --no-channels-last (batched aug only)", ["--amp", "off", "--no-channels-last"]),
            ("train, this loop, --amp on --no-channels-last", ["--amp", "on", "--no-channels-last"]),
            ("train, this loop, defaults + --num-workers 1", ["--num-workers", "1"]),
        ]
        loops = [BookStyleLoop(base, args.batch_size)]
        loops += [AppLoop(crops, splits, tmp_path / f"run{k}", args.batch_size, extra)
                  for k, (_, extra) in enumerate(variants)]
        names = ["train, book-style loop (per-sample aug, eager fp32, contiguous)"] + [v[0] for v in variants]
        per_round = args.samples // args.rounds // args.batch_size * args.batch_size
        for name, (best, median) in zip(names, interleaved_rates(loops, per_round, args.rounds,
                                                                 warmup * args.batch_size)):
            record(name, best, median)
        del loops
        per_sample, batched = augmentation_crops_per_s(base, args.batch_size, 6)
        record("augmentation only, book per-sample (crops/s)", per_sample)
        record("augmentation only, batched augment_batch (crops/s)", batched)
        base16 = CropDataset(crops, splits, "train", int16=True)  # what the trainer's loader carries
        for workers in (0, 1, 2):
            record(f"loader only, {workers} workers (crops/s)", loader_crops_per_s(base16, workers,
                                                                                 args.loader_samples, args.batch_size))

        amp_error, batch_noise = amp_gradient_error(base, args.batch_size)
        print(f"gradient difference bf16 vs fp32: {amp_error:.4f}; between two fp32 batches: {batch_noise:.4f}")

    speedup = results[1][1] / results[0][1]
    speedup_median = results[1][2] / results[0][2]
    print(f"speed-up of this loop (defaults) over the book-style loop: {speedup:.2f}x best, "
          f"{speedup_median:.2f}x median")
    lines = [
        "# Training throughput (benchmarks/train.py)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"load average before the run {load_before:.2f} (a shared box: compare rows of one run only), "
        f"native CPU bf16: {cpu_has_native_bf16()}. Data: {data_name}. Batch size {args.batch_size}, "
        f"{args.samples} timed training samples per variant after a warm-up, in {args.rounds} interleaved rounds "
        "(best and median round shown); all in one run.",
        "",
        "| measurement | samples/s (best round) | median round |",
        "|---|---:|---:|",
        *[f"| {name} | {best:.1f} | {median:.1f} |" for name, best, median in results],
        "",
        f"Speed-up of this loop (defaults) over the book-style loop: **{speedup:.2f}x** (best rounds), "
        f"{speedup_median:.2f}x (median rounds).",
        "",
        "Numerics of bf16 autocast (same weights, same batch of real crops, all parameter gradients): relative "
        f"L2 difference bf16 vs. fp32 = {amp_error:.4f}; between two different fp32 batches = {batch_noise:.4f} "
        "(the SGD noise any step already carries).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
