"""Corrupt or inconsistent scan files: each is one ScanError line naming the culprit file, never a volume.

Small generated scans (8 x 16 x 16 int16), edited byte by byte the way the cases happen on disk.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from luna.ct import ScanError, read_geometry, read_scan, write_scan
from luna.geometry import Geometry

SHAPE = (8, 16, 16)  # I, R, C


def _scan(tmp_path: Path, name: str = "1.2.3", compress: bool = False, shape=SHAPE) -> Path:
    volume = np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(np.int16)
    path = tmp_path / f"{name}.mhd"
    write_scan(path, volume, Geometry([0, 0, 0], [0.7, 0.7, 2.5]), compress=compress)
    return path


def _edit_header(path: Path, **values: str | None) -> None:
    """Set (or, with None, remove) header keys, keeping their order; new keys go before ElementDataFile."""
    lines, todo = [], dict(values)
    for line in path.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "ElementDataFile":
            lines.extend(f"{k} = {v}" for k, v in todo.items() if k != key and v is not None)
        if key in values:
            todo.pop(key, None)
            if values[key] is not None:
                lines.append(f"{key} = {values[key]}")
        else:
            lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def _one_line_error(call, path: Path) -> str:
    with pytest.raises(ScanError) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------- compressed data


def test_zraw_with_200_bytes_overwritten_is_an_error(tmp_path) -> None:
    path = _scan(tmp_path, compress=True)
    zraw = path.with_suffix(".zraw")
    data = bytearray(zraw.read_bytes())
    start = len(data) // 3
    data[start:start + 200] = np.random.default_rng(7).integers(0, 256, 200, dtype=np.uint8).tobytes()
    zraw.write_bytes(bytes(data))
    read_geometry(path)  # sizes are right: only the stream itself tells
    message = _one_line_error(read_scan, path)
    assert message.startswith(f"{zraw}: ")
    assert re.search(r"corrupt compressed voxel data|compressed voxel data ends early", message), message


def test_truncated_zraw_without_compressed_size_is_an_error(tmp_path) -> None:
    path = _scan(tmp_path, compress=True)
    _edit_header(path, CompressedDataSize=None)
    zraw = path.with_suffix(".zraw")
    zraw.write_bytes(zraw.read_bytes()[: zraw.stat().st_size // 2])
    message = _one_line_error(read_scan, path)
    assert message.startswith(f"{zraw}: compressed voxel data ends early (truncated or corrupt .zraw), ")
    assert message.endswith(f"of {np.prod(SHAPE) * 2} bytes inflated")


def test_bytes_after_the_compressed_stream_are_an_error(tmp_path) -> None:
    path = _scan(tmp_path, compress=True)
    _edit_header(path, CompressedDataSize=None)
    zraw = path.with_suffix(".zraw")
    zraw.write_bytes(zraw.read_bytes() + b"trailing")
    assert _one_line_error(read_scan, path) == (
        f"{zraw}: 8 bytes after the end of the compressed voxel data (corrupt .zraw)")


def test_zraw_longer_than_compressed_data_size_is_an_error(tmp_path) -> None:
    path = _scan(tmp_path, compress=True)
    zraw = path.with_suffix(".zraw")
    size = zraw.stat().st_size
    zraw.write_bytes(zraw.read_bytes() + b"\0" * 5)
    message = _one_line_error(read_geometry, path)  # found by the header pass, before any voxel is read
    assert message.startswith(f"{zraw}: {size + 5} bytes of compressed voxel data where the header of "
                              f"{path.name} says {size} (CompressedDataSize = {size})")


# ------------------------------------------------------------------------------------------ element type, size


def test_uchar_header_over_int16_raw_is_an_error(tmp_path) -> None:
    path = _scan(tmp_path)
    _edit_header(path, ElementType="MET_UCHAR")
    raw = path.with_suffix(".raw")
    n = int(np.prod(SHAPE))
    assert _one_line_error(read_geometry, path) == (
        f"{raw}: {2 * n} bytes of voxel data where the header of {path.name} says {n} "
        "(DimSize 16 16 8 x 1 bytes of ElementType): wrong ElementType, DimSize or data file")
    with pytest.raises(ScanError, match="wrong ElementType"):
        read_scan(path)


def test_uchar_header_over_int16_zraw_is_an_error(tmp_path) -> None:
    path = _scan(tmp_path, compress=True)
    _edit_header(path, ElementType="MET_UCHAR")  # CompressedDataSize still right: only inflating tells
    n = int(np.prod(SHAPE))
    assert _one_line_error(read_scan, path) == (
        f"{path.with_suffix('.zraw')}: compressed voxel data inflates to {2 * n} bytes where the header describes "
        f"{n}: wrong ElementType, DimSize or data file")


def test_data_file_of_another_larger_scan_is_an_error(tmp_path) -> None:
    path = _scan(tmp_path)
    bigger = _scan(tmp_path, "9.9.9", shape=(9, 16, 16))
    _edit_header(path, ElementDataFile=bigger.with_suffix(".raw").name)
    message = _one_line_error(read_scan, path)
    assert message.startswith(f"{bigger.with_suffix('.raw')}: {9 * 16 * 16 * 2} bytes of voxel data where the header "
                              f"of {path.name} says {8 * 16 * 16 * 2}")


# ---------------------------------------------------------------------------------------------------- direction


@pytest.mark.parametrize("matrix, error", [("-1 0 0 0 -2 0 0 0 1", "3"), ("0 0 0 0 1 0 0 0 1", "1"),
                                           ("1 0 0 1 0 0 0 0 1", "1")], ids=["scaled", "singular", "sheared"])
def test_direction_not_orthonormal_is_an_error(tmp_path, matrix, error) -> None:
    path = _scan(tmp_path)
    _edit_header(path, TransformMatrix=matrix)
    for call in (read_geometry, read_scan):
        assert _one_line_error(call, path) == (
            f"{path}: direction matrix is not orthonormal (TransformMatrix = {matrix}; max |D^T D - I| = {error}, "
            "tolerance 0.0001)")


def test_direction_written_with_six_decimals_is_accepted(tmp_path) -> None:
    path = _scan(tmp_path)
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    _edit_header(path, TransformMatrix=" ".join(f"{v:.6f}" for v in rotation.T.reshape(9)))  # MetaIO: columns
    geometry, shape = read_geometry(path)
    assert shape == SHAPE
    np.testing.assert_allclose(geometry.direction, rotation, atol=1e-6)
    assert read_scan(path)[1] == geometry


# ---------------------------------------------------------------------------------------------------- not handled


@pytest.mark.parametrize("key, value, reason", [
    ("ElementNumberOfChannels", "3", "expected a single-channel scan, header says ElementNumberOfChannels = 3"),
    ("BinaryData", "False", "ASCII voxel data (BinaryData = False) is not supported"),
    ("ElementDataFile", "LIST", "ElementDataFile = 'LIST': voxel data split over several files is not supported"),
    ("ElementDataFile", "LIST 2D",  # MetaIO's usual form (was: "voxel data file .../LIST 2D is missing")
     "ElementDataFile = 'LIST 2D': voxel data split over several files is not supported"),
    ("ElementType", "MET_STRING", "unsupported ElementType MET_STRING"),
    ("DimSize", "16 16", "unreadable header, DimSize = '16 16'"),
])
def test_layouts_not_handled_are_one_line(tmp_path, key, value, reason) -> None:
    path = _scan(tmp_path)
    _edit_header(path, **{key: value})
    assert _one_line_error(read_geometry, path) == f"{path}: {reason}"


def test_sizes_past_any_file_are_named_as_such(tmp_path) -> None:
    """A HeaderSize past the end of the data file, and a DimSize whose byte count overflows int64 (it wrapped to
    'the header says 0 bytes'), are named for what they are."""
    path = _scan(tmp_path)
    _edit_header(path, HeaderSize="1000000000")
    assert _one_line_error(read_scan, path) == (f"{path}: the voxel data would start at byte 1000000000 of 1.2.3.raw, "
                                                "which holds 4096 bytes (HeaderSize too large?)")
    path = _scan(tmp_path, name="1.2.4")
    _edit_header(path, DimSize="4294967296 4294967296 1")
    assert _one_line_error(read_scan, path) == (f"{tmp_path / '1.2.4.raw'}: truncated voxel data, 4096 bytes where "
                                                f"{2 * 4294967296 ** 2} are needed")


@pytest.mark.parametrize("key, value, what", [
    ("Offset", "-166 -171.7", "the origin needs 3 finite numbers"),
    ("Offset", "-166 -171.7 z", "the origin needs 3 finite numbers"),
    ("Offset", "nan 0 0", "the origin needs 3 finite numbers"),
    ("ElementSpacing", "0.7 0.7", "the spacing needs 3 finite numbers"),
    ("ElementSpacing", "0 0.7 2.5", "spacing must be positive"),
])
def test_malformed_origin_or_spacing_is_one_line(tmp_path, key, value, what) -> None:
    """SimpleITK reads a malformed Offset as zeros (a wrong geometry, silently) and fails on a malformed
    ElementSpacing with messages about other keys: both are one line naming the key and value, before any read."""
    path = _scan(tmp_path)
    _edit_header(path, **{key: value})
    for call in (read_geometry, read_scan):
        assert _one_line_error(call, path) == f"{path}: unreadable header, {key} = {value!r} ({what})"


def test_no_spacing_line_is_one_mm_with_one_warning(tmp_path, caplog) -> None:
    path = _scan(tmp_path)
    _edit_header(path, ElementSpacing=None)
    with caplog.at_level("WARNING", logger="luna.ct"):
        geometry, _ = read_geometry(path)
        read_scan(path)  # the crop stage reads the header, then the voxels: one warning
    np.testing.assert_array_equal(geometry.spacing_xyz, [1.0, 1.0, 1.0])
    assert caplog.text.count(f"{path}: no ElementSpacing line; 1 mm voxels assumed") == 1


def test_no_offset_line_is_the_zero_origin_with_one_warning(tmp_path, caplog) -> None:
    """No Offset line is MetaIO's origin (0, 0, 0): said, since every candidate of such a scan may then lie outside
    it (it was silent, and the crop stage skipped them all)."""
    path = _scan(tmp_path)
    _edit_header(path, Offset=None)
    with caplog.at_level("WARNING", logger="luna.ct"):
        geometry, _ = read_geometry(path)
        read_scan(path)
    np.testing.assert_array_equal(geometry.origin_xyz, [0.0, 0.0, 0.0])
    assert caplog.text.count(f"{path}: no Offset line; origin (0, 0, 0) mm assumed") == 1


def test_metaio_header_forms_that_read_as_simpleitk_reads_them(tmp_path) -> None:
    """What MetaIO accepts stays accepted: values past the third are ignored, and ElementSize is not checked when
    ElementSpacing (the one used) is there; ElementSize alone is the spacing."""
    for name, edit, origin, spacing in (
            ("four", {"Offset": "10 20 30 40", "ElementSpacing": "0.7 0.7 2.5 9"}, [10, 20, 30], [0.7, 0.7, 2.5]),
            ("size_unused", {"ElementSize": "0 0 0"}, [0, 0, 0], [0.7, 0.7, 2.5]),
            ("size_only", {"ElementSpacing": None, "ElementSize": "0.5 0.6 2"}, [0, 0, 0], [0.5, 0.6, 2.0])):
        path = _scan(tmp_path, name)
        _edit_header(path, **edit)
        geometry, _ = read_geometry(path)
        np.testing.assert_allclose(geometry.origin_xyz, origin)
        np.testing.assert_allclose(geometry.spacing_xyz, spacing)
        np.testing.assert_allclose(read_scan(path)[1].spacing_xyz, spacing)


def test_nan_or_infinite_voxels_of_a_float_scan_are_an_error(tmp_path) -> None:
    """An infinite voxel was clipped to +-32768 silently (then the HU window's edge); NaN was refused."""
    path = _scan(tmp_path)
    _edit_header(path, ElementType="MET_FLOAT")
    for bad, n in ([np.nan], 3), ([np.inf, -np.inf], 2):
        values = np.zeros(SHAPE, "<f4")
        values[2, 3, 4:4 + n] = (bad * n)[:n]
        path.with_suffix(".raw").write_bytes(values.tobytes())
        assert _one_line_error(read_scan, path) == (f"{path}: {n} voxel(s) are NaN or infinite (ElementType "
                                                    "MET_FLOAT); HU values must be finite numbers")


def test_data_file_name_with_a_space_is_read(tmp_path) -> None:
    path = _scan(tmp_path)
    expected, _ = read_scan(path)
    path.with_suffix(".raw").rename(tmp_path / "my scan.raw")
    _edit_header(path, ElementDataFile="my scan.raw")
    np.testing.assert_array_equal(read_scan(path)[0], expected)
    (tmp_path / "my scan.raw").unlink()
    assert _one_line_error(read_scan, path) == (f"{path}: voxel data file {tmp_path / 'my scan.raw'} is missing "
                                                "(ElementDataFile = my scan.raw)")


@pytest.mark.parametrize("compress", [False, True])
def test_byte_order_and_booleans_read_as_metaio_reads_them(tmp_path, compress) -> None:
    """MetaIO's true is any value starting T, t or 1, and BinaryDataByteOrderMSB wins over ElementByteOrderMSB in
    any line order. A .zraw's stream is checked (and re-read) with the byte order parsed here: a different parse
    would swap every voxel's bytes, silently."""
    import SimpleITK as sitk

    for i, (edit, msb) in enumerate((
            ({"BinaryDataByteOrderMSB": "T"}, True),
            ({"ElementByteOrderMSB": "1"}, True),
            ({"BinaryDataByteOrderMSB": "False", "ElementByteOrderMSB": "True"}, False),
            ({"ElementByteOrderMSB": "True", "BinaryDataByteOrderMSB": "f"}, False),
            ({"BinaryDataByteOrderMSB": "true", "ElementByteOrderMSB": "False"}, True))):
        path = _scan(tmp_path, f"s{i}", compress=compress)
        volume, _ = read_scan(path)
        _edit_header(path, BinaryDataByteOrderMSB=None, ElementByteOrderMSB=None, CompressedData=None,
                     CompressedDataSize=None)
        _edit_header(path, **edit, **({"CompressedData": "T"} if compress else {}))  # new lines in this order
        data = path.with_suffix(".zraw" if compress else ".raw")
        payload = volume.astype(">i2" if msb else "<i2").tobytes()
        data.write_bytes(zlib.compress(payload) if compress else payload)
        np.testing.assert_array_equal(read_scan(path)[0], volume)
        np.testing.assert_array_equal(read_scan(path)[0], sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def test_zraw_asking_for_a_preset_dictionary_is_an_error(tmp_path) -> None:
    """SimpleITK's reader never returns on such a stream: it is refused before SimpleITK reads it."""
    path = _scan(tmp_path, compress=True)
    packer = zlib.compressobj(zdict=b"dictionary")
    stream = packer.compress(np.zeros(SHAPE, "<i2").tobytes()) + packer.flush()
    zraw = path.with_suffix(".zraw")
    zraw.write_bytes(stream)
    _edit_header(path, CompressedDataSize=str(len(stream)))
    expected = (f"{zraw}: compressed voxel data needs a zlib preset dictionary (FDICT), which MetaIO .zraw files "
                "never use: corrupt or not a .zraw")
    assert _one_line_error(read_scan, path) == expected
    assert _one_line_error(read_geometry, path) == expected
