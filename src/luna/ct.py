"""Read and write LUNA16 scans (MetaImage ``.mhd`` + ``.raw``/``.zraw``); the only SimpleITK importer.

A scan is an int16 Hounsfield volume indexed (I, R, C) = (z, y, x) plus its :class:`Geometry`.
Every failure is a :class:`ScanError` whose one-line message names the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna.geometry import Geometry

_DTYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


class ScanError(ValueError):
    """A scan that cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class ScanFile:
    """A scan found on disk: its series UID, subset folder name and ``.mhd`` path."""

    series_uid: str
    subset: str
    path: Path


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header, checked for the keys a scan needs."""
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: scan header not found")
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise ScanError(f"{path}: cannot read header ({exc.strerror})") from exc
    header: dict[str, str] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if "=" not in line:
            raise ScanError(f"{path}:{line_no}: unreadable header line {line.strip()[:60]!r}")
        key, value = line.split("=", 1)
        header[key.strip()] = value.strip()
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise ScanError(f"{path}: unreadable header, no {key} line")
    if header["NDims"] != "3":
        raise ScanError(f"{path}: expected a 3-D scan, header says NDims = {header['NDims']}")
    return header


def data_file(path: str | os.PathLike, header: dict[str, str] | None = None) -> Path:
    """The voxel data file (``.raw``/``.zraw``) a header points to."""
    path = Path(path)
    header = header or read_header(path)
    name = header["ElementDataFile"]
    if name.upper() == "LOCAL":
        return path
    return path.parent / name


def check_scan_files(path: str | os.PathLike) -> dict[str, str]:
    """Fail with a one-line error before SimpleITK does: missing or truncated data file, bad header."""
    path = Path(path)
    header = read_header(path)
    data = data_file(path, header)
    if not data.is_file():
        raise ScanError(f"{path}: voxel data file {data.name} is missing")
    try:
        dims = [int(v) for v in header["DimSize"].split()]
    except ValueError as exc:
        raise ScanError(f"{path}: unreadable header, DimSize = {header['DimSize']!r}") from exc
    if len(dims) != 3 or min(dims) <= 0:
        raise ScanError(f"{path}: unreadable header, DimSize = {header['DimSize']!r}")
    compressed = header.get("CompressedData", "False").lower() == "true"
    if compressed and "CompressedDataSize" in header and data != path:
        try:
            expected_z = int(header["CompressedDataSize"])
        except ValueError as exc:
            raise ScanError(f"{path}: unreadable header, CompressedDataSize = {header['CompressedDataSize']!r}") from exc
        actual_z = data.stat().st_size
        if actual_z < expected_z:
            raise ScanError(f"{data}: truncated voxel data, {actual_z} bytes where {expected_z} are needed")
    if not compressed and data != path:
        nbytes = _DTYPE_BYTES.get(header["ElementType"])
        if nbytes is None:
            raise ScanError(f"{path}: unsupported ElementType {header['ElementType']}")
        expected = int(np.prod(dims)) * nbytes
        actual = data.stat().st_size
        if actual < expected:
            raise ScanError(f"{data}: truncated voxel data, {actual} bytes where {expected} are needed")
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


def read_geometry(path: str | os.PathLike) -> tuple[Geometry, tuple[int, int, int]]:
    """Geometry and (I, R, C) shape from the header alone, without reading the voxels."""
    path = Path(path)
    check_scan_files(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _sitk_error(path, exc) from exc
    geometry = Geometry(reader.GetOrigin(), reader.GetSpacing(), np.reshape(reader.GetDirection(), (3, 3)))
    size_xyz = reader.GetSize()
    return geometry, (int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0]))


def read_scan(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a scan: int16 HU volume (I, R, C) = (z, y, x) and its geometry."""
    path = Path(path)
    check_scan_files(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _sitk_error(path, exc) from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(f"{path}: expected a 3-D single-channel scan")
    if image.GetPixelID() == sitk.sitkInt16:
        volume = np.asarray(_ImageBuffer(image))  # read-only view, no second copy of the scan
    else:
        volume = np.clip(np.rint(sitk.GetArrayFromImage(image)), -32768, 32767).astype(np.int16)
    geometry = Geometry(image.GetOrigin(), image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)))
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
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        data_name = read_header(tmp)["ElementDataFile"]
        os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp, path)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()


def scan_identity(path: str | os.PathLike) -> tuple:
    """What identifies a scan's content for caching: resolved paths, sizes and mtimes of header and data."""
    path = Path(path).resolve()
    data = data_file(path)
    parts: list = []
    for p in (path, data):
        st = p.stat()
        parts.extend([str(p), st.st_size, st.st_mtime_ns])
    return tuple(parts)


def find_scans(root: str | os.PathLike, subsets: list[str] | None = None) -> dict[str, ScanFile]:
    """Every ``<root>/<subset>/<uid>.mhd``, keyed by series UID; all ``subset*`` folders when none named."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    if subsets:
        folders = [root / s for s in subsets]
        for folder in folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: subset folder not found")
    else:
        folders = sorted(p for p in root.glob("subset*") if p.is_dir())
    scans: dict[str, ScanFile] = {}
    for folder in folders:
        for mhd in sorted(folder.glob("*.mhd")):
            uid = mhd.stem
            if uid in scans:
                raise ValueError(f"{mhd}: series {uid} also found at {scans[uid].path}")
            scans[uid] = ScanFile(uid, folder.name, mhd)
    return scans
