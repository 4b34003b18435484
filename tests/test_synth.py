"""luna.synth: LUNA16 formats, determinism, geometry (flipped scans), nodule density, candidate rules."""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from luna.ct import find_scans, read_geometry, read_scan
from luna.geometry import is_inside, xyz_to_irc
from luna.synth import (
    ANNOTATIONS_HEADER,
    CANDIDATES_HEADER,
    NEGATIVE_KINDS,
    SynthApp,
    SynthConfig,
    SynthError,
    _Anatomy,
    _blob_fields,
    _box,
    _make_blob,
    format_annotation_mm,
    format_candidate_mm,
    plan_dataset,
    sample_diameters_mm,
    synthesize,
    synthesize_scan,
    truncated_lognormal_cdf,
)

FIXTURES = Path(__file__).parent / "fixtures"

# 2 subsets x 2 scans of 96x96 in-plane, 40 slices; enough nodules that a flipped scan holds some
TINY = SynthConfig(
    n_subsets=2, scans_per_subset=2, seed=7, size_xy_min=96, size_xy_max=96, extent_z_mm_min=100.0,
    extent_z_mm_max=100.0, slice_thicknesses_mm=(2.5,), spacing_xy_min_mm=0.9, spacing_xy_max_mm=0.98,
    nodules_per_scan=2.5, negatives_per_positive=10.0, flip_fraction=0.5, fov_fraction=0.5, contrast_fraction=0.5,
    excluded_per_scan=2.0,
)


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = synthesize(root, TINY, jobs=1)
    return root, summary


@pytest.fixture(scope="module")
def scans_in_memory() -> dict:
    return {p.series_uid: synthesize_scan(p, TINY) for p in plan_dataset(TINY)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_byte_identical_also_in_parallel(dataset, tmp_path):
    root, _ = dataset
    other = tmp_path / "again"
    synthesize(other, TINY, jobs=2)
    first, second = _files(root), _files(other)
    assert sorted(first) == sorted(second)
    assert len([f for f in first if f.endswith(".raw")]) == TINY.n_scans
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_different_data(tmp_path):
    a = plan_dataset(TINY)
    b = plan_dataset(SynthConfig(**{**TINY.to_dict(), "seed": 8}))
    assert {p.series_uid for p in a}.isdisjoint({p.series_uid for p in b})


def test_csv_headers_and_number_formats_are_luna16s(dataset):
    root, summary = dataset
    for name, header in (("candidates.csv", CANDIDATES_HEADER), ("annotations.csv", ANNOTATIONS_HEADER),
                         ("annotations_excluded.csv", ANNOTATIONS_HEADER)):
        raw = (root / name).read_bytes()
        assert raw.startswith(",".join(header).encode() + b"\r\n"), name
        assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n"), name  # CRLF like LUNA16
    official = (FIXTURES / "luna16-csv" / "annotations.csv").read_bytes()
    assert official.startswith(",".join(ANNOTATIONS_HEADER).encode() + b"\r\n")

    uids = [r[0] for r in _read_csv(root / "seriesuids.csv")]
    assert uids == sorted(uids) and len(uids) == TINY.n_scans  # no header, one UID a line
    uid_re = r"1\.3\.6\.1\.4\.1\.14519\.5\.2\.1\.6279\.6001\.[1-9][0-9]{29}"
    for uid in uids:
        assert __import__("re").fullmatch(uid_re, uid) and len(uid) == 64

    cands = _read_csv(root / "candidates.csv")[1:]
    assert len(cands) == summary["n_candidates"] > 0
    for row in cands:
        assert len(row) == 5 and row[0] in uids and row[4] in ("0", "1")
        for value in row[1:4]:
            assert format_candidate_mm(float(value)) == value  # two decimals at most, like candidates.csv
    for name in ("annotations.csv", "annotations_excluded.csv"):
        for row in _read_csv(root / name)[1:]:
            assert len(row) == 5 and row[0] in uids
            for value in row[1:]:
                assert format_annotation_mm(float(value)) == value
    excluded = _read_csv(root / "annotations_excluded.csv")[1:]
    assert any(r[4] == "-1" for r in excluded) and any(0 < float(r[4]) < 3 for r in excluded)

    # grouped by scan (sorted UIDs, like LUNA16), shuffled inside a scan: not positives first
    cand_uids = [r[0] for r in cands]
    assert cand_uids == sorted(cand_uids)
    assert any(cands[i][4] == "0" and cands[i + 1][4] == "1" and cands[i][0] == cands[i + 1][0]
               for i in range(len(cands) - 1))


def test_formatters_reproduce_official_tables():
    rows = _read_csv(FIXTURES / "luna16-csv" / "annotations.csv")[1:]
    assert len(rows) == 1186
    for row in rows:
        for value in row[1:]:
            assert format_annotation_mm(float(value)) == value
    assert format_annotation_mm(-1.0) == "-1"
    assert format_candidate_mm(-288.7) == "-288.7"
    assert format_candidate_mm(-56.084) == "-56.08"
    assert format_candidate_mm(-40.0) == "-40"
    assert format_candidate_mm(-0.001) == "0"


def test_every_scan_opens_with_simpleitk(dataset):
    root, summary = dataset
    scans = find_scans(root)
    assert len(scans) == TINY.n_scans == summary["n_scans"]
    assert {s.subset for s in scans.values()} == {"subset0", "subset1"}
    for scan in scans.values():
        image = sitk.ReadImage(str(scan.path))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetSize()[0] == image.GetSize()[1] == 96 and image.GetSize()[2] == 40
        header = scan.path.read_text()
        assert "CompressedData = False" in header and f"ElementDataFile = {scan.series_uid}.raw" in header
        assert scan.path.with_suffix(".raw").stat().st_size == 96 * 96 * 40 * 2
        assert 0.46 <= image.GetSpacing()[0] <= 0.98 and image.GetSpacing()[2] == 2.5
    assert not list(root.rglob(".tmp*")) and not list(root.rglob("*.tmp-*"))


def test_annotation_centres_are_nodule_dense(dataset, scans_in_memory):
    root, summary = dataset
    scans = find_scans(root)
    rows = _read_csv(root / "annotations.csv")[1:]
    assert len(rows) == summary["n_nodules"] >= 8
    kinds = {}
    for uid, scan in scans_in_memory.items():
        for nod in scan.nodules:
            kinds[(uid, format_annotation_mm(nod["center_xyz"][0]))] = nod["kind"]
    checked = 0
    for uid, x, y, z, d in rows:
        volume, geometry = read_scan(scans[uid].path)
        irc = xyz_to_irc(np.array([float(x), float(y), float(z)]), geometry)
        assert is_inside(irc, volume.shape)
        kind = kinds[(uid, x)]
        threshold = -750 if kind == "ground_glass" else -400
        hu = int(volume[tuple(irc)])
        assert hu > threshold, (uid, kind, hu)
        assert 3.0 <= float(d) <= 32.0
        checked += 1
    assert checked == len(rows)


def test_nodules_lie_inside_lungs_and_scan(scans_in_memory):
    n = 0
    for scan in scans_in_memory.values():
        for nod in scan.nodules:
            irc = xyz_to_irc(nod["center_xyz"], scan.geometry)
            assert scan.lung_mask[tuple(irc)]
            # the whole nodule (its nominal radius plus 2 voxels) inside the scan
            half = np.ceil(nod["diameter_mm"] / 2 / scan.geometry.spacing_xyz[::-1]).astype(int) + 2
            assert np.all(irc - half >= 0) and np.all(irc + half < scan.volume.shape)
            n += 1
    assert n >= 8


def test_flipped_scan_world_to_voxel_matches_simpleitk(dataset, scans_in_memory):
    root, _ = dataset
    scans = find_scans(root)
    ann = _read_csv(root / "annotations.csv")[1:]
    cands = _read_csv(root / "candidates.csv")[1:]
    flipped = [uid for uid, s in scans.items() if read_geometry(s.path)[0].direction[0, 0] < 0]
    assert flipped, "the data set must hold an x/y-flipped scan"
    nodules_checked = 0
    for uid in flipped:
        geometry, shape = read_geometry(scans[uid].path)
        assert np.allclose(geometry.direction, np.diag([-1.0, -1.0, 1.0]))
        image = sitk.ReadImage(str(scans[uid].path))
        volume = sitk.GetArrayFromImage(image)
        points = [r for r in cands if r[0] == uid] + [r for r in ann if r[0] == uid]
        for row in points:
            xyz = np.array([float(v) for v in row[1:4]])
            ref_xyz_index = image.TransformPhysicalPointToIndex(tuple(xyz))
            assert tuple(xyz_to_irc(xyz, geometry)) == tuple(ref_xyz_index[::-1])
        for row in (r for r in ann if r[0] == uid):
            index = image.TransformPhysicalPointToIndex(tuple(float(v) for v in row[1:4]))
            assert volume[index[2], index[1], index[0]] > -750
            nodules_checked += 1
        # the stored image is the canonical anatomy rotated 180 degrees: spine (bone) in the upper half
        bone = volume > 300
        rows_with_bone = np.nonzero(bone.any(axis=(0, 2)))[0]
        spine_rows = np.nonzero(bone[:, :, shape[2] // 2 - 2: shape[2] // 2 + 3].any(axis=(0, 2)))[0]
        assert rows_with_bone.size and spine_rows.mean() < shape[1] / 2
    assert nodules_checked > 0


def test_every_candidate_inside_its_scan(dataset):
    root, _ = dataset
    scans = find_scans(root)
    geoms = {uid: read_geometry(s.path) for uid, s in scans.items()}
    for row in _read_csv(root / "candidates.csv")[1:]:
        geometry, shape = geoms[row[0]]
        assert is_inside(xyz_to_irc(np.array([float(v) for v in row[1:4]]), geometry), shape), row


def test_hu_ranges(scans_in_memory):
    seen_fov = seen_plain = 0
    for scan in scans_in_memory.values():
        v = scan.volume
        lung = v[scan.lung_mask]
        assert -900 <= np.median(lung) <= -840  # lungs at -870 +- 40
        corners = np.concatenate([v[:, :4, :4].ravel(), v[:, -4:, -4:].ravel()])
        if scan.plan.circular_fov:
            assert np.all(corners == -2048)
            seen_fov += 1
            # inside the circle, outside the body (diagonals at 0.45 n from the centre) it is air
            n = v.shape[1]
            lo, hi = int(n / 2 - 0.318 * n), int(n / 2 + 0.318 * n)
            air = np.concatenate([v[:, r - 1:r + 2, c - 1:c + 2].ravel() for r in (lo, hi) for c in (lo, hi)])
            assert abs(np.median(air) + 1000) < 10
        else:
            assert abs(np.median(corners) + 1000) < 5 and np.all(corners > -1100)
            assert 12 < corners.std() < 30  # Gaussian noise ~20 HU
            seen_plain += 1
        assert (v > 300).sum() > 100  # ribs and spine
        assert v.max() <= 1200
        centre = v[:, v.shape[1] // 2 - 2: v.shape[1] // 2 + 3, v.shape[2] // 2 - 2: v.shape[2] // 2 + 3]
        assert np.median(centre) > -200  # mediastinum: soft tissue, heart or trachea wall
    assert seen_fov and seen_plain


def test_positive_candidates_match_their_nodule_by_diameter(dataset):
    root, _ = dataset
    ann = [(r[0], np.array([float(v) for v in r[1:4]]), float(r[4])) for r in _read_csv(root / "annotations.csv")[1:]]
    positives = negatives_matched = 0
    for row in _read_csv(root / "candidates.csv")[1:]:
        xyz = np.array([float(v) for v in row[1:4]])
        match = next((a for a in ann if a[0] == row[0] and np.all(np.abs(xyz - a[1]) <= a[2] / 4)), None)
        if row[4] == "1":
            positives += 1
            assert match is not None
            # the matched annotation is the nodule it was placed on (within d/8 + rounding)
            assert np.all(np.abs(xyz - match[1]) <= match[2] / 8 + 0.006)
        elif match is not None:
            negatives_matched += 1
    assert positives >= len(ann)
    assert negatives_matched == 0


def test_candidate_mix_and_ratio(dataset, scans_in_memory):
    _, summary = dataset
    kinds = summary["candidate_kinds"]
    for kind in NEGATIVE_KINDS:
        assert kinds.get(kind, 0) > 0, kind
    assert kinds["positive"] == summary["n_positive_candidates"]
    assert 5 <= summary["negatives_per_positive"] <= 20  # configured 10
    assert summary["n_flipped"] == 2 and summary["n_circular_fov"] == 2 and summary["n_contrast"] == 2


def test_diameter_sampler_is_truncated_lognormal():
    rng = np.random.default_rng(0)
    d = np.sort(sample_diameters_mm(rng, 20000, 1.99, 0.47, 3.0, 32.0))
    assert d.min() >= 3.0 and d.max() <= 32.0
    ecdf = np.arange(1, d.size + 1) / d.size
    assert np.max(np.abs(ecdf - truncated_lognormal_cdf(d, 1.99, 0.47, 3.0, 32.0))) < 0.015  # KS
    assert abs(np.median(np.log(d)) - 2.0) < 0.03
    # a plain (untruncated) log-normal with other parameters is rejected by the same check
    other = np.sort(np.exp(np.random.default_rng(1).normal(2.3, 0.47, 20000)).clip(3, 32))
    assert np.max(np.abs(ecdf - truncated_lognormal_cdf(other, 1.99, 0.47, 3.0, 32.0))) > 0.1


def test_plan_counts_are_exact():
    cfg = SynthConfig()
    plans = plan_dataset(cfg)
    assert len(plans) == 60 and [p.subset for p in plans[::20]] == ["subset0", "subset1", "subset2"]
    assert sum(p.n_nodules for p in plans) == 84 >= 80
    assert 0 < sum(p.n_nodules == 0 for p in plans) < 30
    assert sum(p.flipped for p in plans) == 15
    one = plan_dataset(SynthConfig(n_subsets=1, scans_per_subset=2, flip_fraction=0.01))
    assert sum(p.flipped for p in one) == 1  # at least one flipped scan whenever flip_fraction > 0


@pytest.mark.parametrize("kind", ["solid", "part_solid", "ground_glass", "calcified"])
def test_smallest_nodule_centre_voxel_is_dense(kind):
    """The guarantee behind the annotation check: a 3 mm nodule within 0.2 voxel of a voxel centre fills it."""
    rng = np.random.default_rng(3)
    a = _Anatomy.__new__(_Anatomy)
    a.shape, a.sz, a.sp, a.rc, a.cc = (20, 40, 40), 2.5, 0.98, 19.5, 19.5
    threshold = -750 + 3 * 23 if kind == "ground_glass" else -400 + 3 * 23  # 3 sigma of the largest noise
    for _ in range(50):
        offset_irc = rng.uniform(-0.2, 0.2, 3)
        centre = np.array([(20 - a.cc + offset_irc[2]) * a.sp, (20 - a.rc + offset_irc[1]) * a.sp,
                           (10 + offset_irc[0]) * a.sz])
        blob = _make_blob(rng, centre, 3.0, kind, "")
        box = _box(a, blob.centre_uvw, blob.reach_mm, 0, 20)
        occ, hu = _blob_fields(a, blob, box, 0)
        at = (10 - box[0].start, 20 - box[1].start, 20 - box[2].start)
        assert occ[at] == pytest.approx(1.0) and hu[at] > threshold


@pytest.mark.parametrize("box_step", [1, 2, 5])
def test_batched_vessel_occupancy_equals_segment_by_segment(monkeypatch, box_step):
    """_vessel_occupancy (boxes grown to shared shapes, batched) gives exactly the maximum of _capsule_occupancy
    over each segment's own box, clipped to the region: the scans stay byte-identical to the per-segment code."""
    from luna.synth import rendering as r
    from luna.synth.anatomy import _grow_vessels, _sample_anatomy

    monkeypatch.setattr(r, "_BOX_STEP", box_step)
    config = SynthConfig(seed=16)
    plan = plan_dataset(config)[0]
    rng, _ = r._scan_rngs(config, plan.index)
    a = _sample_anatomy(rng, plan, config)
    segments = _grow_vessels(rng, a).segments
    z, n, _ = a.shape
    lo, hi = r._segment_boxes(a, segments)
    for region_lo, region_hi in [((0, 0, 0), (z, n, n)), ((z // 3, n // 5, n // 4), (z // 3 + 7, n - 9, n // 2))]:
        region_lo, region_hi = np.array(region_lo), np.array(region_hi)
        k0, k1 = region_lo[0], region_hi[0]
        expected = np.zeros(tuple(region_hi - region_lo), np.float32)
        for seg in segments:
            reach = np.linalg.norm(seg[3:6] - seg[:3]) / 2 + max(seg[6], seg[7]) + r._EDGE_MM
            box = _box(a, (seg[:3] + seg[3:6]) / 2, reach, k0, k1)
            if box is None:
                continue
            rows = slice(max(box[1].start, region_lo[1]), min(box[1].stop, region_hi[1]))
            cols = slice(max(box[2].start, region_lo[2]), min(box[2].stop, region_hi[2]))
            if rows.stop <= rows.start or cols.stop <= cols.start:
                continue
            local = (box[0], slice(rows.start - region_lo[1], rows.stop - region_lo[1]),
                     slice(cols.start - region_lo[2], cols.stop - region_lo[2]))
            np.maximum(expected[local], r._capsule_occupancy(a, seg, (box[0], rows, cols), k0), out=expected[local])
        got = r._vessel_occupancy(a, segments, lo, hi, region_lo, region_hi)
        assert (expected > 0).sum() > 500
        np.testing.assert_array_equal(got, expected)


def test_centreline_samples_equal_segment_by_segment():
    """The vessel samples (negative candidates' pool), built per group of equal counts, are the per-segment
    linspace points exactly, in segment order."""
    from luna.synth.anatomy import _centreline_samples

    rng = np.random.default_rng(5)
    segments = rng.uniform(-50, 50, (40, 8))
    counts = rng.integers(2, 9, 40)
    expected = []
    for seg, n in zip(segments, counts):
        t = np.linspace(0, 1, n)[:, None]
        p0, p1, r0, r1 = seg[:3], seg[3:6], seg[6], seg[7]
        expected.append(np.hstack([p0 + t * (p1 - p0), r0 + t * (r1 - r0)]))
    np.testing.assert_array_equal(_centreline_samples(segments, counts), np.vstack(expected))


def test_config_errors_name_the_key():
    with pytest.raises(SynthError, match=r"synthetic\.flip_fraction"):
        SynthConfig(flip_fraction=1.5)
    with pytest.raises(SynthError, match=r"synthetic\.size_xy_min"):
        SynthConfig(size_xy_min=300, size_xy_max=200)
    with pytest.raises(SynthError, match=r"synthetic\.size_xy_min .*too small for a chest"):
        SynthConfig(size_xy_min=64, size_xy_max=64)  # 64 x 0.46 mm = 29 mm field of view
    with pytest.raises(SynthError, match=r"synthetic\.negative_mix"):
        SynthConfig(negative_mix=(1.0, 2.0))
    with pytest.raises(SynthError, match=r"synthetic\.negative_mix .*weights from 0 to 1e\+06"):
        SynthConfig(negative_mix=(1.0, 1.0, 1.0, 1.0, math.inf))  # was numpy's "pvals < 0, ..." after writing
    # values that passed and then overflowed, ran out of memory or hung, after the output folder existed
    for knobs, message in (
        ({"negatives_per_positive": 1e308}, "negatives_per_positive = 1e+308: must be a number from 0 to 2000"),
        ({"excluded_per_scan": 1e5}, "excluded_per_scan = 100000.0: must be a number from 0 to 200"),
        ({"noise_hu": 1e308}, "noise_hu = 1e+308: must be a number from 0 to 500"),
        ({"negative_mix": (1e308, 1e308, 1, 1, 1)}, "negative_mix = (1e+308, 1e+308, 1.0, 1.0, 1.0): need 5 weights"),
        ({"n_subsets": 10**20}, "n_subsets = 100000000000000000000: must be from 1 to 100"),
        ({"scans_per_subset": 10_001}, "scans_per_subset = 10001: must be from 1 to 10,000"),
        ({"nodules_per_scan": 0.0}, "nodules_per_scan = 0.0: must be a number > 0 and <= 20"),
        ({"size_xy_min": 2048, "size_xy_max": 2048, "extent_z_mm_min": 1000, "extent_z_mm_max": 1000,
          "slice_thicknesses_mm": (0.1,)},
         "size_xy_max = 2048: a scan can be 2048 x 2048 x 10000 = 4.19e+10 voxels"),
        ({"full_size": True, "slice_thicknesses_mm": (0.1,)},
         "slice_thicknesses_mm = (0.1,): a scan can be 512 x 512 x 3800 = 9.96e+08 voxels"),
        # full_size has 512 voxels in-plane: 512 x 0.1 mm = 51 mm is no chest either
        ({"full_size": True, "spacing_xy_min_mm": 0.1, "spacing_xy_max_mm": 0.1},
         "spacing_xy_min_mm = 0.1: with full_size (512 voxels) and spacing_xy_min_mm = 0.1 the field of view can be 51 mm"),
    ):
        with pytest.raises(SynthError) as info:
            SynthConfig(**knobs)
        assert str(info.value).startswith(f"synthetic.{message}"), str(info.value)
    assert SynthConfig(full_size=True, slice_thicknesses_mm=(0.5,)).size_ranges()[0] == 512  # 760 slices: fine
    # diameters no draw can reach (sample_diameters_mm redrew forever: the synthesize job hung)
    with pytest.raises(SynthError, match=r"synthetic\.diameter_log_mu = 10.0: .* probability 3.1e-44, need >= 0.001"):
        SynthConfig(diameter_log_mu=10.0)
    with pytest.raises(SynthError, match=r"synthetic\.diameter_log_mu = nan: must be a finite number"):
        SynthConfig(diameter_log_mu=math.nan)
    with pytest.raises(SynthError, match=r"synthetic\.diameter_log_sigma = inf"):
        SynthConfig(diameter_log_sigma=math.inf)
    assert SynthConfig(diameter_log_mu=0.0).diameter_log_mu == 0.0  # 20% of draws above 3 mm: fine
    with pytest.raises(SynthError, match=r"synthetic\.colour"):
        SynthConfig.from_dict({"colour": 1})
    assert SynthConfig.from_dict(SynthConfig().to_dict()) == SynthConfig()
    with pytest.raises(SynthError, match=r"synthetic\.noise_hu .*must be a number"):
        SynthConfig.from_dict({"noise_hu": "20"})
    from_yaml = SynthConfig.from_dict({"negatives_per_positive": 50, "slice_thicknesses_mm": [1, 2.5]})
    assert isinstance(from_yaml.negatives_per_positive, float) and from_yaml.slice_thicknesses_mm == (1.0, 2.5)
    full = SynthConfig(full_size=True)
    assert full.size_ranges()[:2] == (512, 512)


def test_app_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as exc:
        SynthApp(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in SynthConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--out" in text and "--jobs" in text and "--full-size" in text


def test_app_options_round_trip_the_config():
    cfg = SynthConfig(n_subsets=4, seed=3, full_size=True, noise_hu=17.5, slice_thicknesses_mm=(1.25,),
                      negative_mix=(1, 0, 0, 0, 1), uid_prefix="1.2.826.0.1.3680043.8.498.")
    assert SynthApp(["--out", "x", *cfg.to_argv()]).config() == cfg
    assert SynthApp(["--out", "x"]).config() == SynthConfig()


def test_an_output_folder_under_a_file_is_one_line_like_every_stage(tmp_path, capsys):
    """luna-synth printed the OS error ("[Errno 20] Not a directory: 'blocker/x'"), every other stage "<folder>:
    cannot write to the output folder (<reason>)"."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    assert SynthApp(["--out", str(blocker / "x"), "--n-subsets", "1", "--scans-per-subset", "1"]).main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"luna-synth: error: {blocker / 'x'}: cannot write to the output folder (a file is in the way: not a folder)")
    assert blocker.read_text() == "a file where a folder should be\n"


def _console(argv: list[str]) -> int:
    """luna-synth's exit status, as the console script gives it (a bad value is found in the constructor)."""
    with pytest.raises(SystemExit) as info:
        SynthApp.console(argv)
    return info.value.code


def test_app_bad_value_and_foreign_folder(tmp_path, capsys):
    assert _console(["--out", str(tmp_path / "x"), "--flip-fraction", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["luna-synth: error: --flip-fraction = 2.0: must be a fraction in [0, 1]"]  # its option, not the key
    assert _console(["--out", str(tmp_path / "x"), "--size-xy-min", "300", "--size-xy-max", "200"]) == 2
    assert capsys.readouterr().err.strip() == ("luna-synth: error: --size-xy-min = (300, 200): --size-xy-min is "
                                               "above --size-xy-max; need 32 <= --size-xy-min <= --size-xy-max <= 2048")
    # the option out of range is the one named (an infinite maximum named the minimum)
    assert _console(["--out", str(tmp_path / "x"), "--spacing-xy-max-mm", "inf"]) == 2
    assert capsys.readouterr().err.strip() == ("luna-synth: error: --spacing-xy-max-mm = inf: need 0.1 <= "
                                               "--spacing-xy-min-mm <= --spacing-xy-max-mm <= 5")
    # an empty --out wrote the data set into the current folder; --jobs 0 named no option; --jobs 200 forked 200
    # workers for 2 scans
    limit = 4 * (os.cpu_count() or 1)
    for argv, message in ((["--out", ""], "--out: empty path; name the data folder to write"),
                          (["--out", str(tmp_path / "y"), "--jobs", "0"],
                           f"--jobs 0: must be from 1 to {limit} (4 per CPU of this machine)"),
                          (["--out", str(tmp_path / "y"), "--jobs", str(limit + 1)],
                           f"--jobs {limit + 1}: must be from 1 to {limit} (4 per CPU of this machine)")):
        assert _console(argv) == 2
        assert capsys.readouterr().err.strip() == f"luna-synth: error: {message}"
    assert not (tmp_path / "y").exists() and not (tmp_path / "x").exists()
    foreign = tmp_path / "luna16"
    (foreign / "subset0").mkdir(parents=True)
    (foreign / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    assert SynthApp(["--out", str(foreign), "--n-subsets", "1", "--scans-per-subset", "1"]).main() == 2
    assert "not written by luna.synth" in capsys.readouterr().err
    assert (foreign / "candidates.csv").exists()  # untouched
    # any folder with files of its own: a project, a scan folder (only subset* and *.csv were looked for)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("mine\n")
    assert SynthApp(["--out", str(project), "--n-subsets", "1", "--scans-per-subset", "1"]).main() == 2
    assert capsys.readouterr().err.strip() == (
        f"luna-synth: error: {project}: folder holds README.md and 1 more but was not written by luna.synth (no "
        ".luna-synth.json); refusing to write into it: give a new or empty folder")
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "src"]


def test_a_bad_value_is_one_line_on_the_console(tmp_path):
    """The start-up log line (all options, ~1,000 characters) came before the error: two lines for one mistake."""
    proc = subprocess.run([sys.executable, "-m", "luna.synth", "--out", str(tmp_path / "x"), "--flip-fraction", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["luna-synth: error: --flip-fraction = 2.0: must be a fraction in [0, 1]"]
    assert not (tmp_path / "x").exists()


def test_app_writes_and_rerun_drops_stale_scans(tmp_path):
    root = tmp_path / "data"
    small = ["--out", str(root), "--n-subsets", "1", "--size-xy-min", "64", "--size-xy-max", "64",
             "--spacing-xy-min-mm", "0.95",
             "--extent-z-mm-min", "40", "--extent-z-mm-max", "40", "--slice-thicknesses-mm", "2.5",
             "--negatives-per-positive", "5"]
    app = SynthApp(small + ["--scans-per-subset", "2", "--seed", "1"])
    assert app.main() == 0 and app.summary["n_scans"] == 2
    assert len(list(root.glob("subset0/*.mhd"))) == 2
    (root / "subset0" / ".tmp-1.2.3-999").mkdir()  # the temp folder of a scan write that was killed
    (root / "subset0" / ".tmp-1.2.3-999" / "1.2.3.raw").write_bytes(b"half")
    app = SynthApp(small + ["--scans-per-subset", "1", "--seed", "2"])
    assert app.main() == 0
    assert not list((root / "subset0").glob(".tmp-*"))
    mhds = list(root.glob("subset0/*.mhd"))
    uids = [r[0] for r in _read_csv(root / "seriesuids.csv")]
    assert [p.stem for p in mhds] == uids and len(list(root.glob("subset0/*.raw"))) == 1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of luna-synth --jobs 2 takes its worker processes with it (they went on writing scans from the
    killed run's config into the folder a rerun was filling, after the rerun had finished)."""
    import signal
    import time

    cmd = [sys.executable, "-m", "luna.synth", "--out", str(tmp_path / "d"), "--jobs", "2", "--n-subsets", "2",
           "--scans-per-subset", "3", "--size-xy-min", "256", "--size-xy-max", "256", "--extent-z-mm-min", "150",
           "--extent-z-mm-max", "150", "--negatives-per-positive", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
        return [int(pid) for pid in text.split()]

    deadline = time.monotonic() + 60
    while not children() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = children()
    assert workers and proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"  # zombie: dead
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.monotonic() + 5
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in workers)


@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("signame, code, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_with_jobs_cancels_the_queued_scans(tmp_path, signame, code, said, twice):
    """Ctrl-C (SIGINT to the process group, as a terminal sends) of luna-synth --jobs 2: one line, exit 130, and
    the queued scans are cancelled (the pool's exit ran every queued scan first: 38 of 40 written). SIGTERM to the
    group (Snakemake stopping its jobs) the same, exit 143 (it ended the process on the spot). ``twice``: the
    signal to the app, then to its group, as `timeout -s INT` sends it (or a user pressing Ctrl-C twice): one line
    too. (By hand, `timeout -s INT 2 luna-synth --jobs 2` of default-size scans hung in 3-4 of 10 tries: a second
    signal broke into the cleanup, printed tracebacks and left the app waiting on its pool; a race this test's
    timing does not reliably hit.)"""
    import signal
    import time

    from hooks import default_sigint

    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "luna.synth", "--out", str(out), "--jobs", "2", "--n-subsets", "2",
           "--scans-per-subset", "20", "--size-xy-min", "132", "--size-xy-max", "140", "--extent-z-mm-min", "60",
           "--extent-z-mm-max", "80", "--negatives-per-positive", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while len(list(out.glob("subset*/*.mhd"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    if twice:
        os.kill(proc.pid, getattr(signal, signame))
    os.killpg(proc.pid, getattr(signal, signame))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert output.rstrip().endswith(f"luna-synth: {said}")
    assert "Traceback" not in output and "Exception ignored" not in output, output
    written = len(list(out.glob("subset*/*.mhd")))
    assert 2 <= written <= 12, written  # the scans done, and those running at the signal (2 workers, 1 queued)
    assert not (out / "candidates.csv").exists()  # the set is not marked complete


def test_excluded_findings_without_room_are_counted_and_warned(tmp_path, caplog):
    """More excluded findings than a small scan's lungs hold: those left out are counted in the summary and said in
    a warning (they were left out silently, so annotations_excluded.csv listed fewer than asked without a word)."""
    import dataclasses

    config = dataclasses.replace(TINY, n_subsets=1, scans_per_subset=1, excluded_per_scan=80.0, flip_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="luna.synth"):
        summary = synthesize(tmp_path / "d", config, jobs=1)
    listed = len(_read_csv(tmp_path / "d" / "annotations_excluded.csv")) - 1
    assert summary["n_excluded"] == listed > 0
    assert summary["n_excluded_dropped"] > 0
    assert (f"{summary['n_excluded_dropped']} excluded finding(s) found no room in their scan and were left out "
            f"(annotations_excluded.csv lists {listed})") in caplog.text
