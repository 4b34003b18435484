"""Training speed against the book's own code: its Chapter 12 ``LunaTrainingApp.doTraining`` (p2ch12 of a
deep-learning-with-pytorch/dlwpt-code checkout, run as it is, with its LunaDataset, diskcache crop cache,
DataLoader, LunaModel and SGD) against this project's training loop, on the same scans, interleaved in one
process. Writes a markdown table to benchmarks/results/book_code.md (the runs kept: book_code_zen4_avx2.md, book_code_zen4.md).

    git clone https://github.com/deep-learning-with-pytorch/dlwpt-code /path/to/dlwpt-code   # once, yourself
    snakemake --cores 2 results/splits.tsv results/crops/subset{0,1,2,3,4}.h5              # the default data
    .venv/bin/python benchmarks/book_code.py --book-code /path/to/dlwpt-code [--emulate-avx2]

Nothing is downloaded: ``--book-code`` is your checkout. The book's modules are imported from it unchanged;
the one adaptation is that diskcache 5 no longer exports ``BytesType`` and ``BytesIO`` from ``diskcache.core``,
which the book's util/disk.py imports, so the two names (``bytes``, ``io.BytesIO``) are put back before the
import. The book's code reads relative paths (``data-unversioned/part2/luna/subset*/``,
``data/part2/luna/*.csv``, its cache under ``data-unversioned/cache/``): a work folder gets links to
``--data`` in that layout, and the book's own ``LunaPrepCacheApp`` fills its cache there first (untimed; about
4 GB for the default data: gzip level 1 of float32 crops), as the book tells its readers to.

Loops, each timed over ``--batches-per-turn`` batches of 32 per round, in interleaved rounds:
* the book's code, p2ch12 ``--balanced --augmented`` at its default 8 DataLoader workers: the book's final
  classification recipe (1:1 balance, flips, offsets, scaling, rotation, noise, one sample at a time);
* the book's code, p2ch12 without flags at 8 workers: Chapter 11's loop (no balance, no augmentation);
* train.py's book-style loop with 8 workers: the same steps as the first, re-written with HDF5 int16 reads
  instead of the book's cache (the stricter baseline benchmarks/results/train.md is measured against);
* this loop with all levers (train.py's ``ThisLoop``: balanced 1:1, batched augmentation, resident int16
  crops, channels_last_3d, the luna.cpu_speed levers), what luna-train runs on the CPU.
The book's loops get a fresh DataLoader each turn (its sampler: the next consecutive indices of the book's
own shuffled dataset, as its epoch walks them); with workers, each loop's clock starts once the first batch is
in (the workers' steady state: batches the workers loaded before that are free, which favours the book's
loops; every batch's step is timed, as train.py times its book-style loop). ``--emulate-avx2`` re-runs this script with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (bf16 is off throughout: every loop is fp32); the cpu line
in the table proves what ran.
"""

from __future__ import annotations

import os
import sys

if "--emulate-avx2" in sys.argv[1:] and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
    # the ISA cap is read when torch loads: run this script again with it set
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as train.py: for every loop alike, before torch loads

import argparse
import contextlib
import glob
import io
import logging
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as train_bench  # noqa: E402  (benchmarks/train.py: the book-style and this-loop loops)

from luna import cpu_speed  # noqa: E402
from luna.app import RawDefaultsHelpFormatter  # noqa: E402
from luna.data import CropDataset  # noqa: E402
from luna.io import atomic_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "book_code.md"
BOOK_AUG = "the book's code: p2ch12 `--balanced --augmented`, 8 workers (its default)"
BOOK_PLAIN = "the book's code: p2ch12 without flags (Chapter 11's loop: unbalanced, no augmentation), 8 workers"
BOOK_STYLE = "book-style loop (train.py: the book's steps with HDF5 int16 reads), 8 workers"
THIS = "this loop, all levers (luna-train's CPU path)"
SHORT = {BOOK_AUG: "book ch12", BOOK_PLAIN: "book ch11", BOOK_STYLE: "book-style", THIS: "this loop"}


def book_layout(work: Path, data: Path, candidates: str, annotations: str) -> None:
    """Links ``data``'s subsets and tables into ``work`` where the book's code looks for them."""
    scans = work / "data-unversioned" / "part2" / "luna"
    tables = work / "data" / "part2" / "luna"
    scans.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    subsets = sorted(p for p in data.glob("subset*") if p.is_dir())
    if not subsets:
        raise SystemExit(f"book_code.py: no subset*/ folder in --data {data}")
    for subset in subsets:
        (scans / subset.name).symlink_to(subset.resolve())
    for name, source in (("candidates.csv", candidates), ("annotations.csv", annotations)):
        path = Path(source) if Path(source).is_absolute() else data / source
        if not path.is_file():
            raise SystemExit(f"book_code.py: no {name} at {path}")
        (tables / name).symlink_to(path.resolve())


def import_book(book_code: Path) -> Any:
    """The book's p2ch12 package from ``book_code``, with diskcache 5's removed names put back first."""
    if not (book_code / "p2ch12" / "training.py").is_file() or not (book_code / "util" / "disk.py").is_file():
        raise SystemExit(f"book_code.py: {book_code} has no p2ch12/training.py and util/disk.py "
                         "(a deep-learning-with-pytorch/dlwpt-code checkout)")
    import diskcache.core

    diskcache.core.BytesType = getattr(diskcache.core, "BytesType", bytes)
    diskcache.core.BytesIO = getattr(diskcache.core, "BytesIO", io.BytesIO)
    sys.path.insert(0, str(book_code))
    import p2ch12.prepcache
    import p2ch12.training

    # the book's 8 workers on a 2-core box are its setting, measured as such: torch's warning says so each turn
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    for name in ("util.util", "p2ch12.dsets", "p2ch12.training", "p2ch12.prepcache"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the book logs every dataset and epoch at INFO
    return p2ch12


class _FirstBatchClock:
    """A DataLoader as the book's doTraining reads it (dataset, batch_size, num_workers, len, iter) that notes
    when its first batch came out."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.dataset = loader, loader.dataset
        self.batch_size, self.num_workers = loader.batch_size, loader.num_workers
        self.first: float | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for k, batch in enumerate(self.loader):
            if k == 0:
                self.first = time.perf_counter()
            yield batch


class BookCodeLoop:
    """The book's own LunaTrainingApp (p2ch12) and its doTraining over the next consecutive indices of its
    training dataset."""

    allocator = False  # glibc's defaults, as the book runs

    def __init__(self, book: Any, flags: list[str], workers: int, batch_size: int) -> None:
        random.seed(0)
        torch.manual_seed(0)
        self.app = book.training.LunaTrainingApp(
            ["--num-workers", str(workers), "--batch-size", str(batch_size), *flags])
        self.dataset = self.app.initTrainDl().dataset
        self.workers, self.batch_size, self.next_index = workers, batch_size, 0

    def train(self, samples: int, epoch: int) -> float:
        """Seconds for ``samples`` samples: with workers from the first batch's arrival (its loading free, its step
        and every later one timed: train.py's convention for the book-style loop)."""
        n = len(self.dataset)
        indices = [(self.next_index + k) % n for k in range(samples)]
        self.next_index = (self.next_index + samples) % n
        loader = _FirstBatchClock(DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices,
                                             num_workers=self.workers, pin_memory=False))
        start = time.perf_counter()
        self.app.doTraining(epoch, loader)
        end = time.perf_counter()
        return end - (loader.first if self.workers and loader.first is not None else start)


def prepcache(book: Any, workers: int) -> float:
    """The book's LunaPrepCacheApp (its cache of every candidate's crop); returns its seconds."""
    start = time.perf_counter()
    book.prepcache.LunaPrepCacheApp(["--num-workers", str(workers), "--batch-size", "64"]).main()
    return time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    p.add_argument("--book-code", required=True, type=Path,
                   help="a checkout of deep-learning-with-pytorch/dlwpt-code (its util/ and p2ch12/ are used)")
    p.add_argument("--data", type=Path, default=Path("data/synthetic"),
                   help="a LUNA16-format folder: subset*/ with .mhd/.raw scans, and the tables below")
    p.add_argument("--candidates", default="candidates.csv", help="relative to --data unless absolute")
    p.add_argument("--annotations", default="annotations.csv", help="relative to --data unless absolute")
    p.add_argument("--crops", nargs="+", help="this loop's crop stores of the same scans "
                   "(default: results/crops/subset*.h5)")
    p.add_argument("--splits", default="results/splits.tsv", help="splits.tsv for --crops")
    p.add_argument("--test-fold", type=int, default=0, help="this loop trains on this fold's training scans")
    p.add_argument("--selection-fraction", type=float, default=0.1, help="as luna-train's (the default run's)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--batches-per-turn", type=int, default=40, help="batches each loop trains per round")
    p.add_argument("--work", type=Path,
                   help="where the book's layout and cache go (default: a temporary folder, removed at the end; "
                   "a given one is kept, and its cache reused)")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="run with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (the plain machine)")
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    args = p.parse_args(argv)
    args.crops = args.crops or sorted(glob.glob("results/crops/subset*.h5"))
    if not args.crops:
        p.error("no --crops and no results/crops/subset*.h5: make the default run's crops first")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpu_line = cpu_speed.cpu_report()
    print(cpu_line, flush=True)
    if args.emulate_avx2 and (torch.backends.cpu.get_cpu_capability() != "AVX2"
                              or "512" in cpu_speed.onednn_isa() or "AMX" in cpu_speed.onednn_isa()):
        raise SystemExit(f"book_code.py: the AVX2 cap did not take effect: {cpu_line}")
    book_code, data = args.book_code.resolve(), args.data.resolve()
    crops = [str(Path(c).resolve()) for c in args.crops]
    splits = str(Path(args.splits).resolve()) if args.splits else None
    roles = train_bench.train_roles(crops, splits, args.test_fold, args.selection_fraction)
    base = CropDataset(crops, roles, "train")
    base16 = CropDataset(crops, roles, "train", int16=True)
    with contextlib.ExitStack() as stack:
        if args.work:
            work = args.work.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="luna-book-code-")))
        marker = work / "luna-book-code-data.txt"  # which --data the layout and cache were made from
        if not (work / "data-unversioned" / "part2" / "luna").exists():
            book_layout(work, data, args.candidates, args.annotations)
            marker.write_text(f"{data}\n")
        elif not marker.is_file() or marker.read_text().strip() != str(data):
            raise SystemExit(f"book_code.py: --work {work} holds the book's layout for other data than --data {data} "
                             f"(see {marker.name}): give another --work")
        here = os.getcwd()
        os.chdir(work)  # the book's paths are relative
        stack.callback(os.chdir, here)
        book = import_book(book_code)
        cached = (work / "data-unversioned" / "cache" / "part2ch12_raw").exists()  # only a given --work has one
        prep_s = None if cached else prepcache(book, os.cpu_count() or 2)
        if prep_s is not None:
            print(f"the book's prepcache: {prep_s:.0f} s", flush=True)
        bs = 32
        specs = [
            (BOOK_AUG, lambda: BookCodeLoop(book, ["--balanced", "--augmented"], 8, bs)),
            (BOOK_PLAIN, lambda: BookCodeLoop(book, [], 8, bs)),
            (BOOK_STYLE, lambda: train_bench.BookStyleLoop(base, bs, workers=8)),
            (THIS, lambda: train_bench.ThisLoop(base16, bs, set(train_bench.LEVERS))),
        ]
        loops = [make() for _, make in specs]
        outside = train_bench.OutsideLoad()
        started = time.perf_counter()
        rates = train_bench.interleaved_rates(loops, bs * args.batches_per_turn, args.rounds, bs)
        timed_s = time.perf_counter() - started
        outside_cores = outside.cores()
        del loops
    for (name, _), r in zip(specs, rates):
        print(f"{name:<100s} {np.median(r):7.1f} samples/s (median round)", flush=True)
    write_table(args, cpu_line, specs, rates, prep_s, outside_cores, timed_s, len(base), data)


def write_table(args: argparse.Namespace, cpu_line: str, specs: list, rates: list[list[float]],
                prep_s: float | None, outside_cores: float | None, timed_s: float, n_train: int, data: Path) -> None:
    names = [name for name, _ in specs]
    ours = np.array(rates[names.index(THIS)])
    isa = train_bench.isa_label()
    table = ["| ISA | loop | samples/s (median round) | best round | this loop / it (median of per-round ratios) |",
             "|---|---|---:|---:|---:|"]
    versus = {}
    for name, r in zip(names, rates):
        ratio = float(np.median(ours / np.array(r)))
        versus[name] = ratio
        table.append(f"| {isa} | {name} | {np.median(r):.1f} | {max(r):.1f} | "
                     f"{'' if name == THIS else f'**{ratio:.2f}x**'} |")
    per_round = "; ".join(f"{SHORT[name]} {', '.join(f'{v:.1f}' for v in r)}" for name, r in zip(names, rates))
    lines = [
        "# Training throughput against the book's own code (benchmarks/book_code.py)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; `{cpu_line}`. "
        f"Data: {data.name} (the book's code: every candidate of its subsets but each tenth, its own split; this "
        f"loop and the book-style loop: fold {args.test_fold}'s {n_train:,} training crops of the same scans). "
        f"Batch 32, {args.batches_per_turn} batches per loop per round, {args.rounds} interleaved rounds after a "
        f"warm-up batch each ({timed_s / 60:.1f} min); other processes used "
        + (f"{outside_cores:.2f} of the {os.cpu_count()} cores" if outside_cores is not None else "an unknown share")
        + " during the timed rounds. "
        + (f"The book's prepcache (untimed setup) took {prep_s:.0f} s." if prep_s is not None
           else "The book's cache was reused from --work."),
        "",
        *table,
        "",
        f"Per round (samples/s): {per_round}.",
        "",
        f"{isa}, batch 32: this loop with all levers runs **{versus[BOOK_AUG]:.2f}x** the book's own Chapter 12 "
        f"loop at its settings (`--balanced --augmented`, 8 workers), **{versus[BOOK_PLAIN]:.2f}x** its Chapter 11 "
        f"loop (which does less: no augmentation), and **{versus[BOOK_STYLE]:.2f}x** train.py's book-style "
        "re-implementation with 8 workers (median of the per-round ratios).",
        "",
        "How it was run and what it shows: [train_notes.md](train_notes.md).",
        "",
    ]
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
