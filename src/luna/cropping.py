"""Cut fixed-size int16 crops out of a CT volume (pure numpy), by the border rule of docs/design.md.

The pure part of the crop stage (luna.crops): no I/O, so tests and benchmarks cut crops with it directly.
Border rule, per axis, with ``c`` the centre's voxel index, ``w`` the crop width and ``n`` the scan size::

    crop_start = clamp(c - w // 2, min(0, n - w), max(0, n - w))

Where the scan is at least as large as the crop this shifts the crop inside the scan (the book's rule); where
it is smaller, the whole scan lies inside the crop and the voxels outside the scan hold the window minimum.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from luna.geometry import Geometry, is_inside, xyz_to_irc

DEFAULT_CROP_SHAPE = (32, 48, 48)
MIN_CROP_SIZE = 16  # LunaModel's four 2x max-pools: every axis needs >= 16 voxels to keep >= 1 after the last block
DEFAULT_HU_WINDOW = (-1000, 1000)

_INT16 = np.iinfo(np.int16)


def crop_start(center_irc: np.ndarray, crop_shape: Sequence[int], scan_shape: Sequence[int]) -> np.ndarray:
    """Where a crop starts in the scan, per the border rule; works on (3,) or (N, 3) centres, returns int64.

    ``clamp(c - w//2, min(0, n - w), max(0, n - w))``: shifted inside the scan where it fits, the scan
    centred-as-possible inside the crop where the scan is smaller (start may then be negative).
    """
    c = np.asarray(center_irc, dtype=np.int64)
    w = np.asarray(crop_shape, dtype=np.int64)
    n = np.asarray(scan_shape, dtype=np.int64)
    return np.clip(c - w // 2, np.minimum(0, n - w), np.maximum(0, n - w))


def check_window(hu_window: Sequence[int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in hu_window)
    if not (_INT16.min <= lo < hi <= _INT16.max):
        raise ValueError(f"HU window must be two int16 values lo < hi, got {list(hu_window)}")
    return lo, hi


def cut_crop(
    volume: np.ndarray,
    start_irc: Sequence[int],
    crop_shape: Sequence[int],
    hu_window: Sequence[int] = DEFAULT_HU_WINDOW,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One int16 crop of ``crop_shape`` starting at ``start_irc`` (may reach outside the scan).

    HU are clipped to the window; voxels outside the scan get the window's minimum (air, -1000 by default).
    ``out`` (int16, crop_shape) is filled in place when given, to avoid an allocation per crop.
    """
    lo_hu, hi_hu = check_window(hu_window)
    shape = tuple(int(v) for v in crop_shape)
    if out is None:
        out = np.empty(shape, dtype=np.int16)
    elif out.shape != shape or out.dtype != np.int16:
        raise ValueError(f"out must be int16 {shape}, got {out.dtype} {out.shape}")
    start = np.asarray(start_irc, dtype=np.int64)
    size = np.asarray(volume.shape, dtype=np.int64)
    width = np.asarray(shape, dtype=np.int64)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + width, size)
    if np.all(src_lo == start) and np.all(src_hi == start + width):  # wholly inside: one clipped copy
        np.clip(volume[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))], lo_hu, hi_hu, out=out)
        return out
    out.fill(lo_hu)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(src_lo, src_hi, start))
        src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        np.clip(volume[src], lo_hu, hi_hu, out=out[dst])
    return out


def cut_scan_crops(
    volume: np.ndarray,
    geometry: Geometry,
    centers_xyz: np.ndarray,
    crop_shape: Sequence[int] = DEFAULT_CROP_SHAPE,
    hu_window: Sequence[int] = DEFAULT_HU_WINDOW,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All crops of one scan.

    Returns ``(crops, center_irc, start_irc, inside)``: ``center_irc`` and ``start_irc`` are int64 (N, 3) for
    every centre; ``inside`` (N,) bool is False where any index of the centre is < 0 or >= the scan size;
    ``crops`` is int16 (inside.sum(), *crop_shape), one crop per inside centre, in the order given.
    """
    centers = np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(centers)):
        raise ValueError("candidate centres must be finite")
    lo_hu, hi_hu = check_window(hu_window)
    shape = tuple(int(v) for v in crop_shape)
    center_irc = xyz_to_irc(centers, geometry)
    inside = is_inside(center_irc, volume.shape)
    start_irc = crop_start(center_irc, shape, volume.shape)
    rows = np.flatnonzero(inside)
    crops = np.empty((len(rows), *shape), dtype=np.int16)
    wholly_inside = np.all((start_irc >= 0) & (start_irc + shape <= np.asarray(volume.shape)), axis=1)
    (w0, w1, w2) = shape
    # plain copies first, then one clip over all crops: several times faster than clipping crop by crop
    for k, row in enumerate(rows):
        if wholly_inside[row]:
            s0, s1, s2 = (int(v) for v in start_irc[row])
            crops[k] = volume[s0:s0 + w0, s1:s1 + w1, s2:s2 + w2]
        else:
            cut_crop(volume, start_irc[row], shape, (lo_hu, hi_hu), out=crops[k])
    np.clip(crops, lo_hu, hi_hu, out=crops)
    return crops, center_irc, start_irc, inside
