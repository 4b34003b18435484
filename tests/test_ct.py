"""Scan reader: real LIDC CT, round trips through write_scan, and one-line errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from luna.ct import ScanError, find_scans, read_geometry, read_scan, write_scan
from luna.geometry import Geometry, xyz_to_irc


def test_real_lidc_slab_reads_with_official_nodule(lidc_mhd) -> None:
    volume, geometry = read_scan(lidc_mhd)
    assert volume.shape == (16, 512, 512)
    assert volume.dtype == np.int16
    irc = xyz_to_irc(np.array([56.21, 86.34, -115.87]), geometry)
    assert tuple(irc) == (7, 367, 316)
    assert volume[tuple(irc)] > 0
    # the 3x3 median at the centre is +93 HU (measured in the data README); the lung far away is air-like
    assert np.median(volume[7, 366:369, 315:318]) == pytest.approx(93, abs=1)
    assert geometry.spacing_xyz == pytest.approx([0.703125, 0.703125, 2.5])
    g2, shape = read_geometry(lidc_mhd)
    assert shape == (16, 512, 512) and g2 == geometry


@pytest.mark.parametrize("compress", [False, True])
def test_write_then_read_round_trip(tmp_path, compress) -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(7, 9, 11)).astype(np.int16)
    geo = Geometry([-10.5, 20.0, 3.25], [0.7, 0.8, 2.5], np.diag([-1.0, -1.0, 1.0]))
    path = tmp_path / "subset0" / "1.2.3.mhd"
    write_scan(path, vol, geo, compress=compress)
    back, geo_back = read_scan(path)
    np.testing.assert_array_equal(back, vol)
    assert geo_back == geo
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.mhd", "1.2.3.zraw" if compress else "1.2.3.raw"]


def _scan(tmp_path):
    path = tmp_path / "1.2.3.mhd"
    write_scan(path, np.zeros((4, 5, 6), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    return path


def test_missing_raw_names_the_file(tmp_path) -> None:
    path = _scan(tmp_path)
    (tmp_path / "1.2.3.raw").unlink()
    with pytest.raises(ScanError, match=r"1\.2\.3\.mhd: voxel data file 1\.2\.3\.raw is missing"):
        read_scan(path)


def test_truncated_raw_names_the_file(tmp_path) -> None:
    path = _scan(tmp_path)
    raw = tmp_path / "1.2.3.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(ScanError, match=r"1\.2\.3\.raw: truncated voxel data, 100 bytes where 240"):
        read_scan(path)


def test_unreadable_header_names_the_file(tmp_path) -> None:
    path = _scan(tmp_path)
    path.write_text("this is not a header\n")
    with pytest.raises(ScanError, match=r"1\.2\.3\.mhd:1: unreadable header line"):
        read_scan(path)
    path.write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(ScanError, match=r"1\.2\.3\.mhd: unreadable header, no DimSize"):
        read_scan(path)


def test_missing_header(tmp_path) -> None:
    with pytest.raises(ScanError, match="nope.mhd: scan header not found"):
        read_scan(tmp_path / "nope.mhd")


def test_find_scans(tmp_path) -> None:
    for subset, uid in [("subset0", "1.1"), ("subset0", "1.2"), ("subset1", "2.1")]:
        write_scan(tmp_path / subset / f"{uid}.mhd", np.zeros((2, 2, 2), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    (tmp_path / "other").mkdir()
    scans = find_scans(tmp_path)
    assert {u: s.subset for u, s in scans.items()} == {"1.1": "subset0", "1.2": "subset0", "2.1": "subset1"}
    assert list(find_scans(tmp_path, ["subset1"])) == ["2.1"]
    with pytest.raises(FileNotFoundError, match="subset7"):
        find_scans(tmp_path, ["subset7"])
