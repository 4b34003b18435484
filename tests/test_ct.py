"""Scan reader: real LIDC CT, round trips through write_scan, one-line errors naming the file, and volumes
byte-identical to SimpleITK's for every layout it reads (byte order, LOCAL data, HeaderSize, element types)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import SimpleITK as sitk

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
    with pytest.raises(ScanError, match=r"1\.2\.3\.mhd: voxel data file .*1\.2\.3\.raw is missing \(ElementDataFile = 1\.2\.3\.raw\)"):
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
    (tmp_path / "subset1" / "3.1.mhd").mkdir()  # a folder is no scan (it counted as one, then failed to read)
    scans = find_scans(tmp_path)
    assert {u: s.subset for u, s in scans.items()} == {"1.1": "subset0", "1.2": "subset0", "2.1": "subset1"}
    assert list(find_scans(tmp_path, ["subset1"])) == ["2.1"]
    # a folder named twice is one folder (was "series 2.1 also found at" the same file)
    assert list(find_scans(tmp_path, ["subset1", "subset0", "./subset1", "subset1"])) == ["2.1", "1.1", "1.2"]
    with pytest.raises(FileNotFoundError, match="subset7"):
        find_scans(tmp_path, ["subset7"])


# ---------------------------------------------------------------------------------------------------- same as SimpleITK

def _sitk_volume(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_lidc_volume_byte_identical_to_simpleitk(lidc_mhd) -> None:
    volume, _ = read_scan(lidc_mhd)
    reference = _sitk_volume(lidc_mhd)
    assert volume.dtype == np.int16 and reference.dtype == np.int16
    assert volume.tobytes() == reference.tobytes()
    assert not volume.flags.writeable  # one shared copy, as SimpleITK's view was


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])], ids=["identity", "flip-xy"])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zraw"])
def test_volume_byte_identical_to_simpleitk(tmp_path, compress, direction) -> None:
    """The directions luna.synth writes, both data file kinds: the volume is exactly SimpleITK's."""
    vol = np.random.default_rng(1).integers(-3000, 3000, size=(5, 6, 7)).astype(np.int16)
    path = tmp_path / "1.2.mhd"
    write_scan(path, vol, Geometry([1.0, 2.0, 3.0], [0.5, 0.6, 2.0], direction), compress=compress)
    volume, geometry = read_scan(path)
    assert volume.tobytes() == _sitk_volume(path).tobytes() == vol.tobytes()
    np.testing.assert_array_equal(geometry.direction, direction)


def _hand_written(tmp_path, name: str, header: dict[str, str], data: bytes):
    """A scan whose .mhd and data file are written here, byte by byte."""
    lines = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "TransformMatrix": "1 0 0 0 1 0 0 0 1",
             "Offset": "0 0 0", "ElementSpacing": "1 1 1", "DimSize": "4 3 2", "ElementType": "MET_SHORT",
             **header, "ElementDataFile": f"{name}.{'zraw' if header.get('CompressedData') == 'True' else 'raw'}"}
    path = tmp_path / f"{name}.mhd"
    path.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    (tmp_path / lines["ElementDataFile"]).write_bytes(data)
    return path


VALUES = np.arange(-12, 12, dtype=np.int16).reshape(2, 3, 4) * 111


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zraw"])
@pytest.mark.parametrize("key", ["BinaryDataByteOrderMSB", "ElementByteOrderMSB"])
def test_big_endian_matches_simpleitk(tmp_path, compress, key) -> None:
    data = VALUES.astype(">i2").tobytes()
    header = {key: "True"}
    if compress:
        data = zlib.compress(data)
        header |= {"CompressedData": "True", "CompressedDataSize": str(len(data))}
    path = _hand_written(tmp_path, "msb", header, data)
    volume, _ = read_scan(path)
    assert volume.dtype == np.int16
    np.testing.assert_array_equal(volume, VALUES)
    assert volume.tobytes() == _sitk_volume(path).tobytes()


def test_header_size_and_local_data_match_simpleitk(tmp_path) -> None:
    path = _hand_written(tmp_path, "skip", {"HeaderSize": "10"}, b"0123456789" + VALUES.astype("<i2").tobytes())
    np.testing.assert_array_equal(read_scan(path)[0], _sitk_volume(path))
    np.testing.assert_array_equal(read_scan(path)[0], VALUES)
    for compress in (False, True):  # .mha: header and data in one file (ElementDataFile = LOCAL)
        mha = tmp_path / f"local{int(compress)}.mha"
        sitk.WriteImage(sitk.GetImageFromArray(VALUES), str(mha), useCompression=compress)
        np.testing.assert_array_equal(read_scan(mha)[0], VALUES)
    # LOCAL data with a HeaderSize: MetaIO counts it from the start of the file (it was added to the header's end,
    # which refused a valid file); pointing inside the header text is refused (both readers read the text)
    text = "".join(f"{k} = {v}\n" for k, v in {"ObjectType": "Image", "NDims": "3", "Offset": "0 0 0",
                                                "ElementSpacing": "1 1 1", "DimSize": "4 3 2", "HeaderSize": "300",
                                                "ElementType": "MET_SHORT", "ElementDataFile": "LOCAL"}.items())
    local = tmp_path / "local_skip.mhd"
    local.write_bytes(text.encode() + b"\x01" * (300 - len(text)) + VALUES.astype("<i2").tobytes())
    np.testing.assert_array_equal(_sitk_volume(local), VALUES)
    np.testing.assert_array_equal(read_scan(local)[0], VALUES)
    local.write_bytes(text.replace("300", "50").encode() + b"\x01" * 250 + VALUES.astype("<i2").tobytes())
    with pytest.raises(ScanError, match=f"HeaderSize = 50 points inside the header text, which ends at byte "
                                        f"{len(text) - 1}"):
        read_scan(local)


@pytest.mark.parametrize("element_type, dtype", [("MET_UCHAR", "u1"), ("MET_FLOAT", "<f4"), ("MET_INT", "<i4")])
def test_other_element_types_rounded_and_clipped_to_int16(tmp_path, element_type, dtype) -> None:
    values = np.array([0, 1.4, 2.6, 255, 40000.7, -40000, 7, 8] * 3)[:24].reshape(2, 3, 4)
    if dtype == "u1":
        values = np.clip(values, 0, 255)
    stored = values.astype(dtype)
    path = _hand_written(tmp_path, element_type.lower(), {"ElementType": element_type}, stored.tobytes())
    volume, _ = read_scan(path)
    expected = np.clip(np.rint(_sitk_volume(path)), -32768, 32767).astype(np.int16)
    assert volume.dtype == np.int16
    np.testing.assert_array_equal(volume, expected)
    np.testing.assert_array_equal(volume, np.clip(np.rint(stored.astype(np.float64)), -32768, 32767))


def test_scan_identity_changes_with_content_even_when_the_mtime_is_put_back(tmp_path) -> None:
    """The crop cache's key: an in-place edit whose mtime was restored (cp -p, rsync -a, tar -x) is a new scan."""
    import os
    import time

    from luna.ct import scan_identity

    path = tmp_path / "1.2.3.mhd"
    write_scan(path, np.zeros((4, 5, 6), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    before = scan_identity(path)
    assert scan_identity(path) == before
    raw = path.with_suffix(".raw")
    stat = raw.stat()
    time.sleep(0.01)
    raw.write_bytes(np.full((4, 5, 6), 100, np.int16).tobytes())  # same size, other voxels
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert raw.stat().st_size == stat.st_size and raw.stat().st_mtime_ns == stat.st_mtime_ns
    assert scan_identity(path) != before


def test_scan_identity_of_a_symlinked_header_is_the_data_the_reader_reads(tmp_path) -> None:
    """A subset folder of header links with the data beside the links (where MetaIO looks): the identity named
    the data file beside the link's target, which does not exist there ('scan file vanished' in luna-crops)."""
    import os

    from luna.ct import scan_identity

    write_scan(tmp_path / "headers" / "1.2.3.mhd", np.zeros((4, 5, 6), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    (tmp_path / "subset0").mkdir()
    (tmp_path / "headers" / "1.2.3.raw").rename(tmp_path / "subset0" / "1.2.3.raw")
    link = tmp_path / "subset0" / "1.2.3.mhd"
    link.symlink_to(os.path.join("..", "headers", "1.2.3.mhd"))
    identity = scan_identity(link)
    assert identity[0] == str(tmp_path / "headers" / "1.2.3.mhd")
    assert identity[5] == str(tmp_path / "subset0" / "1.2.3.raw")
    np.testing.assert_array_equal(read_scan(link)[0], np.zeros((4, 5, 6), np.int16))


def test_find_scans_refuses_a_subset_that_is_a_path(tmp_path) -> None:
    """The tables record a subset by its folder's name: batch1/subset0 was found, recorded as subset0, and then
    luna-crops looked for <root>/subset0. './subset0' and 'subset0/' are the folder's name."""
    write_scan(tmp_path / "batch1" / "subset0" / "1.1.mhd", np.zeros((2, 2, 2), np.int16),
               Geometry([0, 0, 0], [1, 1, 1]))
    for name in ("batch1/subset0", "..", "."):
        with pytest.raises(ValueError) as info:
            find_scans(tmp_path, [name])
        assert str(info.value) == (f"subset {name!r}: a subset is the name of a folder directly under {tmp_path} "
                                   "(like subset0), not a path")
    root = tmp_path / "batch1"
    assert {uid: s.subset for uid, s in find_scans(root, ["./subset0", "subset0/"]).items()} == {"1.1": "subset0"}


def test_find_scans_skips_hidden_files_and_explains_an_empty_subset(tmp_path) -> None:
    """macOS copies leave ._<uid>.mhd beside each scan: not scans (they would join splits.tsv and the FROC
    divisor). A subset folder without scans stops with how downloads are usually mangled."""
    write_scan(tmp_path / "subset0" / "1.1.mhd", np.zeros((2, 2, 2), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    (tmp_path / "subset0" / "._1.1.mhd").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    assert list(find_scans(tmp_path)) == ["1.1"]
    (tmp_path / "subset1").mkdir()
    (tmp_path / "subset1" / "1.2.MHD").write_text("")
    with pytest.raises(FileNotFoundError) as info:
        find_scans(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'subset1'}: no <series_uid>.mhd scan in this subset folder (it holds 1 "
                               ".MHD file(s): the extension must be .mhd, lower case)")
    (tmp_path / "subset1" / "1.2.MHD").unlink()
    (tmp_path / "subset1" / "subset1").mkdir()
    (tmp_path / "subset1" / "subset1" / "1.2.mhd").write_text("")
    with pytest.raises(FileNotFoundError, match=r"its subfolder .*subset1/subset1 holds \.mhd files: move them up"):
        find_scans(tmp_path)


def test_a_header_naming_another_scans_data_file_is_said(tmp_path, caplog) -> None:
    write_scan(tmp_path / "1.1.mhd", np.zeros((2, 2, 2), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    (tmp_path / "1.5.mhd").write_text((tmp_path / "1.1.mhd").read_text())  # a header copied alone
    read_scan(tmp_path / "1.5.mhd")
    read_scan(tmp_path / "1.5.mhd")  # luna-crops reads each header twice (a pre-pass, then the voxels): said once
    assert caplog.text.count(f"{tmp_path / '1.5.mhd'}: its voxel data is 1.1.raw (ElementDataFile), not 1.5.raw") == 1
