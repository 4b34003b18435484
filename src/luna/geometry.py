"""World (x, y, z mm) <-> voxel index (i, r, c) = (z, y, x) transforms for any direction matrix.

The book's ``xyz2irc`` multiplies by the inverse direction on the wrong side, which is only correct for
symmetric direction matrices. Here ``xyz = origin + direction @ (spacing * cri)`` and its exact inverse
``cri = inverse(direction) @ (xyz - origin) / spacing`` are used, as SimpleITK and ITK define them.
Rounding to a voxel is ``floor(x + 0.5)`` per axis, as SimpleITK's ``TransformPhysicalPointToIndex``.

A scan's direction must be orthonormal (a rotation or reflection); :class:`Geometry` itself accepts any
non-singular matrix (tests build sheared ones), the check that a scan file's direction is orthonormal is
:func:`orthonormality_error` against :data:`ORTHONORMAL_TOLERANCE`, applied by luna.ct when reading a header.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


# LUNA16 headers write the direction with ~6 decimals (|D^T D - I| ~ 1e-6); a scaled or sheared matrix is far off
ORTHONORMAL_TOLERANCE = 1e-4


def orthonormality_error(direction: np.ndarray) -> float:
    """``max |D^T D - I|`` of a 3x3 direction: 0 for a rotation or reflection; inf when not finite."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(d)):
        return float("inf")
    return float(np.max(np.abs(d.T @ d - np.eye(3))))


@dataclass(frozen=True)
class Geometry:
    """Where a scan's voxel grid sits in world space (all in x, y, z order, millimetres)."""

    origin_xyz: np.ndarray
    spacing_xyz: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        origin = np.asarray(self.origin_xyz, dtype=np.float64).reshape(3)
        spacing = np.asarray(self.spacing_xyz, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.all(np.isfinite(origin)):
            raise ValueError(f"origin must be finite, got {origin.tolist()}")
        if not np.all(spacing > 0):
            raise ValueError(f"spacing must be positive, got {spacing.tolist()}")
        if abs(np.linalg.det(direction)) < 1e-6:
            raise ValueError(f"direction matrix is singular: {direction.tolist()}")
        object.__setattr__(self, "origin_xyz", origin)
        object.__setattr__(self, "spacing_xyz", spacing)
        object.__setattr__(self, "direction", direction)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (
            np.array_equal(self.origin_xyz, other.origin_xyz)
            and np.array_equal(self.spacing_xyz, other.spacing_xyz)
            and np.array_equal(self.direction, other.direction)
        )

    def __hash__(self) -> int:
        return hash((self.origin_xyz.tobytes(), self.spacing_xyz.tobytes(), self.direction.tobytes()))

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists, for JSON/HDF5 attributes."""
        return {
            "origin_xyz": self.origin_xyz.tolist(),
            "spacing_xyz": self.spacing_xyz.tolist(),
            "direction": self.direction.reshape(9).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["origin_xyz"], d["spacing_xyz"], np.asarray(d["direction"]).reshape(3, 3))


@functools.lru_cache(maxsize=4096)
def _itk_physical_to_index(spacing_bytes: bytes, direction_bytes: bytes) -> np.ndarray:
    """ITK's ``inv(D diag(S))``, read back from SimpleITK (column j = the continuous index of the unit vector e_j
    with the origin at 0, exact as the other products are by zero). ITK inverts by SVD, which leaves last-bit
    noise in the matrix of a permuted (x/y-swapped) or oblique direction; numpy's exact inverse then sent ~10%
    of half-voxel points to the other voxel. Diagonal directions (identity, flips: LUNA16) are exact either way."""
    spacing = np.frombuffer(spacing_bytes, dtype=np.float64)
    direction = np.frombuffer(direction_bytes, dtype=np.float64).reshape(3, 3)
    if np.count_nonzero(direction - np.diag(np.diag(direction))) == 0:
        return np.linalg.inv(direction * spacing)  # D @ diag(S): column j scaled by S[j]; diagonal: exact
    import SimpleITK as sitk  # noqa: PLC0415  (only for non-diagonal directions)

    probe = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    probe.SetSpacing(spacing.tolist())
    probe.SetDirection(direction.reshape(9).tolist())
    columns = [probe.TransformPhysicalPointToContinuousIndex(unit.tolist()) for unit in np.eye(3)]
    return np.array(columns, dtype=np.float64).T


def xyz_to_irc_continuous(xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World mm (..., 3) in x, y, z -> continuous voxel index (..., 3) in i, r, c order."""
    xyz = np.asarray(xyz, dtype=np.float64)
    offset = xyz - geometry.origin_xyz
    # As ITK's TransformPhysicalPointToIndex, to the last bit where it matters (a point on a voxel boundary, e.g.
    # a centre given at half-voxel precision, rounds to the same voxel as SimpleITK): ITK's own matrix
    # inv(D diag(S)), each index a left-to-right sum of three products.
    m = _itk_physical_to_index(geometry.spacing_xyz.tobytes(), geometry.direction.tobytes())
    cri = np.stack([m[k, 0] * offset[..., 0] + m[k, 1] * offset[..., 1] + m[k, 2] * offset[..., 2]
                    for k in range(3)], axis=-1)
    return cri[..., ::-1]


def xyz_to_irc(xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World mm (..., 3) -> nearest voxel index (..., 3) int64 in i, r, c order (SimpleITK's rounding).

    Indices are capped at +-2**31 (a point that far is outside any scan; 1e300 mm must not overflow the cast)."""
    return np.clip(np.floor(xyz_to_irc_continuous(xyz, geometry) + 0.5), -2**31, 2**31).astype(np.int64)


def irc_to_xyz(irc: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Voxel index (..., 3) in i, r, c order (integer or continuous) -> world mm (..., 3) in x, y, z."""
    cri = np.asarray(irc, dtype=np.float64)[..., ::-1]
    return geometry.origin_xyz + (cri * geometry.spacing_xyz) @ geometry.direction.T


def is_inside(irc: np.ndarray, shape_irc: tuple[int, int, int]) -> np.ndarray:
    """True where every index of irc (..., 3) lies in [0, size) of the scan's (i, r, c) shape."""
    irc = np.asarray(irc)
    shape = np.asarray(shape_irc)
    return np.all((irc >= 0) & (irc < shape), axis=-1)
