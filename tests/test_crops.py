"""Crop stage: exact crops against an independent reference, bad input, resume after SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from hooks import default_sigint, hook_env
from luna.crop_cache import _BufferReader, cache_get, cache_key, cache_put, open_cache
from luna.cropping import crop_start, cut_crop, cut_scan_crops
from luna.crops import CropApp, CropError, main
from luna.ct import read_scan, write_scan
from luna.geometry import Geometry, irc_to_xyz
from luna.io import OutputError
from luna.store import CropStore, read_crops
from store_util import read_arrays

LIDC_DIR = Path(__file__).parent / "fixtures" / "lidc"
LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
SUBSET = "subset0"
TSV_COLUMNS = ["candidate_id", "series_uid", "subset", "coord_x", "coord_y", "coord_z", "is_nodule", "diameter_mm"]


def _rotation_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _rotation_30_tilted() -> np.ndarray:
    """30 degrees about z, then 30 about x: a non-symmetric direction, as the book's xyz2irc gets wrong."""
    t = np.deg2rad(30)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    return rx @ _rotation_z(30)


SCANS = {  # uid: (shape_irc, origin_xyz, spacing_xyz, direction)
    "1.1.identity": ((20, 30, 40), (-100.0, -50.0, -300.0), (0.7, 0.8, 2.5), np.eye(3)),
    "1.2.flipxy": ((20, 30, 40), (120.0, 90.0, -200.0), (0.6, 0.65, 1.25), np.diag([-1.0, -1.0, 1.0])),
    "1.3.rot30": ((20, 30, 40), (5.0, -7.0, 11.0), (1.0, 0.5, 2.0), _rotation_z(30)),
    "1.4.rot30tilt": ((20, 30, 40), (-3.0, 4.0, -5.0), (0.9, 1.1, 1.7), _rotation_30_tilted()),
    "1.5.small": ((6, 30, 10), (0.0, 0.0, 0.0), (0.7, 0.7, 2.5), np.eye(3)),  # smaller than an 8x12x16 crop in I, C
}


def _volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random HU well beyond the window on both sides, so clipping is exercised."""
    return np.random.default_rng(seed).integers(-2500, 3500, size=shape, dtype=np.int16)


def _write_scans(root: Path, scans: dict = SCANS, subset: str = SUBSET) -> dict[str, Path]:
    paths = {}
    for k, (uid, (shape, origin, spacing, direction)) in enumerate(scans.items()):
        path = root / subset / f"{uid}.mhd"
        write_scan(path, _volume(shape, k), Geometry(origin, spacing, direction))
        paths[uid] = path
    return paths


def _probe_points_irc(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Continuous indices: every corner and face centre, just inside (rounds onto the border voxel) and just
    beyond (rounds outside), the centre, and random interior points."""
    n = np.asarray(shape, dtype=np.float64)
    pts = []
    for lo_off, hi_off in ((-0.4, 0.4), (-0.6, 0.6)):  # inside (rounds to 0 / n-1), outside (-1 / n)
        lo, hi = np.full(3, lo_off), n - 1 + hi_off
        mid = np.floor(n / 2) + 0.1  # not a half-integer: both roundings must agree
        for corner in np.ndindex(2, 2, 2):
            pts.append(np.where(np.array(corner) == 1, hi, lo))
        for axis in range(3):
            for end in (lo, hi):
                p = mid.copy()
                p[axis] = end[axis]
                pts.append(p)
    pts.append(np.floor(n / 2) - 0.2)
    pts.extend(rng.uniform(-0.45, n - 0.55, size=(6, 3)))
    pts.append(np.array([-30.0, n[1] / 2, n[2] + 40]))  # far outside
    return np.asarray(pts)


def _write_candidates(path: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=TSV_COLUMNS)
    df.to_csv(path, sep="\t", index=False)
    return df


def _candidates_for(paths: dict[str, Path], seed: int = 0, subset: str = SUBSET) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for uid, (shape, origin, spacing, direction) in {u: SCANS[u] for u in paths}.items():
        geometry = Geometry(origin, spacing, direction)
        for irc in _probe_points_irc(shape, rng):
            x, y, z = irc_to_xyz(irc, geometry)
            rows.append(dict(series_uid=uid, subset=subset, coord_x=x, coord_y=y, coord_z=z,
                             is_nodule=int(rng.integers(0, 2)), diameter_mm=float(rng.uniform(0, 20))))
    # interleave scans so TSV order differs from scan order, and number rows like a CSV would
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    for i, row in enumerate(rows):
        row["candidate_id"] = 10 * i + 3
    return rows


def _reference(path: Path, xyz: tuple[float, float, float], crop_shape, hu_window=(-1000, 1000)):
    """Independent cut: SimpleITK's voxel of the point, the border rule written out, numpy slicing of a padded
    volume. Returns (inside, center_irc, start_irc, crop)."""
    image = sitk.ReadImage(str(path))
    volume = np.clip(sitk.GetArrayFromImage(image), *hu_window)
    cx, cy, cz = image.TransformPhysicalPointToIndex(tuple(float(v) for v in xyz))
    center = (cz, cy, cx)
    inside = all(0 <= c < n for c, n in zip(center, volume.shape))
    start = []
    for c, w, n in zip(center, crop_shape, volume.shape):
        start.append(min(max(c - w // 2, min(0, n - w)), max(0, n - w)))
    pad = [(w, w) for w in crop_shape]
    padded = np.pad(volume, pad, constant_values=hu_window[0])
    sl = tuple(slice(s + w, s + 2 * w) for s, w in zip(start, crop_shape))
    return inside, center, tuple(start), padded[sl]


def _run(tmp_path: Path, tsv: Path, root: Path, name: str = "out", extra: list[str] = ()) -> tuple[CropApp, Path]:
    out = tmp_path / name / f"{SUBSET}.h5"
    argv = ["--candidates", str(tsv), "--root", str(root), "--subset", SUBSET, "--out", str(out),
            "--cache-dir", str(tmp_path / name / "cache"), *extra]
    app = CropApp(argv)
    app.result = app.run()
    return app, out


def _assert_matches_reference(out: Path, skipped_path: Path, df: pd.DataFrame, paths: dict[str, Path],
                              crop_shape) -> tuple[int, int]:
    """Every stored row equals the reference and every outside candidate is in the skipped table."""
    arrays = read_arrays(out)
    skipped = pd.read_csv(skipped_path, sep="\t", dtype={"series_uid": str})
    expected_rows, expected_skipped = [], []
    for _, row in df.iterrows():
        xyz = (row.coord_x, row.coord_y, row.coord_z)
        inside, center, start, crop = _reference(paths[row.series_uid], xyz, crop_shape)
        (expected_rows if inside else expected_skipped).append((row, center, start, crop))
    assert len(arrays["crops"]) == len(expected_rows)
    for k, (row, center, start, crop) in enumerate(expected_rows):
        assert arrays["candidate_id"][k] == row.candidate_id
        assert arrays["series_uid"][k] == row.series_uid
        np.testing.assert_array_equal(arrays["center_xyz"][k], [row.coord_x, row.coord_y, row.coord_z])
        assert tuple(arrays["center_irc"][k]) == center
        assert tuple(arrays["crop_start_irc"][k]) == start
        assert arrays["is_nodule"][k] == row.is_nodule
        assert arrays["diameter_mm"][k] == np.float32(row.diameter_mm)
        assert arrays["crops"][k].dtype == np.int16 and arrays["crops"][k].shape == tuple(crop_shape)
        np.testing.assert_array_equal(arrays["crops"][k], crop, err_msg=f"row {k} candidate {row.candidate_id}")
    assert skipped["candidate_id"].tolist() == [r.candidate_id for r, *_ in expected_skipped]
    assert skipped["series_uid"].tolist() == [r.series_uid for r, *_ in expected_skipped]
    assert skipped["reason"].str.startswith("outside scan").all()
    return len(expected_rows), len(expected_skipped)


# ---------------------------------------------------------------------------------------------------- pure numpy


def test_crop_start_border_rule_values():
    # scan larger than the crop: the book's shift-inside rule
    assert crop_start([50, 10, 90], (32, 48, 48), (100, 100, 100)).tolist() == [34, 0, 52]
    assert crop_start([0, 99, 24], (32, 48, 48), (100, 100, 100)).tolist() == [0, 52, 0]
    # scan as large as the crop: always 0
    assert crop_start([0, 47, 20], (32, 48, 48), (32, 48, 48)).tolist() == [0, 0, 0]
    # scan smaller than the crop (LIDC slab: 16 slices): whole scan inside, candidate as central as possible
    assert crop_start([7, 0, 15], (32, 32, 32), (16, 16, 16)).tolist() == [-9, -16, -1]
    # vectorised over rows
    starts = crop_start(np.array([[7, 367, 316], [0, 0, 0]]), (32, 48, 48), (16, 512, 512))
    assert starts.tolist() == [[-9, 343, 292], [-16, 0, 0]]


def test_cut_crop_pads_with_window_minimum_and_clips():
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 20 - 1200  # -1200 .. 1180
    crop = cut_crop(volume, (-2, 1, 3), (6, 3, 4), (-1000, 1000))
    assert crop.dtype == np.int16 and crop.shape == (6, 3, 4)
    assert (crop[:2] == -1000).all()  # before the scan in I
    assert (crop[:, :, 3] == -1000).all()  # past the scan in C (columns 3..5 exist, 6 does not)
    expected = np.clip(volume[0:4, 1:4, 3:6], -1000, 1000)
    np.testing.assert_array_equal(crop[2:6, :, 0:3], expected)
    assert crop.min() == -1000 and crop.max() == 1000
    # wholly inside: plain clipped slice
    np.testing.assert_array_equal(cut_crop(volume, (1, 1, 1), (2, 2, 2), (-500, 500)),
                                  np.clip(volume[1:3, 1:3, 1:3], -500, 500))
    # no overlap at all: all window minimum
    assert (cut_crop(volume, (10, 10, 10), (2, 2, 2), (-900, 900)) == -900).all()


def test_cut_scan_crops_marks_outside_centres():
    geometry = Geometry((10.0, 20.0, 30.0), (1.0, 2.0, 3.0))
    volume = _volume((5, 6, 7), 3)
    centers_irc = np.array([[0, 0, 0], [4, 5, 6], [5, 0, 0], [-1, 2, 2], [2, 3, 3]], dtype=np.float64)
    centers_xyz = irc_to_xyz(centers_irc, geometry)
    crops, center_irc, start_irc, inside = cut_scan_crops(volume, geometry, centers_xyz, (2, 4, 4))
    assert inside.tolist() == [True, True, False, False, True]
    assert center_irc.tolist() == centers_irc.astype(int).tolist()
    assert start_irc.tolist()[:2] == [[0, 0, 0], [3, 2, 3]]
    assert crops.shape == (3, 2, 4, 4)
    np.testing.assert_array_equal(crops[2], np.clip(volume[1:3, 1:5, 1:5], -1000, 1000))


def test_cache_key_changes_with_every_input():
    ident = ("/a.mhd", 10, 1, "/a.raw", 20, 2)
    centers = np.array([[1.0, 2.0, 3.0]])
    base = cache_key(ident, (32, 48, 48), (-1000, 1000), centers)
    assert base == cache_key(list(ident), [32, 48, 48], [-1000, 1000], centers.copy())
    assert base != cache_key(("/a.mhd", 10, 1, "/a.raw", 20, 3), (32, 48, 48), (-1000, 1000), centers)
    assert base != cache_key(ident, (32, 48, 46), (-1000, 1000), centers)
    assert base != cache_key(ident, (32, 48, 48), (-1000, 400), centers)
    assert base != cache_key(ident, (32, 48, 48), (-1000, 1000), centers + 1e-9)


def test_cache_round_trip_and_incomplete_entry_is_a_miss(tmp_path):
    crops = _volume((7, 4, 5, 6), 9)
    rows = {"center_irc": np.arange(21).reshape(7, 3), "inside": np.ones(7, dtype=bool)}
    cache = open_cache(tmp_path / "cache")
    try:
        cache_put(cache, ("k", 1), crops, rows)
        got, got_rows = cache_get(cache, ("k", 1))
        np.testing.assert_array_equal(got, crops)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got_rows["center_irc"], rows["center_irc"])
        assert cache_get(cache, ("k", 2)) is None
        # killed after the crops file but before the per-row arrays: not a hit
        cache.set(("k", 3, "crops"), _BufferReader(crops), read=True)
        assert cache_get(cache, ("k", 3)) is None
        # the crops file changed on disk after the entry was made: same size (was used as it was) or longer
        cache_put(cache, ("k", 4), crops, rows)
        with cache.get(("k", 4, "crops"), read=True) as handle:
            path = Path(handle.name)
        with open(path, "r+b") as fh:
            fh.seek(100)
            fh.write(b"XXXXXXXX")
        assert cache_get(cache, ("k", 4)) is None
        cache_put(cache, ("k", 5), crops, rows)
        with cache.get(("k", 5, "crops"), read=True) as handle:
            path = Path(handle.name)
        with open(path, "ab") as fh:
            fh.write(b"\0\0")
        assert cache_get(cache, ("k", 5)) is None
        assert cache_get(cache, ("k", 1)) is not None
    finally:
        cache.close()


def test_unreadable_cache_database_says_delete_it(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.db").write_bytes(np.random.default_rng(0).bytes(28672))
    with pytest.raises(OutputError) as info:
        open_cache(tmp_path / "cache")
    assert str(info.value) == (f"{tmp_path / 'cache'}: cannot use the resume cache (file is not a database: corrupt? "
                               "delete the folder to start afresh)")


# ---------------------------------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def synthetic_scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    paths = _write_scans(root)
    tsv = root / "candidates.tsv"
    rows = _candidates_for(paths)
    rows.append(dict(candidate_id=99999, series_uid="1.1.identity", subset="subset1", coord_x=0.0, coord_y=0.0,
                     coord_z=0.0, is_nodule=0, diameter_mm=0.0))  # another subset: not this job's
    df = _write_candidates(tsv, rows)
    return root, tsv, df[df["subset"] == SUBSET], paths


@pytest.mark.parametrize("crop_shape", [(8, 12, 16), (32, 48, 48)], ids=["scan-larger", "scan-smaller"])
def test_every_crop_equals_reference(tmp_path, synthetic_scans, crop_shape):
    root, tsv, df, paths = synthetic_scans
    app, out = _run(tmp_path, tsv, root, extra=["--shape", *map(str, crop_shape), "--threads", "2"])
    n_rows, n_skipped = _assert_matches_reference(out, app.skipped_path, df, paths, crop_shape)
    # per scan: 8 corners + 6 faces rounding onto the border, 1 centre, 6 random points inside; 8 corners +
    # 6 faces just beyond the border and 1 far away outside
    assert (n_rows, n_skipped) == (5 * 21, 5 * 15)
    assert app.skipped_path == out.parent / f"{SUBSET}.skipped.tsv"
    assert app.result.n_cropped == n_rows and app.result.n_outside == n_skipped
    # a second store of the subset beside it (another shape) gets its own table: it removed the first one's
    table = app.skipped_path.read_bytes()
    small = CropApp(["--candidates", str(tsv), "--root", str(root), "--subset", SUBSET, "--out",
                     str(out.parent / "small.h5"), "--shape", "16", "16", "16", "--cache-dir", str(tmp_path / "c2")])
    small.run()
    assert small.skipped_path == out.parent / "small.skipped.tsv" and small.skipped_path.is_file()
    assert app.skipped_path.read_bytes() == table
    assert not (tmp_path / "out" / "cache").exists()  # resume cache removed after the commit
    store = CropStore(out)
    assert store.crop_shape == crop_shape
    assert store.hu_window == (-1000, 1000)
    assert set(store.geometries) == set(paths)
    geometry, shape = store.geometries["1.4.rot30tilt"]
    np.testing.assert_allclose(geometry.direction, _rotation_30_tilted(), atol=1e-12)
    assert shape == (20, 30, 40)


def test_store_batch_read_keeps_order_duplicates_and_checks_range(tmp_path, synthetic_scans):
    root, tsv, df, paths = synthetic_scans
    _, out = _run(tmp_path, tsv, root)
    store = CropStore(out)
    every = store.crops()
    order = [7, 2, 7, len(store) - 1, 0, 2]
    batch = store.crops(order)
    assert batch.shape == (6, *store.crop_shape) and batch.dtype == np.int16
    for k, i in enumerate(order):
        np.testing.assert_array_equal(batch[k], every[i])
        np.testing.assert_array_equal(store.crop(i), every[i])
    # runs of consecutive rows are read at once: ascending runs, a descending one, a negative index, repeats
    n = len(store)
    runs = [3, 4, 5, 0, 1, 2, 5, 4, -1, n - 2, 6, 6, 7]
    np.testing.assert_array_equal(store.crops(runs), every[[r % n for r in runs]])
    np.testing.assert_array_equal(store.crops(np.arange(n)), every)
    assert store.crops([]).shape == (0, *store.crop_shape)
    with pytest.raises(IndexError, match=f"crop index {-n - 1} out of range"):
        store.crops([0, -n - 1])
    with pytest.raises(IndexError, match=f"crop index {len(store)} out of range"):
        store.crops([0, len(store)])



def test_read_crops_from_several_stores_in_the_order_given(tmp_path, synthetic_scans):
    """read_crops (what training, its resident load and prediction read through) keeps the item order across
    stores, repeats included, and gives an empty (0, I, R, C) array for no items."""
    root, tsv, df, paths = synthetic_scans
    _, out_a = _run(tmp_path, tsv, root, "a")
    _, out_b = _run(tmp_path, tsv, root, "b", ["--shape", "32", "48", "48", "--hu-window", "-900", "900"])
    a, b = CropStore(out_a), CropStore(out_b)
    assert not np.array_equal(a.crops([0]), b.crops([0]))  # the two stores hold different crops
    store_of = np.array([1, 0, 1, 0, 0, 1])
    row_of = np.array([3, len(a) - 1, 2, 0, 1, 3])
    got = read_crops([a, b], store_of, row_of)
    for k, (s, r) in enumerate(zip(store_of, row_of)):
        np.testing.assert_array_equal(got[k], (a, b)[s].crops([r])[0])
    assert read_crops([a, b], np.zeros(0, int), np.zeros(0, int)).shape == (0, *a.crop_shape)
    assert read_crops([], np.zeros(0, int), np.zeros(0, int), (8, 12, 16)).shape == (0, 8, 12, 16)


def test_same_inputs_identical_arrays_any_thread_count(tmp_path, synthetic_scans, caplog):
    root, tsv, df, paths = synthetic_scans
    with caplog.at_level("WARNING", logger="luna.crops"):
        _, out1 = _run(tmp_path, tsv, root, "a", ["--shape", "8", "12", "16", "--threads", "1"])
    # a store for other uses, said: luna-train refused it only after every subset was cut
    assert "--shape 8 12 16: LunaModel needs each size >= 16 (four 2x max-pools); luna-train will refuse these " \
           "crops" in caplog.text
    _, out3 = _run(tmp_path, tsv, root, "b", ["--shape", "8", "12", "16", "--threads", "3", "--compression", "gzip1"])
    a1, a3 = read_arrays(out1), read_arrays(out3)
    assert a1.keys() == a3.keys()
    for name in a1:
        np.testing.assert_array_equal(a1[name], a3[name], err_msg=name)


def test_lidc_slab_whole_slab_inside_crop(tmp_path):
    """Real CT, 16 slices < 32: the crop holds the whole slab in I, centred on the nodule as far as possible."""
    assert (LIDC_DIR / f"{LIDC_UID}.mhd").is_file()
    root = tmp_path / "data"
    (root / SUBSET).mkdir(parents=True)
    for f in LIDC_DIR.glob(f"{LIDC_UID}.*"):
        (root / SUBSET / f.name).symlink_to(f.resolve())
    ann = pd.read_csv(LIDC_DIR / "annotations.csv")
    nodule = ann.iloc[0]
    path = root / SUBSET / f"{LIDC_UID}.mhd"
    image = sitk.ReadImage(str(path))
    corner_lo = image.TransformIndexToPhysicalPoint((0, 0, 0))
    corner_hi = image.TransformIndexToPhysicalPoint((511, 511, 15))
    rows = [
        dict(candidate_id=0, coord_x=nodule.coordX, coord_y=nodule.coordY, coord_z=nodule.coordZ,
             is_nodule=1, diameter_mm=nodule.diameter_mm),
        dict(candidate_id=1, coord_x=corner_lo[0], coord_y=corner_lo[1], coord_z=corner_lo[2], is_nodule=0,
             diameter_mm=0.0),
        dict(candidate_id=2, coord_x=corner_hi[0], coord_y=corner_hi[1], coord_z=corner_hi[2], is_nodule=0,
             diameter_mm=0.0),
        dict(candidate_id=3, coord_x=0.0, coord_y=0.0, coord_z=corner_hi[2] + 5.0, is_nodule=0, diameter_mm=0.0),
    ]
    for r in rows:
        r.update(series_uid=LIDC_UID, subset=SUBSET)
    tsv = tmp_path / "candidates.tsv"
    df = _write_candidates(tsv, rows)
    app, out = _run(tmp_path, tsv, root, extra=["--threads", "2"])
    n_rows, n_skipped = _assert_matches_reference(out, app.skipped_path, df, {LIDC_UID: path}, (32, 48, 48))
    assert (n_rows, n_skipped) == (3, 1)
    arrays = read_arrays(out)
    assert arrays["center_irc"][0].tolist() == [7, 367, 316]  # voxel given in the data README (x=316, y=367, z=7)
    assert arrays["crop_start_irc"].tolist() == [[-9, 343, 292], [-16, 0, 0], [-1, 464, 464]]
    crop = arrays["crops"][0]
    assert (crop[:9] == -1000).all() and (crop[25:] == -1000).all()  # outside the 16-slice slab
    slab = np.clip(sitk.GetArrayFromImage(image), -1000, 1000)
    np.testing.assert_array_equal(crop[9:25], slab[:, 343:391, 292:340])
    assert np.median(crop[16, 23:26, 23:26]) == 93  # the nodule centre, +93 HU as measured in the README
    assert arrays["is_nodule"].tolist() == [1, 0, 0]


def test_empty_is_nodule_stored_as_minus_one_and_header_only_skipped(tmp_path):
    root = tmp_path / "data"
    scans = {"2.1": SCANS["1.1.identity"]}
    _write_scans(root, scans)
    geometry = Geometry(*SCANS["1.1.identity"][1:])
    tsv = tmp_path / "candidates.tsv"
    x, y, z = (float(v) for v in irc_to_xyz(np.array([10.0, 15.0, 20.0]), geometry))
    tsv.write_text("\t".join(TSV_COLUMNS) + "\n" + f"0\t2.1\t{SUBSET}\t{x!r}\t{y!r}\t{z!r}\t\t0\n"
                   + f"1\t2.1\t{SUBSET}\t{x!r}\t{y!r}\t{z!r}\t\t0\n")
    app, out = _run(tmp_path, tsv, root)
    arrays = read_arrays(out)
    assert arrays["is_nodule"].tolist() == [-1, -1]
    assert arrays["center_irc"].tolist() == [[10, 15, 20], [10, 15, 20]]
    assert app.skipped_path.read_text() == "candidate_id\tseries_uid\tcoord_x\tcoord_y\tcoord_z\treason\n"


def test_help_documents_options_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--candidates", "--root", "--subset", "--out", "--skipped", "--cache-dir", "--threads",
                   "--shape", "--hu-window", "--on-bad-scan", "--compression"):
        assert option in text
    assert "[32, 48, 48]" in text and "[-1000, 1000]" in text and "fail" in text


# ---------------------------------------------------------------------------------------------------- bad input

BAD_UID = "1.3.rot30"


def _break_missing_raw(path: Path) -> None:
    path.with_suffix(".raw").unlink()


def _break_truncated_raw(path: Path) -> None:
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])


def _break_unreadable_header(path: Path) -> None:
    path.write_bytes(b"\x00\x01 this is not a MetaImage header\n\xff\xfe")


def _break_vanished(path: Path) -> None:
    path.unlink()
    path.with_suffix(".raw").unlink()


def _break_truncated_zraw(path: Path) -> None:
    """Compressed scan cut short: the header and pre-pass checks pass, only reading the voxels fails."""
    volume, geometry = read_scan(path)
    path.with_suffix(".raw").unlink()
    write_scan(path, volume, geometry, compress=True)
    zraw = path.with_suffix(".zraw")
    zraw.write_bytes(zraw.read_bytes()[: zraw.stat().st_size // 2])


def _break_corrupt_zraw(path: Path) -> None:
    """200 bytes overwritten inside the compressed stream; sizes and header unchanged (SimpleITK reads it)."""
    volume, geometry = read_scan(path)
    path.with_suffix(".raw").unlink()
    write_scan(path, volume, geometry, compress=True)
    zraw = path.with_suffix(".zraw")
    data = bytearray(zraw.read_bytes())
    data[len(data) // 3:len(data) // 3 + 200] = np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8).tobytes()
    zraw.write_bytes(bytes(data))


def _set_header(path: Path, key: str, value: str) -> None:
    path.write_text(re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", path.read_text()))


def _break_uchar_over_short(path: Path) -> None:
    _set_header(path, "ElementType", "MET_UCHAR")


def _break_non_orthonormal(path: Path) -> None:
    _set_header(path, "TransformMatrix", "-1 0 0 0 -2 0 0 0 1")


def _break_singular_direction(path: Path) -> None:
    _set_header(path, "TransformMatrix", "0 0 0 0 1 0 0 0 1")


def _break_larger_data_file(path: Path) -> None:
    """ElementDataFile names another, larger scan's data."""
    other = path.with_name("9.9.other.mhd")
    write_scan(other, np.zeros((21, 30, 40), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    other.unlink()
    _set_header(path, "ElementDataFile", other.with_suffix(".raw").name)


BREAKERS = {
    "missing-raw": (_break_missing_raw, ".raw"),
    "truncated-raw": (_break_truncated_raw, ".raw"),
    "unreadable-header": (_break_unreadable_header, ".mhd"),
    "vanished-scan": (_break_vanished, ".mhd"),
    "truncated-zraw": (_break_truncated_zraw, ".zraw"),
    "corrupt-zraw": (_break_corrupt_zraw, ".zraw"),
    "uchar-over-short": (_break_uchar_over_short, ".raw"),
    "non-orthonormal": (_break_non_orthonormal, ".mhd"),
    "singular-direction": (_break_singular_direction, ".mhd"),
    "larger-data-file": (_break_larger_data_file, ".mhd"),
}


@pytest.fixture()
def broken_setup(tmp_path, request):
    root = tmp_path / "data"
    paths = _write_scans(root)
    tsv = tmp_path / "candidates.tsv"
    df = _write_candidates(tsv, _candidates_for(paths, seed=1))
    breaker, suffix = BREAKERS[request.param]
    breaker(paths[BAD_UID])
    return root, tsv, df, paths, suffix


@pytest.mark.parametrize("broken_setup", list(BREAKERS), indirect=True)
def test_bad_scan_fails_with_one_line_naming_file(tmp_path, broken_setup, capsys):
    root, tsv, df, paths, suffix = broken_setup
    out_dir = tmp_path / "out"
    argv = ["--candidates", str(tsv), "--root", str(root), "--subset", SUBSET, "--out", str(out_dir / "subset0.h5"),
            "--cache-dir", str(out_dir / "cache"), "--threads", "2", "--shape", "8", "12", "16"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("luna-crops: error: ")
    assert f"{BAD_UID}{suffix}" in err[0]
    leftovers = sorted(p.name for p in out_dir.glob("*")) if out_dir.exists() else []
    assert not [n for n in leftovers if n.endswith((".h5", ".tmp", ".tsv"))], leftovers


@pytest.mark.parametrize("broken_setup", ["truncated-raw", "vanished-scan", "truncated-zraw", "corrupt-zraw",
                                          "uchar-over-short", "non-orthonormal", "singular-direction"], indirect=True)
def test_bad_scan_skip_records_it_and_keeps_others(tmp_path, broken_setup, caplog):
    caplog.set_level("INFO", logger="luna.crops")
    root, tsv, df, paths, _ = broken_setup
    app, out = _run(tmp_path, tsv, root, extra=["--on-bad-scan", "skip", "--shape", "8", "12", "16",
                                                "--threads", "2"])
    skipped = pd.read_csv(app.skipped_path, sep="\t", dtype={"series_uid": str})
    bad = skipped[skipped["series_uid"] == BAD_UID]
    assert len(bad) == int((df["series_uid"] == BAD_UID).sum())  # all its rows, outside ones too
    assert bad["reason"].str.startswith("bad scan: ").all()
    assert bad["reason"].str.contains(BAD_UID, regex=False).all()
    assert app.result.bad_scans == [str(paths[BAD_UID])]
    good = df[df["series_uid"] != BAD_UID]
    _assert_matches_reference_subset(out, skipped, good, {u: p for u, p in paths.items() if u != BAD_UID})
    assert BAD_UID not in CropStore(out).geometries
    n_outside = int(skipped["reason"].str.startswith("outside scan").sum())
    assert n_outside == app.result.n_outside > 0
    n_nodules = int(df.loc[df["candidate_id"].isin(skipped["candidate_id"]), "is_nodule"].eq(1).sum())
    assert any(r.levelname == "WARNING" and r.getMessage().startswith(
        f"{len(skipped)} candidates skipped (outside scan: {n_outside}, bad scan: {len(bad)}; {n_nodules} of them "
        "nodules)") for r in caplog.records)
    # the bad scan is named in the log whether the header pre-pass or the voxel read found it, and not counted
    assert any(line.startswith("bad scan, its candidates are skipped: ") and BAD_UID in line
               for line in caplog.messages)
    n_scans = df["series_uid"].nunique()
    assert f"crops of {n_scans - 1} scans (0 scans from cache; 1 bad scan(s) skipped, listed in " in caplog.text


def _assert_matches_reference_subset(out: Path, skipped: pd.DataFrame, good: pd.DataFrame, paths: dict) -> None:
    arrays = read_arrays(out)
    k = 0
    for _, row in good.iterrows():
        inside, center, start, crop = _reference(paths[row.series_uid], (row.coord_x, row.coord_y, row.coord_z),
                                                 (8, 12, 16))
        if not inside:
            assert row.candidate_id in set(skipped["candidate_id"])
            continue
        assert arrays["candidate_id"][k] == row.candidate_id
        np.testing.assert_array_equal(arrays["crops"][k], crop)
        k += 1
    assert k == len(arrays["crops"])


def test_bad_candidates_table_names_file_and_line(tmp_path, capsys):
    tsv = tmp_path / "candidates.tsv"
    _write_candidates(tsv, [dict(candidate_id=0, series_uid="x", subset=SUBSET, coord_x=1.0, coord_y="abc",
                                 coord_z=2.0, is_nodule=0, diameter_mm=0.0)])
    argv = ["--candidates", str(tsv), "--root", str(tmp_path), "--subset", SUBSET, "--out", str(tmp_path / "o.h5")]
    assert CropApp(argv).main() == 2
    assert capsys.readouterr().err.strip() == f"luna-crops: error: {tsv}:2: coord_y = 'abc' is not a number"
    assert CropApp([*argv[:1], str(tmp_path / "nope.tsv"), *argv[2:]]).main() == 2
    assert "nope.tsv: no such candidates table" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- resume

_DONE_RE = re.compile(r"scan (\d+)/(\d+) done \((read|from cache)\) (\S+):")


def _done_lines(log: str) -> dict[str, str]:
    return {m.group(4): m.group(3) for m in _DONE_RE.finditer(log)}


def test_resume_cache_folder_is_never_one_that_holds_data_or_outputs(tmp_path, monkeypatch):
    """The cache folder is removed whole after the run: --cache-dir naming the data's subset folder deleted
    every scan; the output folder, the store just written; a folder of other files, those files."""
    root = tmp_path / "data"
    paths = _write_scans(root, {"5.1": ((10, 20, 20), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3))})
    tsv = tmp_path / "candidates.tsv"
    _write_candidates(tsv, [dict(candidate_id=1, series_uid="5.1", subset=SUBSET, coord_x=5.0, coord_y=5.0,
                                 coord_z=5.0, is_nodule=0, diameter_mm=0.0)])
    out = tmp_path / "out" / f"{SUBSET}.h5"
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    base = ["--candidates", str(tsv), "--root", str(root), "--subset", SUBSET, "--out", str(out),
            "--shape", "8", "12", "16"]
    for cache_dir, message in [
        (root / SUBSET, f"{root / SUBSET}: exists and is not a luna resume cache (no .luna-crop-cache or cache.db)"),
        (root.parent, f"{root.parent}: the resume cache folder would hold the data folder {root}"),
        (out.parent, f"{out.parent}: the resume cache folder would hold the output folder {out.parent}"),
        (notes, f"{notes}: exists and is not a luna resume cache (no .luna-crop-cache or cache.db)"),
    ]:
        with pytest.raises(OutputError) as info:
            CropApp([*base, "--cache-dir", str(cache_dir)]).run()
        assert str(info.value).startswith(message)
    assert paths["5.1"].is_file() and (notes / "notes.txt").read_text() == "keep me" and not out.exists()
    # an empty folder of the user's is used, and removed whole after success (its marker says it is a cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    CropApp([*base, "--cache-dir", str(empty)]).run()
    assert out.is_file() and not empty.exists()
    # ... but not removed when the run fails before caching any scan: it was there before
    empty.mkdir()
    monkeypatch.setattr(CropApp, "_crop_all", lambda *args: (_ for _ in ()).throw(OutputError("disk gone")))
    with pytest.raises(OutputError, match="disk gone"):
        CropApp([*base, "--cache-dir", str(empty)]).run()
    assert empty.is_dir() and not any(empty.iterdir())
    # ... nor when it fails after opening the cache, before any scan is in it: emptied of luna's files, kept
    monkeypatch.undo()
    monkeypatch.setattr(CropApp, "_check_cache_space", lambda *args: (_ for _ in ()).throw(OutputError("full")))
    with pytest.raises(OutputError, match="full"):
        CropApp([*base, "--cache-dir", str(empty)]).run()
    assert empty.is_dir() and not any(empty.iterdir())


def test_a_rerun_with_bad_input_keeps_the_previous_store(tmp_path):
    """A mistyped --root (or a bad scan header) in a rerun removed the good store of the run before: hours of
    crops on LUNA16. The previous outputs go only once the scans' headers are checked."""
    root = tmp_path / "data"
    _write_scans(root, {"6.1": ((10, 20, 20), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3))})
    tsv = tmp_path / "candidates.tsv"
    _write_candidates(tsv, [dict(candidate_id=1, series_uid="6.1", subset=SUBSET, coord_x=5.0, coord_y=5.0,
                                 coord_z=5.0, is_nodule=0, diameter_mm=0.0)])
    out = tmp_path / "out" / f"{SUBSET}.h5"
    argv = ["--candidates", str(tsv), "--subset", SUBSET, "--out", str(out), "--shape", "8", "12", "16"]
    CropApp([*argv, "--root", str(root)]).run()
    store, skipped = out.read_bytes(), (out.parent / f"{SUBSET}.skipped.tsv").read_bytes()
    with pytest.raises(CropError, match="6.1.mhd"):
        CropApp([*argv, "--root", str(tmp_path / "typo")]).run()
    assert out.read_bytes() == store and (out.parent / f"{SUBSET}.skipped.tsv").read_bytes() == skipped
    # --out naming a folder says so (was "cannot remove the previous output (is a directory)")
    with pytest.raises(OutputError) as info:
        CropApp([*argv[:-5], str(out.parent), "--shape", "8", "12", "16", "--root", str(root)]).run()
    assert str(info.value) == f"{out.parent}: is a folder; --out names a file"


def test_cache_key_holds_the_source_digest(monkeypatch):
    """A resume after a luna update cuts afresh: a store never mixes crops of two versions of the code."""
    import luna.crop_cache
    import luna.provenance

    ident, centers = ("/a.mhd", 10, 1, "/a.raw", 20, 2), np.zeros((2, 3))
    before = cache_key(ident, (32, 48, 48), (-1000, 1000), centers)
    assert luna.provenance.source_digest() in before
    monkeypatch.setattr(luna.crop_cache, "source_digest", lambda *a: "other code")
    assert cache_key(ident, (32, 48, 48), (-1000, 1000), centers) != before


def _crops_command(tmp_path: Path, tsv: Path, root: Path, threads: int) -> tuple[list[str], Path, Path]:
    """A luna-crops process for the kill and Ctrl-C tests: its argv, store and resume cache (8x12x16 crops)."""
    out, cache_dir = tmp_path / "out" / f"{SUBSET}.h5", tmp_path / "out" / "cache"
    argv = [sys.executable, "-m", "luna.crops", "--candidates", str(tsv), "--root", str(root), "--subset", SUBSET,
            "--out", str(out), "--cache-dir", str(cache_dir), "--threads", str(threads), "--shape", "8", "12", "16"]
    return argv, out, cache_dir


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_between_scans_stops_with_one_line_and_keeps_the_cache(tmp_path, signum, code, said):
    """SIGINT to the process group mid-run: exit 130, "interrupted", no store, the finished scans cached. Raised
    wherever the main thread was, the KeyboardInterrupt was often lost in a thread pool's weakref callback and the
    run wrote the whole store with exit 0; now Ctrl-C is checked between scans (luna.app.deferred_sigint). SIGTERM
    (Snakemake stopping its jobs, SLURM's time limit) the same, exit 143: it ended the process on the spot, leaving
    the temp store and the cache's lock file behind."""
    root = tmp_path / "data"
    scans = {f"4.{k}": ((20, 30, 40), (float(k), 0.0, 0.0), (0.7, 0.7, 2.5), np.eye(3)) for k in range(6)}
    paths = _write_scans(root, scans)
    rows = [dict(candidate_id=i, series_uid=uid, subset=SUBSET, coord_x=float(k), coord_y=5.0, coord_z=20.0,
                 is_nodule=0, diameter_mm=0.0) for i, (k, uid) in enumerate(zip(range(6), paths))]
    tsv = tmp_path / "candidates.tsv"
    _write_candidates(tsv, rows)
    argv, out, cache_dir = _crops_command(tmp_path, tsv, root, threads=2)
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=hook_env(LUNA_TEST_SLOW_SCAN_S="0.5"), preexec_fn=default_sigint)
        deadline = time.monotonic() + 120
        while len(_done_lines(log.read_text())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signum)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == code, text
    assert text.rstrip().endswith(f"luna-crops: {said}") and "Exception ignored" not in text
    assert 2 <= len(_done_lines(text)) < 6
    assert not out.exists() and not list(out.parent.glob(".*.tmp")) and not list(out.parent.glob(".*.lock"))
    assert "kept the resume cache" in text and cache_dir.is_dir()


def test_killed_job_resumes_from_cache(tmp_path):
    root = tmp_path / "data"
    scans = {f"3.{k}": ((20, 30, 40), (float(k), 0.0, 0.0), (0.7, 0.7, 2.5), np.eye(3)) for k in range(5)}
    paths = _write_scans(root, scans)
    rng = np.random.default_rng(5)
    rows = []
    for uid in paths:
        for irc in rng.uniform(0, 19, size=(4, 3)):
            x, y, z = irc_to_xyz(irc, Geometry(*scans[uid][1:]))
            rows.append(dict(series_uid=uid, subset=SUBSET, coord_x=x, coord_y=y, coord_z=z, is_nodule=0,
                             diameter_mm=0.0))
    for i, row in enumerate(rows):
        row["candidate_id"] = i
    tsv = tmp_path / "candidates.tsv"
    _write_candidates(tsv, rows)
    argv, out, cache_dir = _crops_command(tmp_path, tsv, root, threads=1)

    log1 = tmp_path / "run1.log"
    env = hook_env(LUNA_TEST_SLOW_SCAN_S="0.8")
    with open(log1, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while len(_done_lines(log1.read_text())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done1 = _done_lines(log1.read_text())
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= len(done1) < 5, log1.read_text()
    assert set(done1.values()) == {"read"}
    assert not out.exists()
    assert cache_dir.is_dir()

    rerun = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    done2 = _done_lines(rerun.stderr)
    assert set(done2) == set(paths)
    from_cache = {uid for uid, how in done2.items() if how == "from cache"}
    computed = {uid for uid, how in done2.items() if how == "read"}
    assert set(done1) <= from_cache  # everything finished before the kill came from the cache ...
    assert computed == set(paths) - from_cache and computed  # ... and only the unfinished scans were read
    assert f"{len(from_cache)} of 5 scans from cache, {len(computed)} read" in rerun.stderr
    # the ETA rests on the scans read: unknown while only cached ones are done (was 0:00:00 with three to read)
    done_lines = [line for line in rerun.stderr.splitlines() if _DONE_RE.search(line)]
    first_read = next(i for i, line in enumerate(done_lines) if "(read)" in line)
    assert first_read >= 2 and all(line.endswith("ETA unknown") for line in done_lines[:first_read])
    assert all(re.search(r"ETA \d+:\d\d:\d\d$", line) for line in done_lines[first_read:])

    reference = tmp_path / "ref" / f"{SUBSET}.h5"
    CropApp(["--candidates", str(tsv), "--root", str(root), "--subset", SUBSET, "--out", str(reference),
             "--cache-dir", str(tmp_path / "ref" / "cache"), "--shape", "8", "12", "16"]).run()
    got, want = read_arrays(out), read_arrays(reference)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not cache_dir.exists()
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize("held", ["store", "cache"])
def test_a_second_run_on_a_store_or_cache_in_use_is_refused(tmp_path, synthetic_scans, held, lock_held_elsewhere):
    """Two luna-crops on one --out: the second deleted the first's live temp store, and the first then removed
    the second's skipped table; on one cache, the first to finish removed it under the other, leaving an orphaned
    half that refused every later run. Each is locked now; the lock files go when the run ends."""
    root, tsv, _, _ = synthetic_scans
    app, out = _run(tmp_path, tsv, root)  # a finished store, then a run in progress holding the lock
    before = out.read_bytes()
    cache = tmp_path / "out" / "cache"
    target = out if held == "store" else cache
    lock = target.parent / f".{target.name}.lock"
    with lock_held_elsewhere(lock):
        with pytest.raises(OutputError) as info:
            _run(tmp_path, tsv, root)
        what = "crop store" if held == "store" else "resume cache"
        assert str(info.value) == (f"{target}: the {what} is in use by another luna-crops run ({lock} is locked); "
                                   "wait for it, or give this run its own --out and --cache-dir")
        assert out.read_bytes() == before  # not removed as a previous output
    _run(tmp_path, tsv, root)  # released: the next run goes ahead and leaves no lock file
    assert not list(out.parent.glob(".*.lock")) and not cache.exists()


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, synthetic_scans):
    """A folder where the lock file goes (or another user's lock file in a shared folder): a traceback and exit 1
    from open(); now the path and the reason in one line, exit 2."""
    root, tsv, _, _ = synthetic_scans
    lock = tmp_path / "out" / f".{SUBSET}.h5.lock"
    lock.mkdir(parents=True)
    with pytest.raises(OutputError) as info:
        _run(tmp_path, tsv, root)
    assert str(info.value) == f"{lock}: cannot open the lock file (is a directory)"
