"""Training speed on the CPU: this project's loop vs. the book's loop on the same model and data, by ISA, with
a row per speed lever of luna.cpu_speed (this loop with all levers, and with each one left out), plus
augmentation and loader throughput. Writes a markdown table to benchmarks/results/train.md.

    .venv/bin/python benchmarks/train.py                        # a generated store of random crops
    .venv/bin/python benchmarks/train.py --crops results/crops/*.h5 [--splits results/splits.tsv --test-fold 0]

Loops (built here from luna.model / luna.data, not through luna-train's command line):
* book-style: the book's Chapter 12 loop — per-sample augmentation in the Dataset (``getCtAugmentedCandidate``),
  one HDF5 read per sample, eager fp32, contiguous tensors, one-hot labels, CrossEntropy(reduction none) then
  mean, SGD(lr 0.001, momentum 0.99), glibc's default allocator; with 0 DataLoader workers (the row every ratio
  column is against) and with ``--book-workers`` (default 2 and the book's own default 8: the per-sample reads and
  augmentation in worker processes beside the model's threads, the clock started once the first batch is in,
  so the workers' best case); the headline is also given against the fastest book-style variant of each round.
* this loop: what ``LunaTrainingApp._train_epoch`` does — int16 batches gathered from the crops resident in
  memory (``ResidentBatches``, luna-train's default when they fit; ``--loader``: through the DataLoader),
  batched augmentation (``augment_batch``), channels_last_3d, ``zero_grad(set_to_none=True)``, the same loss
  and optimizer — with the luna.cpu_speed levers: ``allocator`` (:func:`~luna.cpu_speed.tune_allocator`),
  ``conv`` (:func:`~luna.cpu_speed.speed_up_training`), ``augment`` (:func:`~luna.cpu_speed.resample_affine`
  in place of augment_batch's affine_grid + grid_sample).
Every loop trains on the same crops in the same (balanced, seeded) order; the variants are timed in
interleaved rounds in one process, so a burst of outside load slows all of them alike.

ISA column: the ISA ATen (``torch.backends.cpu.get_cpu_capability()``) and oneDNN (its verbose header) run.
On an AVX-512 CPU the AVX2 rows come from a child process run with ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2`` and bf16 off (its own ISA line proves the cap); on an AVX2 CPU the AVX-512 rows say
they are not available. bf16 rows need native bf16 (AVX512-BF16 / AMX).
"""

from __future__ import annotations

import os
import sys

# OpenMP threads that spin between parallel regions instead of sleeping (libgomp reads this when torch
# loads, so it is set before the torch import): a sleeping thread on a shared 2-core box can wait
# milliseconds for its core back, hundreds of times a step (measured: 1.4 vs 45 samples/s next to a niced
# CPU-bound process; ~+3% on a quiet box). It applies to every loop of the run alike.
# --omp-wait-policy default keeps libgomp's own policy.
_ARGS = " ".join(sys.argv[1:]).replace("=", " ").split()
if not ("--omp-wait-policy" in _ARGS and _ARGS[_ARGS.index("--omp-wait-policy") + 1:][:1] == ["default"]):
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import argparse
import itertools
import json
import logging
import math
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from luna.app import RawDefaultsHelpFormatter
from luna import cpu_speed
from luna import data as luna_data
from luna.data import AugmentConfig, CropDataset, EpochSampler, augment_batch, make_loader, random_affine
from luna.geometry import Geometry
from luna.io import atomic_path
from luna.model import LunaModel
from luna.store import CropStore, StoreWriter

RESULTS = Path(__file__).resolve().parent / "results" / "train.md"
LEVERS = ("allocator", "conv", "augment")
LEVER_TEXT = {
    "allocator": "allocator (cpu_speed.tune_allocator)",
    "conv": "conv backward (cpu_speed.speed_up_training)",
    "augment": "augmentation resampling (cpu_speed.resample_affine)",
}
CL = torch.channels_last_3d
LOAD_AT_START = os.getloadavg()[0]  # before this process did any work: other processes only
USE_LOADER = False  # --loader: this loop streams batches through make_loader (0 workers) instead


def augment_one_book_style(crop: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """The book's per-sample augmentation (getCtAugmentedCandidate), written here for the book-style loop: one
    (C, I, R, C) crop, Python ``random`` for the parameters, the global torch RNG for the noise."""

    transform = torch.eye(4)
    for i in range(3):
        if config.flip and random.random() > 0.5:
            transform[i, i] *= -1
        if config.offset:
            transform[i, 3] = config.offset * (random.random() * 2 - 1)
        if config.scale:
            transform[i, i] *= 1.0 + config.scale * (random.random() * 2 - 1)
    if config.rotate:
        angle = random.random() * math.pi * 2
        s, c = math.sin(angle), math.cos(angle)
        rotation = torch.tensor([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
        transform @= rotation
    chunk = crop.unsqueeze(0).float()
    grid = F.affine_grid(transform[:3].unsqueeze(0), list(chunk.shape), align_corners=False)
    out = F.grid_sample(chunk, grid, padding_mode="border", align_corners=False)
    if config.noise_hu:
        out = out + torch.randn_like(out) * config.noise_hu
    return out[0]


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------

def make_random_store(root: Path, n: int = 600, n_pos: int = 60, n_scans: int = 30) -> list[str]:
    """A store of random chest-like crops (positives with a central blob)."""
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
    return [str(path)]


def train_roles(crops: list[str], splits: str | None, test_fold: int, selection_fraction: float) -> dict[str, str]:
    """{series_uid: role}: the training role of luna-split's splits.tsv for ``test_fold``, or every scan of the
    stores as training data when no splits.tsv is given (speed does not depend on which scans train)."""
    if splits:
        from luna.splits import read_fold_roles

        return dict(read_fold_roles(splits, test_fold, selection_fraction))
    roles: dict[str, str] = {}
    for path in crops:
        for uid in CropStore(path).table["series_uid"].unique():
            roles[str(uid)] = "train"
    return roles


# ----------------------------------------------------------------------------------------------------
# loops
# ----------------------------------------------------------------------------------------------------

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

    def __init__(self, base: CropDataset, batch_size: int, allocator: bool = False, workers: int = 0) -> None:
        random.seed(0)
        torch.manual_seed(0)
        self.model = LunaModel(crop_shape=base.crop_shape)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.99)
        self.dataset = BookStyleDataset(base, AugmentConfig())
        self.labels = base.labels
        self.batch_size = batch_size
        self.allocator = allocator
        self.workers = workers
        # with workers (the book's --num-workers, default 8): one loader whose worker processes live across rounds,
        # as the book's live through an epoch (a round of a few batches would otherwise time their start-up)
        self.sampler = EpochSampler(self.labels, ratio=1, samples_per_epoch=batch_size, seed=0)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 persistent_workers=workers > 0)

    def train(self, samples: int, epoch: int) -> float:
        """Train on ``samples`` samples of the sampler's epoch ``epoch``; returns the seconds taken. With workers
        the clock starts once the first batch is loaded: in the book's steady state the workers load ahead while
        the model trains, so this is the most the workers can give (the least favourable ratio for luna)."""
        self.sampler.samples_per_epoch = samples
        self.sampler.set_epoch(epoch)
        metrics = torch.zeros(3, samples)
        start = time.perf_counter()  # 0 workers: loading is part of every step, the first's too
        batches = iter(self.loader)
        first = next(batches)
        if self.workers:
            start = time.perf_counter()
        for batch_ndx, (input_t, label_t, _) in enumerate(itertools.chain([first], batches)):
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


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator, fast: bool) -> torch.Tensor:
    """augment_batch as luna-train runs it (``fast``: its CPU resampling, cpu_speed.resample_affine), or the same
    steps with torch's affine_grid + 3-D grid_sample for the resampling (the lever left out; same random numbers
    drawn in the same order, values equal to fp32 rounding)."""
    if fast:
        return augment_batch(batch, config, generator)
    batch = batch.float()
    if config.geometric:
        theta = random_affine(batch.shape[0], config, generator, batch.device)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, padding_mode="border", align_corners=False)
    if config.noise_hu:
        noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
        batch = batch + noise * config.noise_hu
    return batch


class ThisLoop:
    """LunaTrainingApp._train_epoch's steps (defaults: SGD, balanced 1:1, augmentation on, channels_last_3d,
    no warm-up, clipping or EMA) with a chosen set of cpu_speed levers, on the CPU."""

    def __init__(self, base16: CropDataset, batch_size: int, levers: set[str], amp: bool = False,
                 compile_model: bool = False, loader: bool | None = None) -> None:
        self.levers, self.amp = set(levers), amp
        self.allocator = "allocator" in self.levers
        torch.manual_seed(0)
        self.model = LunaModel(crop_shape=base16.crop_shape).to(memory_format=CL)
        if "conv" in self.levers:
            cpu_speed.speed_up_training(self.model)
        self.model.train()
        self.forward: Callable = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.99)
        self.base16, self.batch_size = base16, batch_size
        self.config = AugmentConfig()
        # luna-train's default data path on the CPU (--data-on-device auto, when the crops fit in memory):
        # the int16 crops resident in memory, batches gathered there; else the loader
        self.sampler = EpochSampler(base16.labels, ratio=1, samples_per_epoch=batch_size, seed=0)
        resident = None if (USE_LOADER if loader is None else loader) else getattr(luna_data, "ResidentBatches", None)
        self.batches = resident(base16, self.sampler, batch_size, "cpu") if resident is not None else None

    def train(self, samples: int, epoch: int) -> float:
        self.sampler.samples_per_epoch = samples
        self.sampler.set_epoch(epoch)
        loader = self.batches if self.batches is not None else make_loader(
            self.base16, self.sampler, batch_size=self.batch_size, num_workers=0)
        generator = torch.Generator().manual_seed(epoch)
        labels, probs, losses = [], [], []
        start = time.perf_counter()
        for crops, label, _ in loader:
            crops = augment(crops.float(), self.config, generator, "augment" in self.levers)
            self.optimizer.zero_grad(set_to_none=True)
            crops = crops.contiguous(memory_format=CL)
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=self.amp):
                logits, _ = self.forward(crops)
            logits = logits.float()
            probability = torch.softmax(logits, dim=1)
            loss = F.cross_entropy(logits, label, reduction="none")
            loss.mean().backward()
            self.optimizer.step()
            labels.append(label.detach())
            probs.append(probability[:, 1].detach())
            losses.append(loss.detach())
        torch.cat(labels), torch.cat(probs), torch.cat(losses)
        return time.perf_counter() - start


class OutsideLoad:
    """CPU time other processes used while this one ran (from /proc/stat and /proc/self/stat), in cores:
    the load average counts this benchmark's own threads too."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [float(v) for v in fh.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # minus idle, iowait
            with open("/proc/self/stat") as fh:
                own = fh.read().rsplit(")", 1)[1].split()
            return busy, float(own[11]) + float(own[12]), time.monotonic()  # utime + stime of this process
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / ticks / max(end[2] - self.start[2], 1e-9))


def set_allocator(tuned: bool) -> bool:
    """Switch the allocator lever; True when that changed anything (the heap then needs a settling step)."""
    if tuned == cpu_speed.allocator_tuned():
        return False
    (cpu_speed.tune_allocator if tuned else cpu_speed.untune_allocator)()
    return True


def interleaved_rates(loops: list, samples: int, rounds: int, batch_size: int) -> list[list[float]]:
    """samples/s of each loop in each of ``rounds`` interleaved rounds (``samples`` samples per loop per round,
    the same samples for every loop of a round). The loops run with the allocator lever off first, then on,
    so it switches twice a round; a switch is followed by one untimed batch (the heap grows, or is trimmed,
    once)."""
    order = sorted(range(len(loops)), key=lambda k: loops[k].allocator)
    for k in order:  # oneDNN primitive creation, first allocations
        set_allocator(loops[k].allocator)
        loops[k].train(batch_size, epoch=0)
    rates: list[list[float]] = [[] for _ in loops]
    for r in range(1, rounds + 1):
        for k in order:
            if set_allocator(loops[k].allocator):
                loops[k].train(batch_size, epoch=0)
            rates[k].append(samples / loops[k].train(samples, epoch=r))
    return rates


def row(isa: str, loop: str, batch: int, rates: list[float], book: list[float] | None) -> dict[str, Any]:
    """A table row; ``x_book``: the median over rounds of this loop's rate over the book-style loop's rate in
    the same round (a paired ratio: a slow spell of the machine slows both)."""
    x_book = float(np.median(np.array(rates) / np.array(book))) if book is not None else None
    return {"isa": isa, "loop": loop, "batch": batch, "best": max(rates), "median": float(np.median(rates)),
            "x_book": x_book, "rounds": [round(v, 2) for v in rates]}


# ----------------------------------------------------------------------------------------------------
# side measurements
# ----------------------------------------------------------------------------------------------------

def lever_gradient_difference(base: CropDataset, batch_size: int) -> tuple[float, float, bool]:
    """Relative L2 difference of all parameter gradients with vs. without the conv levers (same weights,
    same batch), next to the difference between two batches; and whether the logits are bit-identical."""
    sampler = EpochSampler(base.labels, ratio=1, samples_per_epoch=2 * batch_size, seed=0)
    order = sampler.epoch_indices()

    def grads(indices: np.ndarray, levers: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = LunaModel(crop_shape=base.crop_shape).to(memory_format=CL)
        if levers:
            cpu_speed.speed_up_training(model)
        x = torch.from_numpy(base.crops_int16(indices).astype(np.float32)).unsqueeze(1).contiguous(memory_format=CL)
        logits, _ = model(x)
        F.cross_entropy(logits, torch.from_numpy(base.labels[indices])).backward()
        return logits.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    first, second = order[:batch_size], order[batch_size:]
    logits, g_plain = grads(first, False)
    logits_levers, g_levers = grads(first, True)
    lever_error = ((g_levers - g_plain).norm() / g_plain.norm()).item()
    batch_noise = ((grads(second, False)[1] - g_plain).norm() / g_plain.norm()).item()
    return lever_error, batch_noise, bool(torch.equal(logits, logits_levers))


def augmentation_crops_per_s(base: CropDataset, batch_size: int, batches: int) -> dict[str, float]:
    config = AugmentConfig()
    batch = torch.stack([base[i][0] for i in range(batch_size)])
    out: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(batches):
        torch.stack([augment_one_book_style(c, config) for c in batch])
    out["book per-sample"] = batches * batch_size / (time.perf_counter() - start)
    for name, fast in (("batched, affine_grid + 3-D grid_sample (the lever left out)", False),
                       ("augment_batch (cpu_speed.resample_affine, luna-train's)", True)):
        generator = torch.Generator().manual_seed(0)
        augment(batch, config, generator, fast)
        start = time.perf_counter()
        for _ in range(batches):
            augment(batch, config, generator, fast)
        out[name] = batches * batch_size / (time.perf_counter() - start)
    return out


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


# ----------------------------------------------------------------------------------------------------
# one ISA group
# ----------------------------------------------------------------------------------------------------

def isa_label(bf16: bool = False) -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    family = "AVX-512" if "512" in capability else capability
    return f"{family} {'bf16' if bf16 else 'fp32'}"


def run_group(base: CropDataset, base16: CropDataset, args: argparse.Namespace, native_bf16: bool) -> dict[str, Any]:
    """The training rows at this process's ISA: book-style, this loop with all levers, each lever left out,
    no levers; book-style with the allocator lever; batch 64 for information; bf16 where native."""
    cpu_line = cpu_speed.cpu_report()
    print(cpu_line, flush=True)
    bs = args.batch_size
    per_round = bs * args.batches_per_turn
    isa = isa_label()
    book = "book-style loop (per-sample aug, eager fp32, contiguous)"
    book_workers = [f"book-style loop, {w} DataLoader worker processes (the book's --num-workers; its default 8)"
                    for w in args.book_workers]
    specs: list[tuple[str, Callable[[], Any] | None]] = [
        (book, lambda: BookStyleLoop(base, bs)),
        *[(name, lambda w=w: BookStyleLoop(base, bs, workers=w)) for name, w in zip(book_workers, args.book_workers)],
        ("this loop, all levers", lambda: ThisLoop(base16, bs, set(LEVERS))),
        *[(f"this loop, all levers but {LEVER_TEXT[lever]}",
           lambda lever=lever: ThisLoop(base16, bs, set(LEVERS) - {lever})) for lever in LEVERS],
        ("this loop, no levers (luna-train's fp32 CPU path before cpu_speed)", lambda: ThisLoop(base16, bs, set())),
        ("book-style loop + allocator lever (for reference)", lambda: BookStyleLoop(base, bs, allocator=True)),
    ]
    if args.compile:
        specs.append(("this loop, all levers + torch.compile (inductor)", None))
    loops: list[Any] = []
    compile_s = None
    for name, make in specs:
        if make is None:  # compiled from scratch: a fresh inductor cache, as a first luna-train run meets it
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="luna-bench-inductor-")
            set_allocator(True)
            loop = ThisLoop(base16, bs, set(LEVERS), compile_model=True)
            start = time.perf_counter()
            loop.train(bs, epoch=0)
            compile_s = time.perf_counter() - start
            print(f"torch.compile: first batch (compilation, empty cache) {compile_s:.0f} s", flush=True)
            loops.append(loop)
        else:
            loops.append(make())
    outside = OutsideLoad()
    rates = interleaved_rates(loops, per_round, args.rounds, bs)
    outside_cores = outside.cores()
    rows = []
    for (name, _), r in zip(specs, rates):
        rows.append(row(isa, name, bs, r, None if name == book else rates[0]))
        print(f"{isa:10s} {name:<90s} {max(r):7.1f} (median {np.median(r):.1f})", flush=True)
    # the all-levers loop against every book-style variant, and against the fastest of them in each round
    names = [name for name, _ in specs]
    ours = np.array(rates[names.index("this loop, all levers")])
    book_rates = {name: np.array(rates[names.index(name)]) for name in [book, *book_workers]}
    versus = {name: float(np.median(ours / r)) for name, r in book_rates.items()}
    versus["the fastest book-style variant of each round"] = float(np.median(
        ours / np.max(np.stack(list(book_rates.values())), axis=0)))
    del loops
    if args.batch_64:
        big = 64
        loops64 = [BookStyleLoop(base, big), ThisLoop(base16, big, set(LEVERS))]
        rates64 = interleaved_rates(loops64, big, max(3, args.rounds // 2), big)
        for name, r in zip([book, "this loop, all levers"], rates64):
            rows.append(row(isa, name, big, r, None if name == book else rates64[0]))
            print(f"{isa:10s} {name + ' (batch 64)':<90s} {max(r):7.1f} (median {np.median(r):.1f})", flush=True)
        del loops64
    if native_bf16:
        loops_bf = [BookStyleLoop(base, bs), ThisLoop(base16, bs, {"allocator", "augment"}, amp=True)]
        rates_bf = interleaved_rates(loops_bf, per_round, args.rounds, bs)
        rows.append(row(isa, book, bs, rates_bf[0], None))
        rows.append(row(isa_label(bf16=True), "this loop, bf16 autocast, allocator + augmentation levers", bs,
                        rates_bf[1], rates_bf[0]))
        for r in rows[-2:]:
            print(f"{r['isa']:10s} {r['loop']:<90s} {r['best']:7.1f} (median {r['median']:.1f})", flush=True)
    set_allocator(True)
    return {"cpu": cpu_line, "isa": isa, "rows": rows, "outside_cores": outside_cores, "compile_s": compile_s,
            "per_round": per_round, "load_at_start": LOAD_AT_START, "versus": versus, "batch": bs}


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    p.add_argument("--crops", nargs="+", help="crop stores (default: a generated store of random crops)")
    p.add_argument("--splits", help="splits.tsv for --crops (default: every crop of the stores trains)")
    p.add_argument("--test-fold", type=int, default=0, help="with --splits: the test fold (its train role is used)")
    p.add_argument("--selection-fraction", type=float, default=0.2, help="with --splits: as luna-train's")
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds")
    p.add_argument("--batches-per-turn", type=int, default=1, help="batches each loop trains per round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--book-workers", type=int, nargs="*", default=[2, 8],
                   help="also time the book-style loop with these DataLoader worker counts (the book's default: 8); "
                   "the headline ratio is also given against the fastest book-style variant")
    p.add_argument("--batch-64", action=argparse.BooleanOptionalAction, default=True,
                   help="also time book-style vs. all levers at batch 64 (for information)")
    p.add_argument("--compile", action="store_true",
                   help="add a row with torch.compile on top of all levers (compilation takes ~1 min on 2 cores)")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="run the AVX2 rows in a child process with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 "
                   "even on an AVX2 CPU (checks the emulation path)")
    p.add_argument("--omp-wait-policy", choices=("active", "default"), default="active",
                   help="active: OMP_WAIT_POLICY=ACTIVE unless set (spinning OpenMP threads, robust to outside load); "
                   "default: libgomp's own policy")
    p.add_argument("--loader", action="store_true",
                   help="this loop reads its batches through the DataLoader (HDF5, 0 workers; luna-train "
                   "--data-on-device never) instead of gathering them from crops resident in memory")
    p.add_argument("--loader-samples", type=int, default=1024, help="crops read per loader measurement")
    p.add_argument("--out", default=str(RESULTS), help="markdown table to write")
    p.add_argument("--child-json", help=argparse.SUPPRESS)  # internal: run the rows of this process's ISA only
    args = p.parse_args(argv)
    if args.splits and not args.crops:
        p.error("--splits describes the scans of --crops: give both (or neither: a generated store)")
    return args


def child_argv(args: argparse.Namespace, crops: list[str], json_path: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--crops", *crops,
            "--batches-per-turn", str(args.batches_per_turn), "--rounds", str(args.rounds),
            "--batch-size", str(args.batch_size), "--child-json", str(json_path),
            "--test-fold", str(args.test_fold), "--selection-fraction", str(args.selection_fraction),
            "--book-workers", *map(str, args.book_workers)]
    if args.splits:
        argv += ["--splits", args.splits]
    if not args.batch_64:
        argv.append("--no-batch-64")
    if args.compile:
        argv.append("--compile")
    argv += ["--omp-wait-policy", args.omp_wait_policy]
    if args.loader:
        argv.append("--loader")
    return argv


def main(argv: list[str] | None = None) -> None:
    global USE_LOADER
    args = parse_args(argv)
    USE_LOADER = args.loader
    logging.basicConfig(level=logging.WARNING)
    allocator_line = cpu_speed.tune_allocator()  # the levers' default; loops switch it per their setting

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.crops:
            crops, data_name = args.crops, ", ".join(Path(c).name for c in args.crops)
        else:
            crops = make_random_store(tmp_path)
            data_name = "generated store, 600 random crops (60 positive)"
        roles = train_roles(crops, args.splits, args.test_fold, args.selection_fraction)
        base = CropDataset(crops, roles, "train")
        base16 = CropDataset(crops, roles, "train", int16=True)

        if args.child_json:  # a capped-ISA child: the rows of its ISA, as JSON
            group = run_group(base, base16, args, native_bf16=False)
            Path(args.child_json).write_text(json.dumps(group))
            return

        capability = torch.backends.cpu.get_cpu_capability()
        native_avx512 = "512" in capability
        native_bf16 = cpu_speed.cpu_has_native_bf16()
        groups: list[dict[str, Any]] = []
        if native_avx512 or args.emulate_avx2:
            json_path = tmp_path / "avx2.json"
            env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
            print("AVX2 rows: child process with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2", flush=True)
            subprocess.run(child_argv(args, crops, json_path), env=env, check=True)
            groups.append(json.loads(json_path.read_text()))
        if not args.emulate_avx2 or native_avx512:
            groups.append(run_group(base, base16, args, native_bf16=native_bf16))
        lever_error, batch_noise, logits_equal = lever_gradient_difference(base, args.batch_size)
        print(f"gradient difference with vs. without the conv levers: {lever_error:.1e}; between two batches: "
              f"{batch_noise:.2f}; logits bit-identical: {logits_equal}")
        aug = augmentation_crops_per_s(base, args.batch_size, 6)
        loader = {w: loader_crops_per_s(base16, w, args.loader_samples, args.batch_size) for w in (0, 2)}
        lever_line = cpu_speed.speed_up_training(LunaModel())

    write_table(args, groups, data_name, native_avx512, native_bf16, allocator_line, lever_line,
                (lever_error, batch_noise, logits_equal), aug, loader)


def write_table(args: argparse.Namespace, groups: list[dict], data_name: str, native_avx512: bool, native_bf16: bool,
                allocator_line: str, lever_line: str, numerics: tuple[float, float, bool], aug: dict[str, float],
                loader: dict[int, float]) -> None:
    table = ["| ISA | loop | batch | samples/s (best round) | median round | x book-style (median of rounds) |",
             "|---|---|---:|---:|---:|---:|"]
    for g in groups:
        for r in g["rows"]:
            times = "1.00x" if r["x_book"] is None and r["loop"].startswith("book-style loop (") else (
                f"{r['x_book']:.2f}x" if r["x_book"] is not None else "")
            table.append(f"| {r['isa']} | {r['loop']} | {r['batch']} | {r['best']:.1f} | {r['median']:.1f} | {times} |")
    if not native_avx512:
        table.append("| AVX-512 fp32 | (all rows) | | not available on this CPU | | |")
    if not native_bf16:
        table.append("| AVX-512 bf16 | (all rows) | | not available on this CPU (no native bf16) | | |")
    summary = []
    for g in groups:
        for r in g["rows"]:
            if r["loop"] == "this loop, all levers" and r["x_book"] is not None:
                summary.append(f"{r['isa']}, batch {r['batch']}: this loop with all levers runs **{r['x_book']:.2f}x** "
                               f"the book-style loop (median of the per-round ratios).")
        if g.get("versus"):
            summary.append(f"{g['isa']}, batch {g['batch']}, this loop with all levers against each book-style "
                           "variant (median of the per-round ratios): " + "; ".join(
                               f"{name}: **{x:.2f}x**" for name, x in g["versus"].items()) + ".")
    lever_error, batch_noise, logits_equal = numerics
    cpu_lines = "; ".join(f"`{g['cpu']}`" for g in groups)
    loads = "; ".join(
        f"{g['isa'].rsplit(' ', 1)[0]} rows: load average at start {g['load_at_start']:.2f}, other processes used "
        + (f"{g['outside_cores']:.2f} of the {os.cpu_count()} cores" if g.get("outside_cores") is not None
           else "an unknown share of the cores") + " during the timed rounds" for g in groups)
    compile_note = [f"torch.compile: the first batch (compilation with an empty inductor cache) took "
                    f"{g['compile_s']:.0f} s." for g in groups
                    if g.get("compile_s")]
    lines = [
        "# Training throughput on the CPU (benchmarks/train.py)",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. ISA: {cpu_lines}. Data: {data_name}; this loop's batches "
        f"{'through the DataLoader (--loader)' if args.loader else 'gathered from crops resident in memory'}. "
        f"{groups[0]['per_round']} training samples per loop per round after a warm-up batch, {args.rounds} "
        f"interleaved rounds in one process (best and median round shown; batch 64: half the rounds); {loads} "
        "(a shared box: compare rows of one run only).",
        "",
        *table,
        "",
        *summary,
        "",
        *compile_note,
        f"Levers (luna.cpu_speed): `{allocator_line}`; `{lever_line}`; augmentation: "
        "`resample_affine` for augment_batch's affine_grid + grid_sample.",
        "",
        "Numerics of the conv levers (same weights, same batch): forward logits bit-identical: "
        f"{logits_equal}; relative L2 difference of all parameter gradients {lever_error:.1e}, against "
        f"{batch_noise:.2f} between two batches.",
        "",
        "| augmentation only | crops/s |",
        "|---|---:|",
        *[f"| {name} | {rate:.0f} |" for name, rate in aug.items()],
        "",
        "| loader only (int16 crops, batched reads) | crops/s |",
        "|---|---:|",
        *[f"| {w} workers | {rate:.0f} |" for w, rate in loader.items()],
        "",
        "How this was measured, the run-to-run spread, each lever and what was tried and not kept: "
        "[train_notes.md](train_notes.md).",
        "",
    ]
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
