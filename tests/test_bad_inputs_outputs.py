"""Outputs that cannot be written: a full disk, a read-only folder, a folder path under a file.

Each is one line naming the path, exit 2, and nothing at a declared output path (no store, no skipped table,
no temp file). Full and read-only file systems are real: small tmpfs mounts (root only; skipped elsewhere with
the reason). "Another job fills the disk after the start checks" is made real with the test hook
LUNA_TEST_NO_RESERVE=1 (a test-only hook, tests/sitehooks/sitecustomize.py), which skips reserving the store and
checking free space.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from luna.candidates import CandidatesApp
from luna.crops import CropApp
from luna.ct import write_scan
from luna.geometry import Geometry, irc_to_xyz
from hooks import hook_env
from store_util import read_arrays

SUBSET = "subset0"
N_SCANS, PER_SCAN = 3, 8  # 32x48x48 int16 crops: 147 KiB each, 1.2 MiB per scan in the store and in the cache


@pytest.fixture()
def tmpfs(tmp_path):
    """Mount small tmpfs file systems: ``tmpfs(name, size, read_only)``; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m", read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full or read-only file system needs a tmpfs mount, which needs root")
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                  capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _remount(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True, timeout=30)


@pytest.fixture()
def data(tmp_path) -> tuple[Path, Path]:
    """N_SCANS small scans with PER_SCAN candidates inside each; returns (root, candidates.tsv)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    rows = []
    for k in range(N_SCANS):
        geometry = Geometry([float(k), 0.0, 0.0], [0.7, 0.7, 2.5])
        write_scan(root / SUBSET / f"1.{k}.mhd", rng.integers(-1000, 1000, size=(20, 30, 40), dtype=np.int16),
                   geometry)
        for irc in rng.uniform(0, 19, size=(PER_SCAN, 3)):
            x, y, z = irc_to_xyz(irc, geometry)
            rows.append(dict(candidate_id=len(rows), series_uid=f"1.{k}", subset=SUBSET, coord_x=x, coord_y=y,
                             coord_z=z, is_nodule=0, diameter_mm=0.0))
    tsv = tmp_path / "candidates.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    return root, tsv


def _argv(data: tuple[Path, Path], out: Path, cache: Path | None = None) -> list[str]:
    root, tsv = data
    return ["--candidates", str(tsv), "--root", str(root), "--subset", SUBSET, "--out", str(out),
            *(["--cache-dir", str(cache)] if cache else [])]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("luna-crops: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return lines[0][len("luna-crops: error: "):]


def _nothing_declared(folder: Path) -> None:
    """No store, skipped table or temp file (of ours or of check_writable_dir) in the output folder."""
    if folder.exists():
        left = sorted(p.name for p in folder.iterdir() if p.is_file())
        assert left == [], left


# ---------------------------------------------------------------------------------------------------- full disk


def test_store_that_cannot_fit_fails_before_any_scan_is_read(tmp_path, tmpfs, data, capsys, caplog) -> None:
    caplog.set_level("INFO", logger="luna.crops")
    full = tmpfs("full", "1m")
    out = full / f"{SUBSET}.h5"
    assert CropApp(_argv(data, out, tmp_path / "cache")).main() == 2
    reason = _error_line(capsys.readouterr().err)
    match = re.fullmatch(rf"{re.escape(str(out))}: not enough space for the crop store \(no space left on device: "
                         r"it needs up to ([\d.]+) MiB, ([\d.]+) MiB are free\)", reason)
    assert match, reason
    assert float(match.group(1)) > 3.4 and float(match.group(2)) <= 1.0
    assert "done (read)" not in caplog.text  # stopped before hours of work
    _nothing_declared(full)
    assert not (tmp_path / "cache").exists()


def test_cache_that_cannot_fit_fails_before_any_scan_is_read(tmp_path, tmpfs, data, capsys, caplog) -> None:
    caplog.set_level("INFO", logger="luna.crops")
    small = tmpfs("small", "1m")
    out = tmp_path / "out" / f"{SUBSET}.h5"
    assert CropApp(_argv(data, out, small / "cache")).main() == 2
    reason = _error_line(capsys.readouterr().err)
    assert re.fullmatch(rf"{re.escape(str(small / 'cache'))}: not enough space for the resume cache \(it needs "
                        r"3\.[\d]+ MiB, 0\.\d+ MiB are free\)", reason), reason
    assert "done (read)" not in caplog.text
    _nothing_declared(out.parent)
    assert not (small / "cache").exists()  # created empty by this run: removed


def test_disk_filling_under_hdf5_is_one_line_not_a_segfault(tmp_path, tmpfs, data) -> None:
    """The store's file system fills while HDF5 writes (here: no reservation): exit 2, no crash, no temp file."""
    full = tmpfs("full", "1m")
    out = full / f"{SUBSET}.h5"
    env = hook_env(LUNA_TEST_NO_RESERVE="1")
    done = subprocess.run([sys.executable, "-m", "luna.crops", *_argv(data, out, tmp_path / "cache")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert _error_line(done.stderr) == f"{out}: cannot write the crop store (no space left on device)"
    _nothing_declared(full)


def test_rerun_after_disk_full_resumes_and_equals_an_uninterrupted_run(tmp_path, tmpfs, data) -> None:
    full = tmpfs("full", "3m")
    out = full / "crops" / f"{SUBSET}.h5"
    cache = out.parent / f".{out.name}.cache"  # the default: beside the store, on the same full disk
    env = hook_env(LUNA_TEST_NO_RESERVE="1")
    first = subprocess.run([sys.executable, "-m", "luna.crops", *_argv(data, out)], capture_output=True, text=True,
                           env=env, timeout=120)
    assert first.returncode == 2, first.stderr[-3000:]
    reason = _error_line(first.stderr)
    assert reason.startswith(str(full)) and reason.endswith("(no space left on device)"), reason
    _nothing_declared(out.parent)
    kept = re.search(r"kept the resume cache (\S+) \((\d+) scans\)", first.stderr)
    assert kept and kept.group(1) == str(cache) and int(kept.group(2)) >= 1, first.stderr[-3000:]

    _remount(full, "64m")  # space freed
    app = CropApp(_argv(data, out))
    result = app.run()
    assert result.n_scans_from_cache == int(kept.group(2))
    assert not cache.exists()
    reference = tmp_path / "ref" / f"{SUBSET}.h5"
    CropApp(_argv(data, reference)).run()
    got, want = read_arrays(out), read_arrays(reference)
    assert len(want["crops"]) == N_SCANS * PER_SCAN
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert sorted(p.name for p in out.parent.iterdir()) == [f"{SUBSET}.h5", f"{SUBSET}.skipped.tsv"]


def test_candidates_on_a_full_disk_is_one_line(tmp_path, tmpfs, capsys) -> None:
    full = tmpfs("full", "64k")
    (full / "filler").write_bytes(b"\0" * (64 * 1024))
    root = tmp_path / "data"
    write_scan(root / SUBSET / "1.1.mhd", np.zeros((2, 2, 2), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.1,0,0,0,1\n")
    out = full / "candidates.tsv"
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(out)]).main() == 2
    err = capsys.readouterr().err.strip()
    assert err == f"luna-candidates: error: {full}: cannot write to the output folder (no space left on device)"
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


# ---------------------------------------------------------------------------------------------------- not writable


def test_read_only_output_folder(tmp_path, tmpfs, data, capsys) -> None:
    read_only = tmpfs("ro", "1m", read_only=True)
    out = read_only / "crops" / f"{SUBSET}.h5"
    assert CropApp(_argv(data, out, tmp_path / "cache")).main() == 2
    assert _error_line(capsys.readouterr().err) == (
        f"{out.parent}: cannot write to the output folder (permission denied or read-only file system)")
    assert not (tmp_path / "cache").exists()
    root, _ = data
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.1,0,0,0,1\n")
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(read_only / "c.tsv")]).main() == 2
    assert capsys.readouterr().err.strip() == (
        f"luna-candidates: error: {read_only}: cannot write to the output folder (permission denied or "
        "read-only file system)")


def test_output_folder_under_a_regular_file(tmp_path, data, capsys) -> None:
    """Runs everywhere (no mount): the output folder's path goes through a file."""
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be\n")
    out = blocker / "crops" / f"{SUBSET}.h5"
    assert CropApp(_argv(data, out, tmp_path / "cache")).main() == 2
    assert _error_line(capsys.readouterr().err) == f"{out.parent}: cannot write to the output folder (a file is in the way: not a folder)"
    root, _ = data
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.1,0,0,0,1\n")
    out = blocker / "tables" / "c.tsv"
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(out)]).main() == 2
    assert capsys.readouterr().err.strip() == f"luna-candidates: error: {out.parent}: cannot write to the output folder (a file is in the way: not a folder)"
    assert blocker.read_text() == "a file where a folder should be\n"


def test_an_output_path_that_is_not_a_regular_file(tmp_path) -> None:
    """The atomic write renames its temp file onto the path: a symlink is written through (the link stays), a
    FIFO or a folder there is refused (the rename replaced a FIFO, and a device node when run as root), and a
    symlink loop is one line (was a RuntimeError's traceback)."""
    from luna.io import OutputError, write_tsv

    frame = pd.DataFrame({"a": [1]})
    (tmp_path / "real.tsv").write_text("old\n")
    (tmp_path / "link.tsv").symlink_to("real.tsv")
    write_tsv(frame, tmp_path / "link.tsv")
    assert (tmp_path / "link.tsv").is_symlink() and (tmp_path / "real.tsv").read_text() == "a\n1\n"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to("loop")
    for name, message in [("fifo", "is not a regular file (a FIFO, socket or device)"), (".", "is a folder"),
                          ("loop", "cannot follow the symlink")]:
        with pytest.raises(OutputError) as info:
            write_tsv(frame, tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: {message}"), str(info.value)
    assert (tmp_path / "fifo").is_fifo()  # not replaced


def test_crops_outputs_that_are_inputs_or_in_the_scan_folder_are_refused(tmp_path, data, capsys) -> None:
    """--out or --skipped naming the candidates table replaced it, --skipped naming a scan header deleted the scan,
    and one file for both lost the store: each is one line now, and every input is as it was."""
    root, tsv = data
    scan = root / SUBSET / "1.0.mhd"
    before = {p: p.read_bytes() for p in (tsv, scan)}
    out = tmp_path / "crops" / f"{SUBSET}.h5"
    cases = [
        (["--out", str(tsv)], f"--out {tsv} is the input --candidates {tsv}; write the output elsewhere"),
        (["--skipped", str(tsv)], f"--skipped {tsv} is the input --candidates {tsv}; write the output elsewhere"),
        (["--skipped", str(scan)], f"--skipped {scan} lies in the scan folder {root / SUBSET}; write it elsewhere"),
        (["--out", str(root / SUBSET / "s.h5")],
         f"--out {root / SUBSET / 's.h5'} lies in the scan folder {root / SUBSET}; write it elsewhere"),
        (["--skipped", str(out)], f"--out {out} and --skipped {out} are one file; name two"),
    ]
    for extra, message in cases:
        assert CropApp(_argv(data, out, tmp_path / "cache") + extra).main() == 2, extra
        assert _error_line(capsys.readouterr().err) == message
    # another subset's folder (not cropped by this run) and a symlink loop
    other = root / "subset9"
    other.mkdir()
    (other / "9.9.mhd").write_text("ObjectType = Image\n")
    (tmp_path / "loop").symlink_to("loop")
    for extra, message in [
        (["--skipped", str(other / "9.9.mhd")], f"--skipped {other / '9.9.mhd'} lies in the scan folder {other}; "
                                                 "write it elsewhere"),
        (["--skipped", str(tmp_path / "loop")], f"--skipped {tmp_path / 'loop'}: cannot follow the symlink"),
    ]:
        assert CropApp(_argv(data, out, tmp_path / "cache") + extra).main() == 2, extra
        assert _error_line(capsys.readouterr().err).startswith(message)
    assert (other / "9.9.mhd").read_text() == "ObjectType = Image\n"
    assert {p: p.read_bytes() for p in (tsv, scan)} == before
    assert sorted(p.name for p in (root / SUBSET).iterdir()) == sorted(
        [f"1.{k}.{ext}" for k in range(N_SCANS) for ext in ("mhd", "raw")])
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_an_empty_out_is_one_line_in_every_stage(tmp_path, capsys, monkeypatch) -> None:
    """``--out ""`` (an unset shell variable) is the current folder to Path: luna-evaluate and luna-validate wrote
    their report there after removing the report files they found, luna-predict said ": is a folder", luna-crops
    ".: is a folder", luna-train wrote model.pt into it."""
    from luna.evaluation import EvaluateApp
    from luna.io import OutputError
    from luna.training import LunaTrainingApp
    from luna.validation import PredictApp, ValidationApp

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.tsv").write_text("mine\n")
    missing = str(tmp_path / "missing")
    cases = [(EvaluateApp, ["--folds", missing, "--splits", missing], "report folder"),
             (ValidationApp, ["--model", missing, "--crops", missing, "--splits", missing], "report folder"),
             (PredictApp, ["--model", missing, "--crops", missing], "predictions.tsv file to write"),
             (CropApp, ["--candidates", missing, "--root", missing, "--subset", "subset0"],
              "crop store to write (crops/subset0.h5)")]
    for app, argv, what in cases:
        assert app([*argv, "--out", " "]).main() == 2, app
        assert capsys.readouterr().err.strip() == f"{app.prog}: error: --out: empty path; name the {what}"
    with pytest.raises(OutputError, match="^--out: empty path; name the output folder$"):
        LunaTrainingApp(["--crops", missing, "--splits", missing, "--test-fold", "0", "--out", ""])
    assert (tmp_path / "metrics.tsv").read_text() == "mine\n"
