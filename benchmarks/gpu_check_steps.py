"""Python half of benchmarks/gpu_check.sh (run that script, not this file): times training with and
without bf16 autocast and the loader alone; argv[1] is the nvidia-smi log the shell samples into.

Without --crops it trains on benchmarks/train.py's generated store of random crops, with a splits.tsv
(series_uid, subset, fold) made by luna.splits.make_splits over that store's scans (the first fold count
from 5 whose test fold 0 and selection set both hold nodules and other candidates); with --crops give
--splits (luna-split's) and, optionally, --test-fold."""
import argparse, contextlib, datetime, io, logging, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from train import make_random_store  # noqa: E402
from luna.data import CropDataset, EpochSampler, make_loader  # noqa: E402
from luna.splits import fold_roles, make_splits, read_fold_roles, write_splits_tsv  # noqa: E402
from luna.store import CropStore  # noqa: E402
from luna.training import LunaTrainingApp  # noqa: E402
import os  # noqa: E402

smi_log = Path(sys.argv[1])
p = argparse.ArgumentParser()
p.add_argument("--crops", nargs="+")
p.add_argument("--splits")
p.add_argument("--test-fold", type=int, default=0, help="luna-train --test-fold")
p.add_argument("--selection-fraction", type=float, default=0.2, help="luna-train --selection-fraction")
args = p.parse_args(sys.argv[2:])
if args.crops and not args.splits:
    p.error("--crops needs --splits (a splits.tsv written by luna-split)")
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


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if args.crops:
        crops, splits = args.crops, args.splits
    else:
        made = make_random_store(tmp, n=2000 if cuda else 200, n_pos=200 if cuda else 20)
        crops = made[0] if isinstance(made, tuple) else made  # (stores, old splits) or just the stores
        splits = make_fold_splits(crops, tmp / "splits_folds.tsv", args.test_fold, args.selection_fraction)
    fold_argv = ["--test-fold", str(args.test_fold), "--selection-fraction", str(args.selection_fraction)]
    rows = []
    # the timed rows train from the loader (what the worker counts and the loader-only rates below are about),
    # not from crops held on the device (luna-train's --data-on-device auto); the end-to-end run uses the default
    for amp in ("off", "on"):
        for workers in ((0, 4) if cuda else (0,)):
            argv = ["--crops", *crops, "--splits", splits, *fold_argv, "--out", str(tmp / f"o-{amp}-{workers}"),
                    "--tb-dir", "none", "--device", device, "--amp", amp, "--batch-size", str(batch),
                    "--num-workers", str(workers), "--samples-per-epoch", str(4 * batch),
                    "--data-on-device", "never"]
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
    roles = read_fold_roles(splits, args.test_fold, args.selection_fraction)
    base = CropDataset(crops, roles, "train", int16=True)
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

    # End to end on the device: two epochs through main() (selection pass, history, checkpoint), then a third
    # epoch resumed from the state folder; model.pt must load on the CPU with weights_only=True.
    import pandas as pd  # noqa: E402
    from luna.model import load_model  # noqa: E402

    out, state = tmp / "e2e", tmp / "e2e-state"
    base_argv = ["--crops", *crops, "--splits", splits, *fold_argv, "--out", str(out), "--state", str(state),
                 "--tb-dir", "none", "--device", device, "--amp", "auto", "--batch-size", str(batch),
                 "--num-workers", "4" if cuda else "0", "--samples-per-epoch", str(min(samples, 2048))]
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
          f"test fold {ckpt.get('test_fold')}, threshold {ckpt.get('threshold')})")
