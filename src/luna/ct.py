"""Read and write LUNA16 scans (MetaImage ``.mhd`` + ``.raw``/``.zraw``); the only SimpleITK importer.

A scan is an int16 Hounsfield volume indexed (I, R, C) = (z, y, x) plus its :class:`Geometry`.
Every failure is a :class:`ScanError` whose one-line message names the file.

Voxel data is verified, not trusted (SimpleITK reads whatever bytes are there):

* the data file must hold exactly what the header describes: ``prod(DimSize) x bytes(ElementType)`` for
  ``.raw`` (a longer file is as wrong as a shorter one: a wrong ElementType or DimSize, or the wrong file), and
  ``CompressedDataSize`` bytes for a ``.zraw`` whose header gives it;
* a ``.zraw`` must inflate cleanly to exactly that size with nothing after the stream. SimpleITK ignores a
  corrupt or short stream (at most "Uncompress failed" on stderr) and returns a wrong volume, so its voxels are
  accepted only when the checksum ending the stream, the file's last bytes, matches them; otherwise the stream
  is inflated again here, strictly, to name the reason;
* the direction matrix must be orthonormal (``D^T D = I`` within :data:`ORTHONORMAL_TOLERANCE`): a scaled or
  singular one would silently change every world-to-voxel transform;
* the origin (``Offset``) and spacing lines must begin with three finite numbers, the spacing positive
  (SimpleITK fills an ``Offset``'s missing or unparsable values with zeros); no spacing line is MetaIO's 1 mm,
  with a warning.

The volume is SimpleITK's (byte order, ``LOCAL`` data and ``HeaderSize`` are its business); element types
other than int16 are rounded and clipped to int16 (a NaN voxel is an error). What this reader does not handle (ASCII data, one file per
slice, several channels) is a one-line error.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna.geometry import ORTHONORMAL_TOLERANCE, Geometry, orthonormality_error
from luna.io import OutputError

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
# numpy kind of each MetaIO element type (sizes as MetaIO's MET_ValueTypeSize: MET_LONG is 4 bytes)
_DTYPE_KIND = {
    "MET_CHAR": "i", "MET_UCHAR": "u", "MET_SHORT": "i", "MET_USHORT": "u", "MET_INT": "i", "MET_UINT": "u",
    "MET_LONG": "i", "MET_ULONG": "u", "MET_LONG_LONG": "i", "MET_ULONG_LONG": "u", "MET_FLOAT": "f",
    "MET_DOUBLE": "f",
}
_DIRECTION_KEYS = ("TransformMatrix", "Rotation", "Orientation")  # MetaIO synonyms
_ORIGIN_KEYS = ("Offset", "Origin", "Position")  # MetaIO synonyms
_SPACING_KEYS = ("ElementSpacing", "ElementSize")  # ElementSize stands in for a missing ElementSpacing
_WARNED: set[tuple[str, str]] = set()  # (scan, warning) already said: header and voxels are read apart
_HEADER_MAX_BYTES = 1 << 20  # a header is a few hundred bytes; stop looking for ElementDataFile after 1 MiB
_ZLIB_OR_GZIP = 47  # zlib.MAX_WBITS | 32: zlib or gzip stream, as MetaIO's inflateInit2(..., 47)


class ScanError(ValueError):
    """A scan that cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class ScanFile:
    """A scan found on disk: its series UID, subset folder name and ``.mhd`` path."""

    series_uid: str
    subset: str
    path: Path


@dataclass(frozen=True)
class VoxelLayout:
    """Where a scan's voxel bytes are and what they must be, from the header alone."""

    data: Path  # the .raw/.zraw (the header file itself for ElementDataFile = LOCAL)
    offset: int  # first byte of the voxel data in ``data``
    shape_irc: tuple[int, int, int]
    dtype: np.dtype  # element type with the header's byte order
    compressed: bool
    compressed_size: int | None  # CompressedDataSize when the header gives it

    @property
    def nbytes(self) -> int:
        """Decoded size: prod(DimSize) x bytes per element."""
        return math.prod(int(n) for n in self.shape_irc) * self.dtype.itemsize  # Python ints: no int64 wrap


def _read_header_lines(path: Path) -> tuple[dict[str, str], int]:
    """The ``key = value`` lines up to and including ElementDataFile (MetaIO stops there) and the byte
    offset just after that line (where ``LOCAL`` voxel data starts)."""
    if not path.is_file():
        raise ScanError(f"{path}: scan header not found")
    header: dict[str, str] = {}
    offset = 0
    try:
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(iter(lambda: fh.readline(_HEADER_MAX_BYTES), b""), start=1):
                offset += len(raw)
                line = raw.decode("latin-1")
                if not line.strip():
                    continue
                if "=" not in line:
                    raise ScanError(f"{path}:{line_no}: unreadable header line {line.strip()[:60]!r}")
                key, value = line.split("=", 1)
                header[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile" or offset > _HEADER_MAX_BYTES:
                    break
    except OSError as exc:
        raise ScanError(f"{path}: cannot read header ({exc.strerror})") from exc
    return header, offset


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header, checked for the keys a scan needs."""
    return _checked_header(Path(path))[0]


def _checked_header(path: Path) -> tuple[dict[str, str], int]:
    header, offset = _read_header_lines(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise ScanError(f"{path}: unreadable header, no {key} line")
    if header["NDims"] != "3":
        raise ScanError(f"{path}: expected a 3-D scan, header says NDims = {header['NDims']}")
    return header, offset


def data_file(path: str | os.PathLike, header: dict[str, str] | None = None) -> Path:
    """The voxel data file (``.raw``/``.zraw``) a header points to (the header itself for ``LOCAL``)."""
    path = Path(path)
    header = header or read_header(path)
    name = header["ElementDataFile"]
    if name.upper() == "LOCAL":
        return path
    return path.parent / name


def _first_time(path: Path, warning: str) -> bool:
    """True the first time this process is about to give this warning for this scan (then remembered)."""
    key = (str(path), warning)
    if key in _WARNED:
        return False
    _WARNED.add(key)
    return True


def _is_true(header: dict[str, str], key: str) -> bool:
    """A MetaIO boolean: true when the value starts with ``T``, ``t`` or ``1`` (as MetaIO reads it)."""
    return header.get(key, "False").strip()[:1] in ("T", "t", "1")


def _is_msb(header: dict[str, str]) -> bool:
    """Big-endian voxels: ``BinaryDataByteOrderMSB`` when the header has it (MetaIO lets it win, in any line
    order), else ``ElementByteOrderMSB``."""
    key = "BinaryDataByteOrderMSB" if "BinaryDataByteOrderMSB" in header else "ElementByteOrderMSB"
    return _is_true(header, key)


def _header_int(path: Path, header: dict[str, str], key: str, default: int | None = None) -> int | None:
    if key not in header:
        return default
    try:
        return int(header[key])
    except ValueError as exc:
        raise ScanError(f"{path}: unreadable header, {key} = {header[key]!r}") from exc


def _header_and_layout(path: Path) -> tuple[dict[str, str], VoxelLayout]:
    header, header_end = _checked_header(path)
    try:
        dims = [int(v) for v in header["DimSize"].split()]
    except ValueError as exc:
        raise ScanError(f"{path}: unreadable header, DimSize = {header['DimSize']!r}") from exc
    if len(dims) != 3 or min(dims) <= 0:
        raise ScanError(f"{path}: unreadable header, DimSize = {header['DimSize']!r}")
    element_type = header["ElementType"]
    if element_type not in _DTYPE_BYTES:
        raise ScanError(f"{path}: unsupported ElementType {element_type}")
    channels = _header_int(path, header, "ElementNumberOfChannels", 1)
    if channels != 1:
        raise ScanError(f"{path}: expected a single-channel scan, header says ElementNumberOfChannels = {channels}")
    if "BinaryData" in header and not _is_true(header, "BinaryData"):
        raise ScanError(f"{path}: ASCII voxel data (BinaryData = {header['BinaryData']}) is not supported")
    name = header["ElementDataFile"]
    if name.upper().split()[:1] == ["LIST"] or "%" in name:  # MetaIO writes "LIST" or "LIST 2D"
        raise ScanError(f"{path}: ElementDataFile = {name!r}: voxel data split over several files is not supported")
    local = name.upper() == "LOCAL"
    data = path if local else path.parent / name
    if not local and not data.is_file():
        raise ScanError(f"{path}: voxel data file {data} is missing (ElementDataFile = {name})")
    # LUNA16 names the data <uid>.raw: another name is a header copied or renamed alone?
    if not local and Path(name).stem != path.stem and _first_time(path, "data name"):
        logger.warning("%s: its voxel data is %s (ElementDataFile), not %s.raw: another scan's voxels?", path, name,
                       path.stem)
    msb = _is_msb(header)
    dtype = np.dtype(f"{'>' if msb else '<'}{_DTYPE_KIND[element_type]}{_DTYPE_BYTES[element_type]}")
    compressed = _is_true(header, "CompressedData")
    compressed_size = _header_int(path, header, "CompressedDataSize") if compressed else None
    header_size = _header_int(path, header, "HeaderSize", 0)
    if header_size < -1:
        raise ScanError(f"{path}: unreadable header, HeaderSize = {header['HeaderSize']!r}")
    layout = VoxelLayout(data, header_end if local else 0, (dims[2], dims[1], dims[0]), dtype, compressed,
                         compressed_size)
    if header_size == -1:  # MetaIO: the voxels are the last bytes of the file
        if compressed:
            raise ScanError(f"{path}: HeaderSize = -1 with compressed data is not supported")
        offset = _file_size(data) - layout.nbytes
        if offset < layout.offset:
            raise ScanError(f"{data}: truncated voxel data, {_file_size(data) - layout.offset} bytes where "
                            f"{layout.nbytes} are needed")
        return header, VoxelLayout(data, offset, layout.shape_irc, dtype, compressed, compressed_size)
    if local and 0 < header_size < header_end:  # MetaIO counts HeaderSize from the file's start, LOCAL data too
        raise ScanError(f"{path}: HeaderSize = {header_size} points inside the header text, which ends at byte "
                        f"{header_end} (with ElementDataFile = LOCAL it counts from the start of the file)")
    offset = header_size if local and header_size > 0 else layout.offset + header_size
    return header, VoxelLayout(data, offset, layout.shape_irc, dtype, compressed, compressed_size)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise ScanError(f"{path}: cannot read voxel data ({exc.strerror})") from exc


def _check_sizes(path: Path, layout: VoxelLayout) -> None:
    """The data file holds exactly the bytes the header describes (compressed: CompressedDataSize, if given), and
    can be read (SimpleITK says "No such file or directory" for a file it may not read)."""
    if not os.access(layout.data, os.R_OK):
        raise ScanError(f"{layout.data}: cannot read the voxel data (permission denied)")
    actual = _file_size(layout.data) - layout.offset
    if layout.compressed:
        _check_stream_start(layout)
        expected = layout.compressed_size
        if expected is None:  # nothing to compare before inflating; reading checks the stream itself
            return
        what = "compressed voxel data"
        hint = f"CompressedDataSize = {expected}"
    else:
        expected = layout.nbytes
        what = "voxel data"
        hint = (f"DimSize {layout.shape_irc[2]} {layout.shape_irc[1]} {layout.shape_irc[0]} x "
                f"{layout.dtype.itemsize} bytes of ElementType")
    if actual < 0:
        raise ScanError(f"{path}: the voxel data would start at byte {layout.offset} of {layout.data.name}, which "
                        f"holds {_file_size(layout.data)} bytes (HeaderSize too large?)")
    if actual < expected:
        raise ScanError(f"{layout.data}: truncated {what}, {actual} bytes where {expected} are needed")
    if actual > expected:
        raise ScanError(f"{layout.data}: {actual} bytes of {what} where the header of {path.name} says {expected} "
                        f"({hint}): wrong ElementType, DimSize or data file")


def _check_stream_start(layout: VoxelLayout) -> None:
    """A zlib stream that needs a preset dictionary (FDICT) is refused before SimpleITK sees it: MetaIO never
    writes one, and SimpleITK's reader does not return on it."""
    with open(layout.data, "rb") as fh:
        fh.seek(layout.offset)
        head = fh.read(2)
    if len(head) == 2:
        cmf, flg = head
        if cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0 and flg & 0x20:
            raise ScanError(f"{layout.data}: compressed voxel data needs a zlib preset dictionary (FDICT), which "
                            "MetaIO .zraw files never use: corrupt or not a .zraw")


def check_scan_files(path: str | os.PathLike) -> dict[str, str]:
    """Fail with a one-line error before reading voxels: bad header, missing data file, wrong data size,
    direction not orthonormal."""
    path = Path(path)
    header, layout = _header_and_layout(path)
    _check_sizes(path, layout)
    _check_header_geometry(path, header)
    return header


def _sitk_error(path: Path, exc: Exception) -> ScanError:
    msg = str(exc).strip().splitlines()
    detail = next((m for m in reversed(msg) if m.strip()), "unknown error")
    detail = re.sub(r"\s+", " ", detail)[:200]
    return ScanError(f"{path}: SimpleITK cannot read the scan ({detail})")


class _ImageBuffer:
    """Keeps a SimpleITK image alive under a numpy view of its voxels (a view alone would dangle)."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def _geometry_of(path: Path, source: sitk.ImageFileReader | sitk.Image) -> Geometry:
    """The geometry SimpleITK read (from a reader or an image), its direction orthonormal."""
    direction = np.reshape(source.GetDirection(), (3, 3))
    error = orthonormality_error(direction)  # the header's matrix was checked; this is what SimpleITK made of it
    if not error <= ORTHONORMAL_TOLERANCE:
        raise ScanError(f"{path}: direction matrix is not orthonormal (direction {direction.reshape(9).tolist()}; "
                        f"max |D^T D - I| = {error:.3g}, tolerance {ORTHONORMAL_TOLERANCE:g})")
    try:
        return Geometry(source.GetOrigin(), source.GetSpacing(), direction)
    except ValueError as exc:
        raise ScanError(f"{path}: bad geometry in header ({exc})") from exc


def _header_floats(value: str) -> list[float]:
    """The numbers of a header line's value; none when any word is not a number."""
    try:
        return [float(v) for v in value.split()]
    except ValueError:
        return []


def _check_header_geometry(path: Path, header: dict[str, str]) -> None:
    """Origin, spacing and direction lines hold what a 3-D geometry needs, checked before SimpleITK reads
    them: it fills the missing or unparsable values of an ``Offset`` with zeros (a wrong geometry, silently)
    and fails on a malformed ``ElementSpacing`` with messages about other keys. As MetaIO, the first three
    values count and ``ElementSize`` stands in only for a missing ``ElementSpacing``. No spacing line is
    MetaIO's 1 mm, said in a warning (once per scan)."""
    spacing_key = next((k for k in _SPACING_KEYS if k in header), None)
    keys = [(k, "origin") for k in _ORIGIN_KEYS if k in header] + ([(spacing_key, "spacing")] if spacing_key else [])
    for key, what in keys:
        values = _header_floats(header[key])[:3]
        if len(values) != 3 or not all(np.isfinite(values)):
            raise ScanError(f"{path}: unreadable header, {key} = {header[key]!r} (the {what} needs 3 finite "
                            "numbers)")
        if what == "spacing" and min(values) <= 0:
            raise ScanError(f"{path}: unreadable header, {key} = {header[key]!r} (spacing must be positive)")
    if spacing_key is None and _first_time(path, "no spacing"):
        logger.warning("%s: no ElementSpacing line; 1 mm voxels assumed (MetaIO's default)", path)
    if not any(k in header for k in _ORIGIN_KEYS) and _first_time(path, "no origin"):
        logger.warning("%s: no Offset line; origin (0, 0, 0) mm assumed (MetaIO's default): world coordinates of "
                       "candidates and annotations may then lie outside the scan", path)
    _check_header_direction(path, header)


def _check_header_direction(path: Path, header: dict[str, str]) -> None:
    """The header's direction is orthonormal, checked before SimpleITK reads the file (it fails on a singular one
    with a message of its own). MetaIO writes the matrix column by column: D = M.T; no matrix is the identity."""
    key = next((k for k in _DIRECTION_KEYS if k in header), None)
    if key is None:
        return
    matrix = np.array(_header_floats(header[key]), dtype=np.float64)
    if matrix.size != 9:
        raise ScanError(f"{path}: unreadable header, {key} = {header[key]!r}")
    error = orthonormality_error(matrix.reshape(3, 3).T)
    if not error <= ORTHONORMAL_TOLERANCE:
        raise ScanError(f"{path}: direction matrix is not orthonormal ({key} = {header[key]}; max |D^T D - I| = "
                        f"{error:.3g}, tolerance {ORTHONORMAL_TOLERANCE:g})")


def _shape_of(path: Path, source: sitk.ImageFileReader | sitk.Image, layout: VoxelLayout) -> tuple[int, int, int]:
    """(I, R, C) shape SimpleITK reads, checked against the header as parsed here."""
    components = (source.GetNumberOfComponents() if isinstance(source, sitk.ImageFileReader)
                  else source.GetNumberOfComponentsPerPixel())
    if source.GetDimension() != 3 or components != 1:
        raise ScanError(f"{path}: expected a 3-D single-channel scan")
    size_xyz = source.GetSize()
    shape_irc = (int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0]))
    if shape_irc != layout.shape_irc:
        raise ScanError(f"{path}: SimpleITK reads shape {shape_irc}, the header says {layout.shape_irc}")
    return shape_irc


def read_geometry(path: str | os.PathLike) -> tuple[Geometry, tuple[int, int, int]]:
    """Geometry and (I, R, C) shape from the header alone, without reading the voxels (sizes are checked)."""
    path = Path(path)
    header, layout = _header_and_layout(path)
    _check_sizes(path, layout)
    _check_header_geometry(path, header)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _sitk_error(path, exc) from exc
    shape_irc = _shape_of(path, reader, layout)
    return _geometry_of(path, reader), shape_irc


def _inflate(layout: VoxelLayout) -> bytes:
    """Inflate the zlib/gzip stream at ``layout`` strictly: it must end cleanly (checksum included), with nothing
    after it, at exactly ``layout.nbytes`` bytes; else a one-line ScanError saying which."""
    data = layout.data
    with open(data, "rb") as fh:
        fh.seek(layout.offset)
        compressed = fh.read()
    inflater = zlib.decompressobj(_ZLIB_OR_GZIP)
    try:
        out = inflater.decompress(compressed)
    except zlib.error as exc:
        raise ScanError(f"{data}: corrupt compressed voxel data ({exc})") from exc
    if not inflater.eof:
        raise ScanError(f"{data}: compressed voxel data ends early (truncated or corrupt .zraw), {len(out)} of "
                        f"{layout.nbytes} bytes inflated")
    if inflater.unused_data:
        raise ScanError(f"{data}: {len(inflater.unused_data)} bytes after the end of the compressed voxel data "
                        f"(corrupt .zraw)")
    if len(out) != layout.nbytes:
        raise ScanError(f"{data}: compressed voxel data inflates to {len(out)} bytes where the header describes "
                        f"{layout.nbytes}: wrong ElementType, DimSize or data file")
    return out


def _stream_checksum_matches(layout: VoxelLayout, voxels: np.ndarray) -> bool:
    """Whether the voxels SimpleITK inflated are the stream's content and the stream ends the file: the checksum
    that ends a zlib (Adler-32) or gzip (CRC-32, size) stream, taken from the file's last bytes, matches them.

    A corrupt, truncated or too short/long stream, or bytes after it, all fail this (SimpleITK returns a buffer
    of the header's size whatever the stream held, and at most prints "Uncompress failed")."""
    stored = voxels if voxels.dtype == layout.dtype else voxels.astype(layout.dtype)  # the bytes as in the file
    buffer = memoryview(np.ascontiguousarray(stored)).cast("B")
    with open(layout.data, "rb") as fh:
        fh.seek(layout.offset)
        head = fh.read(2)
        size = fh.seek(0, os.SEEK_END) - layout.offset
        if size < 10:
            return False
        fh.seek(-8, os.SEEK_END)
        tail = fh.read(8)
    if head == b"\x1f\x8b":  # gzip member: CRC-32 and size mod 2**32, little-endian
        return (tail[:4] == zlib.crc32(buffer).to_bytes(4, "little")
                and tail[4:] == (len(buffer) & 0xFFFFFFFF).to_bytes(4, "little"))
    cmf, flg = head
    if cmf & 0x0F != 8 or (cmf << 8 | flg) % 31:  # not a zlib header (deflate, valid check bits)
        return False
    return tail[4:] == zlib.adler32(buffer).to_bytes(4, "big")


def read_scan(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a scan: int16 HU volume (I, R, C) = (z, y, x), read-only, and its geometry, both verified.

    SimpleITK reads the voxels (its bundled zlib-ng inflates ~1.5x faster than Python's zlib); they are
    accepted only after the checks of the module docstring. A compressed stream whose checksum does not match
    is inflated again here, strictly, for the one-line reason (corrupt, ends early, too long, trailing bytes).
    """
    path = Path(path)
    header, layout = _header_and_layout(path)
    _check_sizes(path, layout)
    _check_header_geometry(path, header)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _sitk_error(path, exc) from exc
    shape_irc = _shape_of(path, image, layout)
    geometry = _geometry_of(path, image)
    voxels = sitk.GetArrayViewFromImage(image)
    if layout.compressed and not _stream_checksum_matches(layout, voxels):
        try:
            strict = _inflate(layout)  # raises the precise reason
        except OSError as exc:
            raise ScanError(f"{layout.data}: cannot read voxel data ({exc.strerror or exc})") from exc
        voxels = np.frombuffer(strict, dtype=layout.dtype).reshape(shape_irc)
        image = None  # the strict inflate is the content; SimpleITK's buffer is not used
    if voxels.dtype == np.int16 and image is not None:
        volume = np.asarray(_ImageBuffer(image))  # read-only view, no second copy of the scan
    elif voxels.dtype.kind == "i" and voxels.dtype.itemsize == 2:
        volume = voxels.astype(np.int16)
    else:
        if voxels.dtype.kind == "f":
            n_bad = int(voxels.size - np.isfinite(voxels).sum())
            if n_bad:
                raise ScanError(f"{path}: {n_bad} voxel(s) are NaN or infinite (ElementType "
                                f"{header['ElementType']}); HU values must be finite numbers")
        volume = np.clip(np.rint(voxels), -32768, 32767).astype(np.int16)  # as the reader always converted
    volume.flags.writeable = False
    return volume, geometry


def write_scan(path: str | os.PathLike, volume_hu: np.ndarray, geometry: Geometry, compress: bool = False) -> None:
    """Write an int16 (I, R, C) volume as LUNA16-style ``.mhd`` + ``.raw`` (``.zraw`` when compressed).

    Both files are written under temporary names and renamed, so a crash leaves no half-written scan.
    """
    path = Path(path)
    if path.suffix != ".mhd":
        raise ValueError(f"{path}: scan path must end in .mhd")
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume_hu, dtype=np.int16))
    image.SetOrigin(tuple(float(v) for v in geometry.origin_xyz))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing_xyz))
    image.SetDirection(tuple(float(v) for v in geometry.direction.reshape(9)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = path.parent / f".tmp-{path.stem}-{os.getpid()}"
    tmp_dir.mkdir(exist_ok=True)
    try:
        tmp = tmp_dir / path.name
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:  # ITK's multi-line "ITK ERROR ... No space left on device": one line
            raise OutputError(f"{path}: cannot write the scan ({_itk_write_reason(str(exc))})") from None
        data_name = read_header(tmp)["ElementDataFile"]
        os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp, path)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()


def _itk_write_reason(message: str) -> str:
    """The reason in an ITK writer's error, lower case and short."""
    for needle, reason in (("No space left", "no space left on device"), ("Disk quota", "disk quota exceeded"),
                           ("Permission denied", "permission denied"), ("Read-only", "read-only file system")):
        if needle in message:
            return reason
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "SimpleITK could not write it"


def scan_identity(path: str | os.PathLike) -> tuple:
    """What identifies a scan's content for caching: resolved paths, sizes, inodes, mtimes and ctimes of header
    and data. The ctime too: an edit whose mtime was put back (``cp -p``, ``rsync -a``, ``tar -x``) still changes
    it, and no tool can set it; a scan copied or restored elsewhere is a new identity (re-cropped, never stale)."""
    path = Path(path)
    # the data file beside the path as given, where the reader looks: a symlinked header's data is beside the link,
    # not beside its target
    data = data_file(path)
    parts: list = []
    for p in (path.resolve(), data.resolve()):
        st = p.stat()
        parts.extend([str(p), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return tuple(parts)


def find_scans(root: str | os.PathLike, subsets: list[str] | None = None) -> dict[str, ScanFile]:
    """Every ``<root>/<subset>/<uid>.mhd``, keyed by series UID; all ``subset*`` folders when none named."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    if subsets:  # a folder named twice (subset0 ./subset0) is one folder, not each scan found twice
        unique: dict[Path, Path] = {}
        for name in subsets:
            plain = os.path.normpath(name)  # the tables record the folder's name alone
            if plain in (".", "..") or Path(plain).name != plain:
                raise ValueError(f"subset {name!r}: a subset is the name of a folder directly under {root} (like "
                                 "subset0), not a path")
            unique.setdefault((root / name).resolve(), root / name)
        folders = list(unique.values())
        for folder in folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: subset folder not found")
    else:
        folders = sorted(p for p in root.glob("subset*") if p.is_dir())
    scans: dict[str, ScanFile] = {}
    for folder in folders:
        # not hidden files: a copy through macOS leaves a ._<uid>.mhd beside each scan (AppleDouble), which would
        # count as a scan (splits.tsv, the FROC divisor) and be read by nothing; nor a folder named <uid>.mhd
        found = sorted(mhd for mhd in folder.glob("*.mhd") if not mhd.name.startswith(".") and mhd.is_file())
        if not found:
            raise FileNotFoundError(f"{folder}: no <series_uid>.mhd scan in this subset folder{_why_no_scans(folder)}")
        for mhd in found:
            uid = mhd.stem
            if uid in scans:
                raise ValueError(f"{mhd}: series {uid} also found at {scans[uid].path}")
            scans[uid] = ScanFile(uid, folder.name, mhd)
    return scans


def _why_no_scans(folder: Path) -> str:
    """A hint for a subset folder without scans: how downloads are usually mangled."""
    other_case = [p for p in folder.glob("*") if p.suffix.lower() == ".mhd" and p.suffix != ".mhd"
                  and not p.name.startswith(".")]
    if other_case:
        return f" (it holds {len(other_case)} {other_case[0].suffix} file(s): the extension must be .mhd, lower case)"
    nested = sorted(p.parent for p in folder.glob("*/*.mhd") if not p.name.startswith("."))
    if nested:
        return f" (its subfolder {nested[0]} holds .mhd files: move them up one level)"
    return ""
