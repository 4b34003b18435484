"""The analytic chest of one scan: scan geometry and anatomy parameters drawn from the scan's RNG
(:class:`_Anatomy`), the lung depth function that rendering, nodule placement and vessel growth all use, smooth
lung texture, and branching vessel trees grown from each hilum. Anatomy is defined in a canonical frame
(identity direction, spine at high row index); a flipped scan stores the same anatomy with x and y reversed and
the direction ``diag(-1, -1, 1)``, so world coordinates stay consistent. Because it is analytic, any slab of
slices can be evaluated on its own, which is what lets rendering work slab by slab.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from luna.geometry import Geometry
from luna.synth.config import ScanPlan, SynthConfig


# ----------------------------------------------------------------------------------------------------------
# Anatomy (canonical frame: u = x, v = y (posterior +), w = z (head +), mm; body centre at u = v = 0)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Anatomy:
    shape: tuple[int, int, int]
    sz: float
    sp: float
    rc: float  # row of the body centre (continuous voxel index)
    cc: float  # column of the body centre
    origin_xyz: tuple[float, float, float]  # canonical (identity-direction) origin
    flipped: bool
    circular_fov: bool
    contrast: bool
    body_a: float
    body_b: float
    body_wobble: float
    body_wavelength: float
    body_phase: float
    fat_mm: float
    muscle_mm: float
    rib_mm: float
    cav_a: float
    cav_b: float
    lung_cx: float
    lung_cy: float
    lung_ax: float
    lung_ay: float
    lung_zc: float
    lung_h: float
    diaphragm_mm: float
    heart_u: float
    heart_v: float
    heart_a: float
    heart_b: float
    heart_zc: float
    heart_h: float
    spine_v: float
    spine_r: float
    disc_period: float
    disc_phase: float
    aorta_u: float
    aorta_v: float
    aorta_r: float
    trachea_v: float
    trachea_r: float
    carina_w: float
    rib_period: float
    rib_phase: float
    rib_slope: float
    rib_half_h: float
    fat_hu: float
    muscle_hu: float
    inner_hu: float
    blood_hu: float
    vessel_hu: float
    marrow_hu: float
    cortex_hu: float
    cartilage_hu: float
    lung_hu: float
    lung_texture_hu: float
    lung_gravity_hu: float
    noise_hu: float

    @property
    def extent_w(self) -> float:
        return self.shape[0] * self.sz

    def irc_from_uvw(self, uvw: np.ndarray) -> np.ndarray:
        """Canonical continuous voxel index (i, r, c) of canonical mm points (..., 3) in (u, v, w)."""
        uvw = np.asarray(uvw, dtype=np.float64)
        return np.stack([uvw[..., 2] / self.sz, self.rc + uvw[..., 1] / self.sp, self.cc + uvw[..., 0] / self.sp], -1)

    def uvw_from_irc(self, irc: np.ndarray) -> np.ndarray:
        irc = np.asarray(irc, dtype=np.float64)
        return np.stack([(irc[..., 2] - self.cc) * self.sp, (irc[..., 1] - self.rc) * self.sp,
                         irc[..., 0] * self.sz], -1)

    def geometry(self) -> Geometry:
        """The geometry the scan is written with (flipped scans: x/y reversed, origin at the far corner)."""
        ox, oy, oz = self.origin_xyz
        if not self.flipped:
            return Geometry((ox, oy, oz), (self.sp, self.sp, self.sz), np.eye(3))
        n = self.shape[1]
        return Geometry((ox + (n - 1) * self.sp, oy + (n - 1) * self.sp, oz), (self.sp, self.sp, self.sz),
                        np.diag([-1.0, -1.0, 1.0]))

    def stored_irc(self, canonical_irc: np.ndarray) -> np.ndarray:
        """Index in the stored (possibly flipped) volume of a canonical index."""
        irc = np.array(canonical_irc, dtype=np.float64)
        if self.flipped:
            n = self.shape[1]
            irc[..., 1] = (n - 1) - irc[..., 1]
            irc[..., 2] = (n - 1) - irc[..., 2]
        return irc


def _sample_anatomy(rng: np.random.Generator, plan: ScanPlan, config: SynthConfig) -> _Anatomy:
    """Scan geometry and the parameters of the analytic chest (all sizes scale with the field of view)."""
    xy_min, xy_max, z_min, z_max = config.size_ranges()
    n = int(rng.integers(xy_min, xy_max + 1))
    fov_lo = math.ceil(config.spacing_xy_min_mm * 512 - 1e-9)
    fov_hi = max(fov_lo, math.floor(config.spacing_xy_max_mm * 512 + 1e-9))
    sp = int(rng.integers(fov_lo, fov_hi + 1)) / 512.0  # as scanners do: reconstruction FOV / 512
    sz = float(rng.choice(np.asarray(config.slice_thicknesses_mm)))
    n_slices = max(8, int(round(float(rng.uniform(z_min, z_max)) / sz)))
    extent = n_slices * sz
    fov = n * sp
    a = float(rng.uniform(0.80, 0.92)) * fov / 2
    b = a * float(rng.uniform(0.66, 0.80))
    cc = (n - 1) / 2 + float(rng.uniform(-0.02, 0.02)) * n
    rc = (n - 1) / 2 + float(rng.uniform(-0.02, 0.04)) * n
    k = a / 170.0  # 1 for an adult-sized chest
    fat = float(rng.uniform(4, 18)) * k + 1.0
    muscle = float(rng.uniform(8, 14)) * k
    rib = max(4.0, float(rng.uniform(8, 11)) * k)
    wall = fat + muscle + rib + 1.0
    cav_a, cav_b = a - wall, b - wall
    lung_len = float(rng.uniform(220, 280))
    if extent < 0.9 * lung_len:  # a slab through the lungs
        lung_zc = extent / 2 + float(rng.uniform(-0.1, 0.1)) * extent
    else:  # the whole chest: apex 10-40 mm below the top
        lung_zc = extent - float(rng.uniform(10, 40)) - lung_len / 2
    lung_h = lung_len / 2
    spine_r = 0.13 * cav_a
    spine_v = cav_b - 0.9 * spine_r
    origin = (round(float(rng.uniform(-250, -150)), 2), round(float(rng.uniform(-250, -150)), 2),
              round(float(rng.uniform(-380, 120)), 2))
    contrast = plan.contrast
    return _Anatomy(
        shape=(n_slices, n, n), sz=sz, sp=sp, rc=rc, cc=cc, origin_xyz=origin, flipped=plan.flipped,
        circular_fov=plan.circular_fov, contrast=contrast,
        body_a=a, body_b=b, body_wobble=float(rng.uniform(0.0, 0.03)), body_wavelength=float(rng.uniform(150, 400)),
        body_phase=float(rng.uniform(0, 2 * math.pi)), fat_mm=fat, muscle_mm=muscle, rib_mm=rib,
        cav_a=cav_a, cav_b=cav_b, lung_cx=0.55 * cav_a, lung_cy=0.05 * cav_b, lung_ax=0.44 * cav_a,
        lung_ay=0.92 * cav_b, lung_zc=lung_zc, lung_h=lung_h, diaphragm_mm=float(rng.uniform(0.25, 0.4)) * lung_h,
        heart_u=0.12 * cav_a, heart_v=-0.30 * cav_b, heart_a=0.36 * cav_a, heart_b=0.42 * cav_b,
        heart_zc=lung_zc - 0.45 * lung_h, heart_h=0.42 * lung_h,
        spine_v=spine_v, spine_r=spine_r, disc_period=float(rng.uniform(24, 30)), disc_phase=float(rng.uniform(0, 30)),
        aorta_u=0.22 * cav_a, aorta_v=spine_v - 0.9 * spine_r, aorta_r=0.09 * cav_a,
        trachea_v=-0.05 * cav_b, trachea_r=0.07 * cav_a, carina_w=lung_zc + 0.15 * lung_h,
        rib_period=float(rng.uniform(22, 30)), rib_phase=float(rng.uniform(0, 30)),
        rib_slope=float(rng.uniform(1.0, 1.6)) * 26.0 / (0.8 * math.pi * (a + b) / 2),
        rib_half_h=float(rng.uniform(4.0, 6.0)) * max(0.6, min(1.0, k)),
        fat_hu=float(rng.uniform(-110, -85)), muscle_hu=float(rng.uniform(35, 55)), inner_hu=float(rng.uniform(20, 45)),
        blood_hu=float(rng.uniform(180, 300)) if contrast else float(rng.uniform(30, 50)),
        vessel_hu=float(rng.uniform(170, 230)) if contrast else float(rng.uniform(30, 50)),
        marrow_hu=float(rng.uniform(220, 350)), cortex_hu=float(rng.uniform(600, 950)),
        cartilage_hu=float(rng.uniform(100, 200)),
        lung_hu=config.lung_hu + float(rng.normal(0, 10)), lung_texture_hu=float(rng.uniform(20, 30)),
        lung_gravity_hu=float(rng.uniform(20, 50)), noise_hu=config.noise_hu * float(rng.uniform(0.85, 1.15)),
    )


def _lung_profile(a: _Anatomy, w: np.ndarray) -> np.ndarray:
    """Relative in-plane size of the lungs at height w: a dome at the apex, flatter towards the base."""
    t = (np.asarray(w, dtype=np.float32) - np.float32(a.lung_zc)) / np.float32(a.lung_h)
    up = np.sqrt(np.clip(1 - t * t, 0, None))
    down = np.sqrt(np.sqrt(np.clip(1 - t ** 4, 0, None)))
    return np.maximum(np.where(t > 0, up, down), np.float32(1e-3))


def _lung_depth(a: _Anatomy, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Approximate depth inside the lungs in mm (> 0 inside, < 0 outside) at broadcastable u, v, w.

    Two superellipses (symmetric in |u|) tapered along z, cut by the chest cavity, the heart, the spine,
    the aorta and the diaphragm dome. Used for rendering, nodule placement and vessel growth alike.
    """
    f32 = np.float32
    s = _lung_profile(a, w)
    du = np.abs(np.abs(u) - f32(a.lung_cx)) / (f32(a.lung_ax) * s)
    dv = np.abs(v - f32(a.lung_cy)) / (f32(a.lung_ay) * s)
    q = np.cbrt(du * du * du + dv * dv * dv)
    g = (1 - q) * (s * f32(min(a.lung_ax, a.lung_ay)))
    rho_c = np.sqrt((u / f32(a.cav_a)) ** 2 + (v / f32(a.cav_b)) ** 2)
    g = np.minimum(g, (1 - rho_c) * f32(min(a.cav_a, a.cav_b)))
    th = (np.asarray(w, dtype=np.float32) - f32(a.heart_zc)) / f32(a.heart_h)
    sh = np.maximum(np.sqrt(np.clip(1 - th * th, 0, None)), f32(1e-3))
    rho_h = np.sqrt(((u - f32(a.heart_u)) / (f32(a.heart_a) * sh)) ** 2
                    + ((v - f32(a.heart_v)) / (f32(a.heart_b) * sh)) ** 2)
    g = np.minimum(g, (rho_h - 1) * (sh * f32(min(a.heart_a, a.heart_b))) - 1)
    g = np.minimum(g, np.sqrt(u * u + (v - f32(a.spine_v)) ** 2) - f32(a.spine_r + 2))
    g = np.minimum(g, np.sqrt((u - f32(a.aorta_u)) ** 2 + (v - f32(a.aorta_v)) ** 2) - f32(a.aorta_r + 1.5))
    base = f32(a.lung_zc - a.lung_h)
    qc = np.minimum(q, 1)
    g = np.minimum(g, (np.asarray(w, dtype=np.float32) - base) - f32(a.diaphragm_mm) * (1 - qc * qc))
    return g


def _lung_depth_points(a: _Anatomy, uvw: np.ndarray) -> np.ndarray:
    uvw = np.asarray(uvw, dtype=np.float32).reshape(-1, 3)
    return _lung_depth(a, uvw[:, 0], uvw[:, 1], uvw[:, 2]).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Texture: smooth low-resolution noise, upsampled per slab
# ----------------------------------------------------------------------------------------------------------

class _Texture:
    """Gaussian-like smooth noise (std 1, ~6 mm correlation) on a 4 mm grid, linearly interpolated."""

    GRID_MM = 4.0

    def __init__(self, rng: np.random.Generator, a: _Anatomy) -> None:
        z, n, _ = a.shape
        nz = int(math.ceil(z * a.sz / self.GRID_MM)) + 3
        nxy = int(math.ceil(n * a.sp / self.GRID_MM)) + 3
        low = rng.standard_normal((nz, nxy, nxy)).astype(np.float32)
        kernel = np.array([1, 4, 6, 4, 1], dtype=np.float32) / 16
        for _ in range(2):
            for axis in range(3):
                low = _convolve_axis(low, kernel, axis)
        low /= max(float(low.std()), 1e-6)
        self.low = low
        self.sz_g = a.sz / self.GRID_MM
        pos = np.arange(n) * (a.sp / self.GRID_MM)
        i0 = np.floor(pos).astype(np.intp)
        frac = (pos - i0).astype(np.float32)
        interp = np.zeros((n, nxy), dtype=np.float32)  # linear interpolation as a matrix
        interp[np.arange(n), i0] = 1 - frac
        interp[np.arange(n), i0 + 1] = frac
        self.interp = interp

    def sample(self, k0: int, k1: int) -> np.ndarray:
        pos = np.arange(k0, k1) * self.sz_g
        iz = np.floor(pos).astype(np.intp)
        fz = (pos - iz).astype(np.float32)[:, None, None]
        t = self.low[iz] * (1 - fz) + self.low[iz + 1] * fz
        # einsum without BLAS: multithreaded OpenBLAS on small matrices thrashes on busy machines (100x slower)
        t = np.einsum("zyj,xj->zyx", t, self.interp)
        return np.einsum("yj,zjx->zyx", self.interp, t)


def _convolve_axis(arr: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    half = len(kernel) // 2
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (half, half)
    p = np.pad(arr, pad, mode="reflect")
    out = np.zeros_like(arr)
    n = arr.shape[axis]
    for j, kv in enumerate(kernel):
        out += kv * np.take(p, np.arange(j, j + n), axis=axis)
    return out


# ----------------------------------------------------------------------------------------------------------
# Vessels: branching tapered tubes grown from each hilum
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Vessels:
    segments: np.ndarray  # (S, 8): u0 v0 w0 u1 v1 w1 r0 r1 (mm)
    samples: np.ndarray  # (M, 4): u v w r along centrelines
    branches: np.ndarray  # (B, 3): bifurcation points


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(math.sqrt(float(v.dot(v))), 1e-9)  # np.linalg.norm's own sum for a vector, without its overhead


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    e = rng.standard_normal(3)
    e -= e.dot(d) * d
    return _unit(e)


def _grow_vessels(rng: np.random.Generator, a: _Anatomy, max_segments: int = 12000) -> _Vessels:
    """Vessel trees from the medial side of each lung, every ~22 mm in z (3-4 mm near the hilum, 1.8-3 mm
    elsewhere), tapering to 0.5 mm and bifurcating outwards.

    Segment lengths scale with the lung's size; a branch that would leave the lung is steered back
    (the best of a few random turns) and ends only when no turn keeps it inside.
    """
    segments: list[tuple[float, ...]] = []
    n_samples: list[int] = []  # centreline samples of each segment, every <= 1.5 mm
    branches: list[np.ndarray] = []
    queue: deque = deque()
    extent = a.extent_w
    scale = min(1.2, max(0.4, a.lung_ax / 60.0))  # 1 for an adult lung
    spacing = float(rng.uniform(18, 26))
    # two trees per root in a small lung, four in an adult-sized one
    starts = [(-0.5, 0.0), (0.5, 0.0)] if scale < 0.75 else [(-0.6, -0.4), (0.6, -0.4), (-0.6, 0.4), (0.6, 0.4)]
    levels = np.arange(spacing / 2, extent, spacing)
    levels = levels + rng.uniform(-4, 4, len(levels))
    for side in (-1.0, 1.0):
        for w0 in levels:
            s_w = float(_lung_profile(a, np.array([w0]))[0])
            root = np.array([side * (a.lung_cx - 0.6 * a.lung_ax * s_w),
                             a.lung_cy + float(rng.normal(0, 0.15)) * a.lung_ay, w0])
            for _ in range(40):  # move laterally until inside the lung
                if _lung_depth_points(a, root)[0] > 2.0:
                    break
                root[0] += side * 1.5
            else:
                continue
            near_hilum = abs(w0 - a.lung_zc) < 0.25 * a.lung_h
            r0 = float(rng.uniform(3.0, 4.0)) if near_hilum else float(rng.uniform(1.8, 3.0))
            for dv, dw in starts:
                d = _unit(np.array([side, dv + rng.normal(0, 0.3), dw + rng.normal(0, 0.6)]))
                queue.append((root.copy(), d, r0 * float(rng.uniform(0.8, 1.0)), root - np.array([side * 10.0, 0, 0])))
    max_segments = min(max_segments, 80 * len(queue) + 500)
    turns = np.array([0.12, 0.5, 1.0, 1.5, 2.0])
    while queue and len(segments) < max_segments:  # one wave (generation) at a time, vectorised
        wave = list(queue)[: max_segments - len(segments)]
        queue.clear()
        n = len(wave)
        pos = np.array([w[0] for w in wave])
        dirs = np.array([w[1] for w in wave])
        radii = np.array([w[2] for w in wave])
        lengths = np.minimum(25.0, radii * rng.uniform(3, 6, n) * scale + rng.uniform(1, 2, n))
        trial = dirs[:, None, :] + rng.normal(0, 1, (n, len(turns), 3)) * turns[None, :, None]
        trial /= np.linalg.norm(trial, axis=2, keepdims=True)
        ends = pos[:, None, :] + trial * lengths[:, None, None]
        g = _lung_depth_points(a, ends.reshape(-1, 3)).reshape(n, len(turns))
        good = g > np.maximum(radii, 0.5)[:, None]
        pick = np.where(good.any(axis=1), good.argmax(axis=1), g.argmax(axis=1))
        for i in range(n):
            j = pick[i]
            if g[i, j] <= 0.5:
                continue
            p, d, r, root = pos[i], trial[i, j], radii[i], wave[i][3]
            p1 = ends[i, j]
            r1 = r * 0.95
            segments.append((*p, *p1, r, r1))
            n_samples.append(max(2, int(math.ceil(lengths[i] / 1.5))))
            if r1 < 0.55 or not -10 <= p1[2] <= extent + 10:
                continue
            outward = _unit(p1 - root)
            if rng.random() < 0.75:
                branches.append(p1)
                e = _perpendicular(rng, d)
                for sign, lo, hi, shrink in ((1, 15, 35, (0.75, 0.92)), (-1, 30, 60, (0.55, 0.8))):
                    ang = math.radians(float(rng.uniform(lo, hi)))
                    dc = _unit(math.cos(ang) * d + sign * math.sin(ang) * e + 0.15 * outward)
                    rc = r1 * float(rng.uniform(*shrink))
                    if rc >= 0.5:
                        queue.append((p1, dc, rc, root))
            else:
                queue.append((p1, _unit(d + 0.1 * outward), r1, root))
    segs = np.asarray(segments, dtype=np.float64).reshape(-1, 8)
    return _Vessels(segs, _centreline_samples(segs, np.asarray(n_samples, dtype=np.intp)),
                    np.asarray(branches, dtype=np.float64).reshape(-1, 3))


def _centreline_samples(segments: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(M, 4) points u v w r along each segment, ``counts[s]`` evenly spaced from its start to its end inclusive,
    segment after segment (per segment: ``p0 + t (p1 - p0)``, ``r0 + t (r1 - r0)``, t = linspace(0, 1, n))."""
    out = np.zeros((int(counts.sum()), 4))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
    p0, p1, r0, r1 = segments[:, :3], segments[:, 3:6], segments[:, 6:7], segments[:, 7:8]
    for n in np.unique(counts):
        idx = np.flatnonzero(counts == n)
        t = np.linspace(0, 1, n)[None, :, None]
        rows = offsets[idx, None] + np.arange(n)
        out[rows, :3] = p0[idx, None] + t * (p1[idx] - p0[idx])[:, None]
        out[rows, 3:] = r0[idx, None] + t * (r1[idx] - r0[idx])[:, None]
    return out
