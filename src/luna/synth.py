"""Synthetic LUNA16-format data set: chest-CT-like scans, CAD-style candidates and nodule annotations.

Writes ``<root>/subsetK/<seriesuid>.mhd + .raw`` and ``candidates.csv``, ``annotations.csv``,
``annotations_excluded.csv``, ``seriesuids.csv`` in exactly LUNA16's formats (same headers, CRLF line ends,
numbers formatted as the official tables), so the rest of the pipeline cannot tell it from the real thing.

Why synthetic: LUNA16 is 120 GB behind a registration wall; the default workflow and the tests need a data
set that is small, fast, free and deterministic, yet has the properties that make the task learnable and
not trivial: nodules of realistic size and density inside lungs with vessels, and hard negatives on
vessels, branchings, the chest wall and the parenchyma.

Every scan is built from its own seed-derived RNG (``SeedSequence(seed, spawn_key=(1, index))``), so scans
can be made in any order or in parallel and the files are byte-identical for the same config. Volumes are
built with vectorised numpy in slabs of slices (the anatomy is analytic, so any slab can be evaluated on its
own), vessels and nodules on small bounding boxes. Anatomy is defined in a canonical frame (identity
direction, spine at high row index); a flipped scan stores the same anatomy with x and y reversed and the
direction ``diag(-1, -1, 1)``, so world coordinates stay consistent.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from luna import __version__
from luna.ct import write_scan
from luna.geometry import Geometry, irc_to_xyz, is_inside, xyz_to_irc

logger = logging.getLogger(__name__)

CANDIDATES_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "class")
ANNOTATIONS_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
MARKER_NAME = ".luna-synth.json"
FULL_SIZE_XY = 512
FULL_EXTENT_Z_MM = (300.0, 380.0)
MIN_FOV_MM = 60.0  # smallest in-plane field of view (size x spacing) that holds two lungs
NODULE_KINDS = ("solid", "part_solid", "ground_glass", "calcified")
NEGATIVE_KINDS = ("vessel", "large_vessel", "branching", "wall", "parenchyma")
AIR_HU = -1000.0
OUTSIDE_FOV_HU = -2048.0

_EDGE_MM = 0.8  # width of the partial-volume edge of soft objects (nodules, vessels, lung border)
_MAX_LOBE = 1.35  # largest radius of an irregular nodule, relative to its nominal radius
_MIN_LOBE = 0.78  # smallest
_CHUNK_VOXELS = 3_000_000  # voxels rendered at once (bounds memory at full size)


class SynthError(ValueError):
    """Bad synthetic-data configuration or output folder; the message names the key or path."""


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the synthetic data set, with defaults sized for a quick default pipeline."""

    n_subsets: int = _knob(3, "number of subset folders, subset0 .. subset{n-1}")
    scans_per_subset: int = _knob(20, "scans in each subset")
    seed: int = _knob(16, "master seed; the same config gives byte-identical files")
    nodules_per_scan: float = _knob(
        1.4, "mean nodules per scan (LUNA16: 1.34); round(mean x scans) nodules are spread over the scans "
        "at random (multinomial), so some scans have none")
    negatives_per_positive: float = _knob(
        50.0, "negative candidates per positive candidate (LUNA16 has ~400)")
    two_candidate_fraction: float = _knob(
        0.3, "fraction of nodules with two positive candidates instead of one")
    excluded_per_scan: float = _knob(
        2.0, "mean non-nodule findings per scan written to annotations_excluded.csv (Poisson)")
    full_size: bool = _knob(
        False, f"LUNA16-size scans: {FULL_SIZE_XY}x{FULL_SIZE_XY} in-plane, "
        f"{FULL_EXTENT_Z_MM[0]:g}-{FULL_EXTENT_Z_MM[1]:g} mm in z (overrides the size knobs)")
    size_xy_min: int = _knob(192, "smallest in-plane size in voxels (square slices)")
    size_xy_max: int = _knob(256, "largest in-plane size in voxels")
    extent_z_mm_min: float = _knob(100.0, "shortest scan length in z, mm (a slab of the chest)")
    extent_z_mm_max: float = _knob(200.0, "longest scan length in z, mm")
    spacing_xy_min_mm: float = _knob(0.46, "smallest in-plane voxel spacing, mm")
    spacing_xy_max_mm: float = _knob(0.98, "largest in-plane voxel spacing, mm")
    slice_thicknesses_mm: tuple[float, ...] = _knob(
        (1.0, 1.25, 2.0, 2.5), "slice thicknesses (= z spacing) drawn uniformly, mm")
    flip_fraction: float = _knob(
        0.25, "fraction of scans stored x/y-flipped, direction diag(-1,-1,1) (at least one when > 0)")
    fov_fraction: float = _knob(
        0.3, "fraction of scans with a circular field of view and -2048 HU outside it")
    contrast_fraction: float = _knob(
        0.3, "fraction of contrast-enhanced scans (vessels and heart ~+200 HU instead of ~+40)")
    noise_hu: float = _knob(20.0, "standard deviation of the Gaussian image noise, HU (clipped at 3 sigma)")
    lung_hu: float = _knob(-870.0, "mean lung parenchyma density, HU")
    diameter_log_mu: float = _knob(1.99, "nodule diameter: mean of ln(diameter_mm) (LUNA16: 1.99)")
    diameter_log_sigma: float = _knob(0.47, "nodule diameter: standard deviation of ln(diameter_mm)")
    diameter_min_mm: float = _knob(3.0, "smallest nodule diameter, mm (the log-normal is truncated)")
    diameter_max_mm: float = _knob(32.0, "largest nodule diameter, mm")
    part_solid_fraction: float = _knob(0.12, "fraction of part-solid nodules (ground-glass halo, solid core)")
    ground_glass_fraction: float = _knob(0.10, "fraction of pure ground-glass nodules (-700..-300 HU)")
    calcified_fraction: float = _knob(0.08, "fraction of calcified nodules (> +200 HU); the rest are solid")
    juxtapleural_fraction: float = _knob(0.2, "fraction of nodules touching the chest wall")
    juxtavascular_fraction: float = _knob(0.2, "fraction of nodules touching a vessel")
    negative_mix: tuple[float, ...] = _knob(
        (0.30, 0.15, 0.15, 0.20, 0.20), "relative weights of negative candidates on: vessels, nodule-sized "
        "vessel cross-sections (radius >= 1.5 mm), vessel branchings, the chest wall, random parenchyma")
    uid_prefix: str = _knob(
        "1.3.6.1.4.1.14519.5.2.1.6279.6001.", "series UID root; a 30-digit random number follows (as LUNA16)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "slice_thicknesses_mm", tuple(float(v) for v in self.slice_thicknesses_mm))
        object.__setattr__(self, "negative_mix", tuple(float(v) for v in self.negative_mix))

        def bad(key: str, value: Any, why: str) -> SynthError:
            return SynthError(f"synthetic.{key} = {value!r}: {why}")

        for f in fields(self):  # YAML/JSON give 50 for 50.0: store floats as floats, reject strings
            value = getattr(self, f.name)
            if isinstance(f.default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise bad(f.name, value, "must be a number")
                object.__setattr__(self, f.name, float(value))
            elif isinstance(f.default, bool) and not isinstance(value, (bool, np.bool_)):
                raise bad(f.name, value, "must be true or false")
            elif isinstance(f.default, str) and not isinstance(value, str):
                raise bad(f.name, value, "must be a string")

        for key in ("n_subsets", "scans_per_subset", "size_xy_min", "size_xy_max", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise bad(key, value, "must be an integer")
        if self.n_subsets < 1 or self.scans_per_subset < 1:
            raise bad("n_subsets" if self.n_subsets < 1 else "scans_per_subset",
                      min(self.n_subsets, self.scans_per_subset), "must be >= 1")
        if self.seed < 0:
            raise bad("seed", self.seed, "must be >= 0")
        if not 32 <= self.size_xy_min <= self.size_xy_max <= 2048:
            raise bad("size_xy_min", (self.size_xy_min, self.size_xy_max),
                      "need 32 <= size_xy_min <= size_xy_max <= 2048")
        if not 10 <= self.extent_z_mm_min <= self.extent_z_mm_max <= 1000:
            raise bad("extent_z_mm_min", (self.extent_z_mm_min, self.extent_z_mm_max),
                      "need 10 <= extent_z_mm_min <= extent_z_mm_max <= 1000")
        if not 0.1 <= self.spacing_xy_min_mm <= self.spacing_xy_max_mm <= 5:
            raise bad("spacing_xy_min_mm", (self.spacing_xy_min_mm, self.spacing_xy_max_mm),
                      "need 0.1 <= spacing_xy_min_mm <= spacing_xy_max_mm <= 5")
        if not self.full_size and self.size_xy_min * self.spacing_xy_min_mm < MIN_FOV_MM:
            raise bad("size_xy_min", self.size_xy_min,
                      f"with spacing_xy_min_mm = {self.spacing_xy_min_mm:g} the field of view can be "
                      f"{self.size_xy_min * self.spacing_xy_min_mm:.0f} mm, too small for a chest "
                      f"(need >= {MIN_FOV_MM:g} mm)")
        if not self.slice_thicknesses_mm or not all(0.1 <= t <= 10 for t in self.slice_thicknesses_mm):
            raise bad("slice_thicknesses_mm", self.slice_thicknesses_mm, "need one or more values in [0.1, 10]")
        for key in ("two_candidate_fraction", "flip_fraction", "fov_fraction", "contrast_fraction",
                    "part_solid_fraction", "ground_glass_fraction", "calcified_fraction",
                    "juxtapleural_fraction", "juxtavascular_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise bad(key, value, "must be a fraction in [0, 1]")
        if self.part_solid_fraction + self.ground_glass_fraction + self.calcified_fraction > 1.0 + 1e-9:
            raise bad("part_solid_fraction", self.part_solid_fraction, "nodule kind fractions add up to more than 1")
        if self.juxtapleural_fraction + self.juxtavascular_fraction > 1.0 + 1e-9:
            raise bad("juxtapleural_fraction", self.juxtapleural_fraction,
                      "juxtapleural + juxtavascular fractions add up to more than 1")
        for key in ("nodules_per_scan", "negatives_per_positive", "excluded_per_scan", "noise_hu"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise bad(key, value, "must be a finite number >= 0")
        if self.nodules_per_scan > 20:
            raise bad("nodules_per_scan", self.nodules_per_scan, "must be <= 20")
        if not -1000 <= self.lung_hu <= -500:
            raise bad("lung_hu", self.lung_hu, "must lie in [-1000, -500]")
        if not 0 < self.diameter_min_mm < self.diameter_max_mm <= 60:
            raise bad("diameter_min_mm", (self.diameter_min_mm, self.diameter_max_mm),
                      "need 0 < diameter_min_mm < diameter_max_mm <= 60")
        if not self.diameter_log_sigma > 0:
            raise bad("diameter_log_sigma", self.diameter_log_sigma, "must be > 0")
        if len(self.negative_mix) != len(NEGATIVE_KINDS) or min(self.negative_mix) < 0 or sum(self.negative_mix) <= 0:
            raise bad("negative_mix", self.negative_mix,
                      f"need {len(NEGATIVE_KINDS)} weights >= 0 ({', '.join(NEGATIVE_KINDS)}) with a positive sum")
        if not re.fullmatch(r"[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.", self.uid_prefix) or len(self.uid_prefix) > 34:
            raise bad("uid_prefix", self.uid_prefix,
                      "must be a DICOM UID root ending in '.', at most 34 characters (UIDs are <= 64)")

    @property
    def n_scans(self) -> int:
        return self.n_subsets * self.scans_per_subset

    def size_ranges(self) -> tuple[int, int, float, float]:
        """(size_xy_min, size_xy_max, extent_z_mm_min, extent_z_mm_max) in effect (``full_size`` applied)."""
        if self.full_size:
            return FULL_SIZE_XY, FULL_SIZE_XY, FULL_EXTENT_Z_MM[0], FULL_EXTENT_Z_MM[1]
        return self.size_xy_min, self.size_xy_max, self.extent_z_mm_min, self.extent_z_mm_max

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_argv(self) -> list[str]:
        """Command-line options that give this config to :class:`SynthApp` (for rule scripts)."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            option = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(option if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, tuple):
                argv += [option, *(repr(v) for v in value)]
            else:
                argv += [option, repr(value) if isinstance(value, float) else str(value)]
        return argv

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthConfig":
        """From a config mapping (e.g. the workflow's ``synthetic:`` section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SynthError(f"synthetic.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: number formats, samplers, the plan
# ----------------------------------------------------------------------------------------------------------

def format_annotation_mm(value: float) -> str:
    """A number as the official annotation tables write it: 10 significant digits, no trailing zeros.

    Reproduces every number of LUNA16's annotations.csv and annotations_excluded.csv.
    """
    text = np.format_float_positional(float(value), precision=10, unique=False, fractional=False, trim="-")
    return "0" if text == "-0" else text


def format_candidate_mm(value: float) -> str:
    """A coordinate as LUNA16's candidates.csv writes it: two decimals, no trailing zeros."""
    text = f"{float(value):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def sample_diameters_mm(rng: np.random.Generator, n: int, mu: float = 1.99, sigma: float = 0.47,
                        min_mm: float = 3.0, max_mm: float = 32.0) -> np.ndarray:
    """``n`` nodule diameters: log-normal (mu, sigma on ln mm) truncated to [min_mm, max_mm] by redrawing.

    LUNA16's 1,186 annotated nodules have ln(diameter) mean 1.99, sd 0.47, range 3.25-32.3 mm.
    """
    out = np.empty(0)
    lo, hi = math.log(min_mm), math.log(max_mm)
    while out.size < n:
        z = rng.normal(mu, sigma, size=max(16, 2 * (n - out.size)))
        out = np.concatenate([out, z[(z >= lo) & (z <= hi)]])
    return np.exp(out[:n])


def truncated_lognormal_cdf(d_mm: np.ndarray, mu: float, sigma: float, min_mm: float, max_mm: float) -> np.ndarray:
    """CDF of :func:`sample_diameters_mm`'s distribution (for checks; no scipy needed)."""
    def phi(x: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.vectorize(math.erf)((np.asarray(x, dtype=float) - mu) / (sigma * math.sqrt(2.0))))
    lo, hi = phi(math.log(min_mm)), phi(math.log(max_mm))
    d = np.clip(np.asarray(d_mm, dtype=float), min_mm, max_mm)
    return (phi(np.log(d)) - lo) / (hi - lo)


@dataclass(frozen=True)
class ScanPlan:
    """What the master seed decides for one scan; everything else comes from the scan's own RNG."""

    index: int
    series_uid: str
    subset: str
    n_nodules: int
    flipped: bool
    circular_fov: bool
    contrast: bool


def _exact_flags(rng: np.random.Generator, n: int, fraction: float, at_least_one: bool = False) -> np.ndarray:
    count = int(round(fraction * n))
    if at_least_one and fraction > 0:
        count = max(count, 1)
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[:count]] = True
    return flags


def plan_dataset(config: SynthConfig) -> list[ScanPlan]:
    """The scans of a data set: UIDs, subsets, nodule counts and flags, from the master seed alone.

    Nodule, flip, FOV and contrast counts are exact (round(fraction x scans)), so a small data set still
    has what it needs (e.g. at least one flipped scan when flip_fraction > 0).
    """
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    n = config.n_scans
    uids: list[str] = []
    seen: set[str] = set()
    while len(uids) < n:
        digits = str(int(rng.integers(1, 10))) + "".join(str(d) for d in rng.integers(0, 10, size=29))
        uid = config.uid_prefix + digits
        if uid not in seen:
            seen.add(uid)
            uids.append(uid)
    total = int(round(config.nodules_per_scan * n))
    counts = rng.multinomial(total, np.full(n, 1.0 / n))
    flipped = _exact_flags(rng, n, config.flip_fraction, at_least_one=True)
    fov = _exact_flags(rng, n, config.fov_fraction)
    contrast = _exact_flags(rng, n, config.contrast_fraction)
    return [
        ScanPlan(i, uids[i], f"subset{i // config.scans_per_subset}", int(counts[i]),
                 bool(flipped[i]), bool(fov[i]), bool(contrast[i]))
        for i in range(n)
    ]


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
    return v / max(float(np.linalg.norm(v)), 1e-9)


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
    samples: list[np.ndarray] = []
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
            n_s = max(2, int(math.ceil(lengths[i] / 1.5)))
            t = np.linspace(0, 1, n_s)[:, None]
            samples.append(np.hstack([p + t * (p1 - p), r + t * (r1 - r)]))
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
    return _Vessels(
        np.asarray(segments, dtype=np.float64).reshape(-1, 8),
        np.vstack(samples) if samples else np.zeros((0, 4)),
        np.asarray(branches, dtype=np.float64).reshape(-1, 3),
    )


# ----------------------------------------------------------------------------------------------------------
# Blobs: nodules and excluded findings (irregular, lobulated, optionally spiculated or with a solid core)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Blob:
    centre_uvw: np.ndarray
    diameter_mm: float  # nominal diameter (written to the tables; -1 for "unknown" excluded findings)
    radius_mm: float  # rendered nominal radius
    kind: str
    attachment: str  # "", "wall" or "vessel"
    hu: float
    core_hu: float = 0.0
    core_radius_mm: float = 0.0
    ggo_boost_hu: float = 0.0
    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))  # world offset -> shape frame
    lobe_dirs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    lobe_amps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lobe_kappas: np.ndarray = field(default_factory=lambda: np.ones(0))
    spicules: np.ndarray = field(default_factory=lambda: np.zeros((0, 8)))  # capsules like vessel segments
    is_nodule: bool = True

    @property
    def reach_mm(self) -> float:
        """Radius of a sphere that holds the whole blob (lobes, elongation, spicules, soft edge)."""
        reach = self.radius_mm * _MAX_LOBE * 1.2 + _EDGE_MM
        if len(self.spicules):
            ends = np.linalg.norm(self.spicules[:, 3:6] - self.centre_uvw, axis=1) + self.spicules[:, 6]
            reach = max(reach, float(ends.max()) + _EDGE_MM)
        return reach


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _make_blob(rng: np.random.Generator, centre: np.ndarray, diameter_mm: float, kind: str, attachment: str,
               radius_mm: float | None = None, is_nodule: bool = True, irregularity: float = 1.0) -> _Blob:
    """Shape and density of one nodule-like blob (HU figures from LIDC-IDRI descriptions)."""
    radius = diameter_mm / 2 if radius_mm is None else radius_mm
    rot = _random_rotation(rng)
    e1, e2 = (float(v) for v in rng.uniform(-0.12, 0.15, 2) * irregularity)
    scale = np.array([1 + e1, 1 + e2, 1 / ((1 + e1) * (1 + e2))])
    matrix = (rot.T / scale[:, None])  # p' = diag(1/s) R^T p
    n_lobes = 4
    dirs = rng.standard_normal((n_lobes, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = rng.uniform(-0.2, 0.3, n_lobes) * irregularity
    kappas = rng.uniform(2, 8, n_lobes)
    blob = _Blob(np.asarray(centre, dtype=np.float64), float(diameter_mm), float(radius), kind, attachment, 0.0,
                 matrix=matrix, lobe_dirs=dirs, lobe_amps=amps, lobe_kappas=kappas, is_nodule=is_nodule)
    if kind == "solid":
        blob.hu = float(rng.uniform(0, 100))
    elif kind == "part_solid":
        blob.hu = float(rng.uniform(-650, -500))
        blob.core_hu = float(rng.uniform(0, 80))
        blob.core_radius_mm = max(float(rng.uniform(0.35, 0.6)) * radius, min(1.2, radius))
    elif kind == "ground_glass":
        blob.hu = float(rng.uniform(-700, -300))
        blob.ggo_boost_hu = 40.0
    elif kind == "calcified":
        blob.hu = float(rng.uniform(300, 900))
    elif kind == "scar":  # excluded finding of unknown size: an elongated, faint opacity
        blob.hu = float(rng.uniform(-400, -100))
    else:
        raise ValueError(f"unknown blob kind {kind!r}")
    if kind == "solid" and diameter_mm > 6 and rng.random() < 0.3:  # spiculated
        n_sp = int(rng.integers(3, 9))
        sp_dirs = rng.standard_normal((n_sp, 3))
        sp_dirs /= np.linalg.norm(sp_dirs, axis=1, keepdims=True)
        lengths = rng.uniform(0.3, 0.8, n_sp) * radius
        starts = blob.centre_uvw + sp_dirs * (0.8 * radius)
        ends = blob.centre_uvw + sp_dirs * (radius + lengths)[:, None]
        blob.spicules = np.hstack([starts, ends, np.full((n_sp, 1), 0.5), np.full((n_sp, 1), 0.25)])
    return blob


def _nodule_kind(rng: np.random.Generator, config: SynthConfig) -> str:
    x = rng.random()
    for kind, frac in (("part_solid", config.part_solid_fraction), ("ground_glass", config.ground_glass_fraction),
                       ("calcified", config.calcified_fraction)):
        if x < frac:
            return kind
        x -= frac
    return "solid"


def _snap(a: _Anatomy, rng: np.random.Generator, uvw: np.ndarray) -> np.ndarray:
    """Move a point to within 0.2 voxel of a voxel centre, so the annotation's voxel is the nodule core."""
    irc = np.round(a.irc_from_uvw(uvw)) + rng.uniform(-0.2, 0.2, 3)
    return a.uvw_from_irc(irc)


def _place_blobs(rng: np.random.Generator, a: _Anatomy, config: SynthConfig, n_nodules: int,
                 vessels: _Vessels) -> tuple[list[_Blob], list[_Blob], dict[str, int]]:
    """Nodules (inside the lungs and the scan, apart from each other) and excluded findings."""
    stats = {"nodules_shrunk": 0, "nodules_dropped": 0}
    placed: list[_Blob] = []
    z, n, _ = a.shape
    big_vessels = vessels.samples[vessels.samples[:, 3] >= 0.8] if len(vessels.samples) else np.zeros((0, 4))

    def fits(centre: np.ndarray, radius: float, attachment: str) -> bool:
        reach = radius * _MAX_LOBE * 1.2 + _EDGE_MM
        irc = a.irc_from_uvw(centre)
        margin = np.array([reach / a.sz, reach / a.sp, reach / a.sp]) + 2
        if np.any(irc < margin) or np.any(irc > np.array(a.shape) - 1 - margin):
            return False
        g = float(_lung_depth_points(a, centre)[0])
        if attachment == "wall":
            if not 0.3 * radius <= g <= 0.8 * radius or g < 1.0:
                return False
        elif g < 1.1 * radius + 1.0:
            return False
        return all(np.linalg.norm(centre - b.centre_uvw) > (radius + b.radius_mm) * _MAX_LOBE + 3 for b in placed)

    def propose(attachment: str, radius: float, count: int) -> np.ndarray:
        if attachment == "vessel" and len(big_vessels):
            pick = big_vessels[rng.integers(0, len(big_vessels), count)]
            perp = rng.standard_normal((count, 3))
            perp /= np.linalg.norm(perp, axis=1, keepdims=True)
            return pick[:, :3] + perp * (radius + 0.5 * pick[:, 3:4])
        lo = np.array([-(a.lung_cx + a.lung_ax), a.lung_cy - a.lung_ay, 0.0])
        hi = np.array([a.lung_cx + a.lung_ax, a.lung_cy + a.lung_ay, a.extent_w])
        return lo + rng.random((count, 3)) * (hi - lo)

    def place(diameter: float, kind: str, attachment: str, is_nodule: bool,
              radius: float | None = None) -> _Blob | None:
        for attempt in range(8):
            r = diameter / 2 if radius is None else radius
            for centre in propose(attachment, r, 64):
                centre = _snap(a, rng, centre)
                if fits(centre, r, attachment):
                    blob = _make_blob(rng, centre, diameter, kind, attachment, radius_mm=r, is_nodule=is_nodule,
                                      irregularity=1.0 if is_nodule else 0.5)
                    placed.append(blob)
                    return blob
            if attempt >= 3 and attachment:  # no room where it should touch something: free-standing
                attachment = ""
            if attempt >= 5 and is_nodule:
                if diameter <= config.diameter_min_mm:
                    break
                diameter = max(diameter * 0.8, config.diameter_min_mm)
                stats["nodules_shrunk"] += 1
        return None

    nodules: list[_Blob] = []
    diameters = sample_diameters_mm(rng, n_nodules, config.diameter_log_mu, config.diameter_log_sigma,
                                    config.diameter_min_mm, config.diameter_max_mm)
    for d in sorted(diameters, reverse=True):  # big ones first, while there is room
        kind = _nodule_kind(rng, config)
        x = rng.random()
        attachment = ("wall" if x < config.juxtapleural_fraction else
                      "vessel" if x < config.juxtapleural_fraction + config.juxtavascular_fraction else "")
        blob = place(float(d), kind, attachment, True)
        if blob is None:
            stats["nodules_dropped"] += 1
        else:
            nodules.append(blob)
    excluded: list[_Blob] = []
    for _ in range(int(rng.poisson(config.excluded_per_scan))):
        if rng.random() < 0.5:  # a nodule below 3 mm: LUNA16 excludes these
            d = float(rng.uniform(1.5, 2.95))
            blob = place(d, "solid", "", False)
        else:  # a finding without a size (diameter -1): rendered as a faint scar-like opacity
            blob = place(-1.0, "scar", "", False, radius=float(rng.uniform(1.5, 3.0)))
        if blob is not None:
            excluded.append(blob)
    order = sorted(range(len(nodules)), key=lambda i: tuple(nodules[i].centre_uvw[::-1]))
    return [nodules[i] for i in order], excluded, stats


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------

def _box(a: _Anatomy, centre_uvw: np.ndarray, reach_mm: float, k0: int, k1: int) -> tuple[slice, slice, slice] | None:
    """Voxel box (chunk-relative z) around a sphere, clipped to the scan and to slices [k0, k1)."""
    irc = a.irc_from_uvw(centre_uvw)
    half = np.array([reach_mm / a.sz, reach_mm / a.sp, reach_mm / a.sp])
    lo = np.floor(irc - half).astype(int)
    hi = np.ceil(irc + half).astype(int) + 1
    lo = np.maximum(lo, [k0, 0, 0])
    hi = np.minimum(hi, [k1, a.shape[1], a.shape[2]])
    if np.any(hi <= lo):
        return None
    return slice(lo[0] - k0, hi[0] - k0), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _box_coords(a: _Anatomy, box: tuple[slice, slice, slice], k0: int, origin_uvw: np.ndarray):
    """Offsets (mm, float32) from origin_uvw of the box's voxels, shaped to broadcast: du (1,1,X), dv, dw."""
    f32 = np.float32
    du = ((np.arange(box[2].start, box[2].stop) - a.cc) * a.sp - origin_uvw[0]).astype(f32)[None, None, :]
    dv = ((np.arange(box[1].start, box[1].stop) - a.rc) * a.sp - origin_uvw[1]).astype(f32)[None, :, None]
    dw = ((np.arange(box[0].start + k0, box[0].stop + k0)) * a.sz - origin_uvw[2]).astype(f32)[:, None, None]
    return du, dv, dw


def _capsule_occupancy(a: _Anatomy, seg: np.ndarray, box, k0: int) -> np.ndarray:
    """Partial-volume occupancy (0..1) of a tapered tube from p0 (radius r0) to p1 (radius r1)."""
    p0, p1, r0, r1 = seg[:3], seg[3:6], seg[6], seg[7]
    du, dv, dw = _box_coords(a, box, k0, p0)
    d = (p1 - p0).astype(np.float32)
    l2 = max(float(d.dot(d)), 1e-9)
    t = np.clip((du * d[0] + dv * d[1] + dw * d[2]) * np.float32(1 / l2), 0, 1)
    ex, ey, ez = du - t * d[0], dv - t * d[1], dw - t * d[2]
    dist = np.sqrt(ex * ex + ey * ey + ez * ez)
    radius = np.float32(r0) + t * np.float32(r1 - r0)
    return np.clip((radius - dist) * np.float32(1 / _EDGE_MM) + np.float32(0.5), 0, 1)


def _blob_fields(a: _Anatomy, blob: _Blob, box, k0: int) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy (0..1) and density (HU) of a blob on a voxel box."""
    f32 = np.float32
    du, dv, dw = _box_coords(a, box, k0, blob.centre_uvw)
    m = blob.matrix.astype(f32)
    pu = du * m[0, 0] + dv * m[0, 1] + dw * m[0, 2]
    pv = du * m[1, 0] + dv * m[1, 1] + dw * m[1, 2]
    pw = du * m[2, 0] + dv * m[2, 1] + dw * m[2, 2]
    dist = np.sqrt(pu * pu + pv * pv + pw * pw) + f32(1e-6)
    rel = np.ones_like(dist)
    inv = 1 / dist
    for dvec, amp, kap in zip(blob.lobe_dirs, blob.lobe_amps, blob.lobe_kappas):
        cos = (pu * f32(dvec[0]) + pv * f32(dvec[1]) + pw * f32(dvec[2])) * inv
        mean = (1 - math.exp(-2 * kap)) / (2 * kap)  # mean of exp(kap (cos - 1)) over the sphere
        rel += f32(amp) * (np.exp(f32(kap) * (cos - 1)) - f32(mean))
    radius = f32(blob.radius_mm) * np.clip(rel, _MIN_LOBE, _MAX_LOBE)
    occ = np.clip((radius - dist) * f32(1 / _EDGE_MM) + f32(0.5), 0, 1)
    for seg in blob.spicules:
        mid = (seg[:3] + seg[3:6]) / 2
        reach = float(np.linalg.norm(seg[3:6] - seg[:3])) / 2 + float(seg[6]) + _EDGE_MM
        sbox = _box(a, mid, reach, k0, k0 + box[0].stop)
        if sbox is None:
            continue
        inter = tuple(slice(max(s.start, b.start), min(s.stop, b.stop)) for s, b in zip(sbox, box))
        if any(s.stop <= s.start for s in inter):
            continue
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inter, box))
        occ[local] = np.maximum(occ[local], _capsule_occupancy(a, seg, inter, k0))
    hu = np.full_like(dist, f32(blob.hu))
    if blob.core_radius_mm > 0:
        core = np.clip((f32(blob.core_radius_mm) - dist) * f32(1 / _EDGE_MM) + f32(0.5), 0, 1)
        hu += core * f32(blob.core_hu - blob.hu)
    if blob.ggo_boost_hu:
        hu += f32(blob.ggo_boost_hu) * np.clip(1 - (dist / f32(blob.radius_mm)) ** 2, 0, 1)
    return occ, hu


def _sub(lo: int, hi: int, n: int) -> slice:
    return slice(max(0, int(math.floor(lo))), min(n, int(math.ceil(hi)) + 1))


def _render(a: _Anatomy, vessels: _Vessels, blobs: list[_Blob], texture: _Texture,
            noise_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canonical int16 volume and its lung and lung-border (< 3 mm from the pleura) masks."""
    f32 = np.float32
    z, n, _ = a.shape
    volume = np.empty(a.shape, dtype=np.int16)
    lung_mask = np.zeros(a.shape, dtype=bool)
    wall_mask = np.zeros(a.shape, dtype=bool)
    u_all = ((np.arange(n) - a.cc) * a.sp).astype(f32)
    v_all = ((np.arange(n) - a.rc) * a.sp).astype(f32)
    step = max(1, _CHUNK_VOXELS // (n * n))
    # in-plane boxes of the structures (rows: v, columns: u)
    def rows(v0: float, v1: float) -> slice:
        return _sub(a.rc + v0 / a.sp, a.rc + v1 / a.sp, n)

    def cols(u0: float, u1: float) -> slice:
        return _sub(a.cc + u0 / a.sp, a.cc + u1 / a.sp, n)

    cav = (rows(-a.cav_b - 2, a.cav_b + 2), cols(-a.cav_a - 2, a.cav_a + 2))
    spine_box = (rows(a.spine_v - a.spine_r - 2, a.spine_v + 2.3 * a.spine_r), cols(-a.spine_r - 2, a.spine_r + 2))
    seg_w = np.zeros((0, 2))
    if len(vessels.segments):
        s = vessels.segments
        rmax = np.maximum(s[:, 6], s[:, 7]) + _EDGE_MM
        seg_w = np.stack([np.minimum(s[:, 2], s[:, 5]) - rmax, np.maximum(s[:, 2], s[:, 5]) + rmax], 1) / a.sz
    yy, xx = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2, indexing="ij")
    outside_fov = (yy * yy + xx * xx > (n / 2) ** 2) if a.circular_fov else None

    for k0 in range(0, z, step):
        k1 = min(z, k0 + step)
        nz = k1 - k0
        w = (np.arange(k0, k1) * a.sz).astype(f32)[:, None, None]
        u = u_all[None, None, :]
        v = v_all[None, :, None]
        tex = texture.sample(k0, k1)
        # body: skin/fat/muscle layers, mediastinal tissue inside
        wob = 1 + f32(a.body_wobble) * np.sin(w * f32(2 * math.pi / a.body_wavelength) + f32(a.body_phase))
        rho = np.sqrt((u / (f32(a.body_a) * wob)) ** 2 + (v / (f32(a.body_b) * wob)) ** 2)
        depth = (1 - rho) * (f32((a.body_a + a.body_b) / 2) * wob)
        tissue = np.where(depth < f32(a.fat_mm), f32(a.fat_hu),
                          np.where(depth < f32(a.fat_mm + a.muscle_mm), f32(a.muscle_hu), f32(a.inner_hu)))
        tissue += f32(10) * tex
        occ = np.clip(depth * f32(1 / _EDGE_MM) + f32(0.5), 0, 1)
        hu = f32(AIR_HU) + occ * (tissue - f32(AIR_HU))
        del tissue, occ, rho
        _add_ribs(a, hu, depth, u, v, w)
        del depth
        _add_mediastinum(a, hu, u_all, v_all, w, spine_box, rows, cols)
        # lungs with texture and gravity gradient, vessels inside them
        rs, cs = cav
        hs = hu[:, rs, cs]
        uu, vv = u_all[cs][None, None, :], v_all[rs][None, :, None]
        g = _lung_depth(a, uu, vv, w)
        lung = g > 0
        lung_mask[k0:k1, rs, cs] = lung
        wall_mask[k0:k1, rs, cs] = lung & (g < 3.0)
        lung_hu = (f32(a.lung_hu) + f32(a.lung_texture_hu) * tex[:, rs, cs]
                   + f32(a.lung_gravity_hu) * (vv * f32(1 / a.cav_b)))
        locc = np.clip(g * f32(1 / _EDGE_MM) + f32(0.5), 0, 1)
        hs += locc * (lung_hu - hs)
        del lung_hu, locc, g
        if len(seg_w):
            vocc = np.zeros_like(hs)
            box_origin = (k0, rs.start, cs.start)
            for si in np.flatnonzero((seg_w[:, 1] >= k0) & (seg_w[:, 0] < k1)):
                seg = vessels.segments[si]
                reach = np.linalg.norm(seg[3:6] - seg[:3]) / 2 + max(seg[6], seg[7]) + _EDGE_MM
                box = _box(a, (seg[:3] + seg[3:6]) / 2, reach, k0, k1)
                if box is None:
                    continue
                local = (box[0], _shift(box[1], rs), _shift(box[2], cs))
                if any(s.stop <= s.start for s in local):
                    continue
                absbox = (box[0], slice(local[1].start + box_origin[1], local[1].stop + box_origin[1]),
                          slice(local[2].start + box_origin[2], local[2].stop + box_origin[2]))
                np.maximum(vocc[local], _capsule_occupancy(a, seg, absbox, k0), out=vocc[local])
            vocc *= lung
            hs += vocc * (f32(a.vessel_hu) - hs)
            del vocc
        del hs, lung  # hs is a view: hu already holds the lungs
        # nodules and excluded findings: never make anything less dense (vessels stay visible in them)
        for blob in blobs:
            box = _box(a, blob.centre_uvw, blob.reach_mm, k0, k1)
            if box is None:
                continue
            occ_b, hu_b = _blob_fields(a, blob, box, k0)
            sub = hu[box]
            sub += occ_b * np.maximum(hu_b - sub, 0)
        # image noise, field of view, integers
        noise = noise_rng.standard_normal((nz, n, n), dtype=np.float32)
        np.clip(noise, -3, 3, out=noise)
        hu += noise * f32(a.noise_hu)
        del noise
        if outside_fov is not None:
            hu[:, outside_fov] = OUTSIDE_FOV_HU
        np.rint(hu, out=hu)
        volume[k0:k1] = np.clip(hu, -32768, 32767).astype(np.int16)
    return volume, lung_mask, wall_mask


def _shift(s: slice, within: slice) -> slice:
    """Slice ``s`` (absolute) expressed relative to ``within`` and clipped to it."""
    start = max(s.start, within.start) - within.start
    stop = min(s.stop, within.stop) - within.start
    return slice(start, max(start, stop))


def _add_ribs(a: _Anatomy, hu: np.ndarray, depth: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> None:
    """Ribs (marrow with a cortical rim), costal cartilage and sternum in the chest wall, sloping down forwards."""
    f32 = np.float32
    centre = a.fat_mm + a.muscle_mm + a.rib_mm / 2
    half_w = a.rib_mm / 2 * 0.85
    band = np.abs(depth - f32(centre)) < f32(half_w)
    kk, rr, cc = np.nonzero(band)
    if kk.size == 0:
        return
    uu = u[0, 0, cc]
    vv = v[0, rr, 0]
    ww = w[kk, 0, 0]
    phi = np.abs(np.arctan2(uu, vv))  # 0 at the spine (posterior), pi at the sternum
    arc = phi * f32((a.body_a + a.body_b) / 2)
    phase = np.mod(ww + f32(a.rib_slope) * arc - f32(a.rib_phase), f32(a.rib_period))
    dz = np.minimum(phase, f32(a.rib_period) - phase)
    dd = depth[kk, rr, cc] - f32(centre)
    e = (dz / f32(a.rib_half_h)) ** 2 + (dd / f32(half_w)) ** 2
    bone = (e < 1) & (phi > f32(0.12 * math.pi)) & (phi < f32(0.92 * math.pi))
    value = np.where(e > 0.55, f32(a.cortex_hu), f32(a.marrow_hu))
    value = np.where(phi > f32(0.78 * math.pi), f32(a.cartilage_hu), value)
    sternum = (phi > f32(0.95 * math.pi)) & ((dd / f32(half_w)) ** 2 < 1)
    sel = bone | sternum
    hu[kk[sel], rr[sel], cc[sel]] = np.where(sternum[sel], f32(a.marrow_hu), value[sel])


def _add_mediastinum(a: _Anatomy, hu: np.ndarray, u_all: np.ndarray, v_all: np.ndarray, w: np.ndarray,
                     spine_box, rows, cols) -> None:
    """Heart, descending aorta, trachea (above the carina) and spine (vertebral bodies, discs, arches)."""
    f32 = np.float32
    # heart
    rs = rows(a.heart_v - a.heart_b, a.heart_v + a.heart_b)
    cs = cols(a.heart_u - a.heart_a, a.heart_u + a.heart_a)
    th = (w - f32(a.heart_zc)) / f32(a.heart_h)
    sh = np.maximum(np.sqrt(np.clip(1 - th * th, 0, None)), f32(1e-3))
    uu, vv = u_all[cs][None, None, :], v_all[rs][None, :, None]
    inside = (((uu - f32(a.heart_u)) / (f32(a.heart_a) * sh)) ** 2
              + ((vv - f32(a.heart_v)) / (f32(a.heart_b) * sh)) ** 2) < 1
    sub = hu[:, rs, cs]
    sub[inside] = f32(a.blood_hu)
    # aorta
    rs = rows(a.aorta_v - a.aorta_r, a.aorta_v + a.aorta_r)
    cs = cols(a.aorta_u - a.aorta_r, a.aorta_u + a.aorta_r)
    uu, vv = u_all[cs][None, None, :], v_all[rs][None, :, None]
    disc = (uu - f32(a.aorta_u)) ** 2 + (vv - f32(a.aorta_v)) ** 2 < f32(a.aorta_r ** 2)
    hu[:, rs, cs][:, disc[0]] = f32(a.blood_hu)
    # trachea: air inside, above the carina
    above = np.flatnonzero(w[:, 0, 0] > a.carina_w)
    if above.size:
        rs = rows(a.trachea_v - a.trachea_r, a.trachea_v + a.trachea_r)
        cs = cols(-a.trachea_r, a.trachea_r)
        uu, vv = u_all[cs][None, :], v_all[rs][:, None]
        lumen = uu ** 2 + (vv - f32(a.trachea_v)) ** 2 < f32((a.trachea_r - 1.5) ** 2)
        blk = hu[above[0]:, rs, cs]
        blk[:, lumen] = f32(AIR_HU)
    # spine
    rs, cs = spine_box
    uu, vv = u_all[cs][None, :], v_all[rs][:, None]
    r = a.spine_r
    d_body = np.sqrt(uu ** 2 + (vv - f32(a.spine_v)) ** 2)
    canal_v = a.spine_v + 1.4 * r
    d_canal = np.sqrt(uu ** 2 + (vv - f32(canal_v)) ** 2)
    arch = (d_canal < f32(0.75 * r)) & (d_canal >= f32(0.45 * r))
    canal = d_canal < f32(0.45 * r)
    vert = d_body < f32(r)
    cortex = vert & (d_body > f32(r - 1.5))
    blk = hu[:, rs, cs]
    phase = np.mod(w[:, 0, 0] - f32(a.disc_phase), f32(a.disc_period))
    in_disc = phase < f32(5.0)
    for i in range(blk.shape[0]):
        sl = blk[i]
        sl[arch] = f32(a.cortex_hu * 0.7)
        sl[canal] = f32(20.0)
        if in_disc[i]:
            sl[vert] = f32(80.0)
        else:
            sl[vert] = f32(a.marrow_hu)
            sl[cortex] = f32(a.cortex_hu)


# ----------------------------------------------------------------------------------------------------------
# One scan: anatomy, vessels, nodules, volume, tables
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SynthScan:
    """One synthetic scan in memory, as it is written (volume and masks in stored, possibly flipped, order)."""

    plan: ScanPlan
    volume: np.ndarray  # int16 (I, R, C)
    geometry: Geometry
    lung_mask: np.ndarray  # bool, same order as volume
    nodules: list[dict[str, Any]]  # center_xyz, diameter_mm, kind, attachment
    annotation_rows: list[list[str]]
    excluded_rows: list[list[str]]
    candidate_rows: list[list[str]]
    candidate_kinds: list[str]  # "positive", "excluded" or one of NEGATIVE_KINDS, per candidate row
    stats: dict[str, int]


def _scan_rngs(config: SynthConfig, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    return (np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, index))),
            np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2, index))))


def synthesize_scan(plan: ScanPlan, config: SynthConfig) -> SynthScan:
    """Build one scan and its table rows (pure: no files). Depends only on the plan and the config."""
    rng, noise_rng = _scan_rngs(config, plan.index)
    a = _sample_anatomy(rng, plan, config)
    vessels = _grow_vessels(rng, a)
    nodules, excluded, stats = _place_blobs(rng, a, config, plan.n_nodules, vessels)
    texture = _Texture(rng, a)
    volume_c, lung_c, wall_c = _render(a, vessels, nodules + excluded, texture, noise_rng)
    geometry = a.geometry()
    uid = plan.series_uid

    def world(uvw: np.ndarray) -> np.ndarray:
        return irc_to_xyz(a.stored_irc(a.irc_from_uvw(uvw)), geometry)

    nodule_info, annotation_rows = [], []
    for blob in nodules:
        xyz = world(blob.centre_uvw)
        nodule_info.append({"center_xyz": xyz, "diameter_mm": blob.diameter_mm, "kind": blob.kind,
                            "attachment": blob.attachment})
        annotation_rows.append([uid, *(format_annotation_mm(c) for c in xyz), format_annotation_mm(blob.diameter_mm)])
    excluded_rows = [[uid, *(format_annotation_mm(c) for c in world(b.centre_uvw)), format_annotation_mm(b.diameter_mm)]
                     for b in excluded]

    cand_uvw, cand_class, cand_kind = _candidates(rng, a, config, nodules, excluded, vessels, lung_c, wall_c)
    rows: list[list[str]] = []
    kinds: list[str] = []
    dropped = 0
    shape = a.shape
    for uvw, cls, kind in zip(cand_uvw, cand_class, cand_kind):
        text = [format_candidate_mm(c) for c in world(uvw)]
        irc = xyz_to_irc(np.array([float(t) for t in text]), geometry)
        if not is_inside(irc, shape):
            if cls:
                raise AssertionError(f"{uid}: positive candidate {text} outside the scan")
            dropped += 1
            continue
        rows.append([uid, *text, str(cls)])
        kinds.append(kind)
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    kinds = [kinds[i] for i in order]
    stats = dict(stats, candidates_dropped_outside=dropped, vessel_segments=len(vessels.segments))
    if a.flipped:
        volume, lung = volume_c[:, ::-1, ::-1], lung_c[:, ::-1, ::-1]
    else:
        volume, lung = volume_c, lung_c
    return SynthScan(plan, np.ascontiguousarray(volume), geometry, np.ascontiguousarray(lung), nodule_info,
                     annotation_rows, excluded_rows, rows, kinds, stats)


def _candidates(rng: np.random.Generator, a: _Anatomy, config: SynthConfig, nodules: list[_Blob],
                excluded: list[_Blob], vessels: _Vessels, lung: np.ndarray,
                wall: np.ndarray) -> tuple[list[np.ndarray], list[int], list[str]]:
    """CAD-like candidates (canonical mm): positives jittered by <= d/8 around each nodule centre, negatives
    on vessels, nodule-sized vessel cross-sections, branchings, the pleura and the parenchyma, never within a
    nodule, and one on most excluded findings."""
    uvw: list[np.ndarray] = []
    cls: list[int] = []
    kinds: list[str] = []
    for blob in nodules:
        for _ in range(2 if rng.random() < config.two_candidate_fraction else 1):
            uvw.append(blob.centre_uvw + rng.uniform(-1, 1, 3) * blob.diameter_mm / 8)
            cls.append(1)
            kinds.append("positive")
    for blob in excluded:
        if rng.random() < 0.6:
            uvw.append(blob.centre_uvw + rng.uniform(-0.5, 0.5, 3))
            cls.append(0)
            kinds.append("excluded")
    expected_pos = config.nodules_per_scan * (1 + config.two_candidate_fraction)
    n_neg = int(round(config.negatives_per_positive * expected_pos * float(rng.uniform(0.8, 1.2))))
    n_neg = max(0, n_neg - sum(1 for k in kinds if k == "excluded"))
    if n_neg == 0:
        return uvw, cls, kinds
    z = a.shape[0]
    inside = np.zeros(0, dtype=bool)
    samples = vessels.samples
    if len(samples):
        irc = a.irc_from_uvw(samples[:, :3])
        inside = (irc[:, 0] >= 0) & (irc[:, 0] <= z - 1) & (_lung_depth_points(a, samples[:, :3]) > 0.5)
    pools = {
        "vessel": samples[inside, :3] if len(samples) else np.zeros((0, 3)),
        "large_vessel": samples[inside & (samples[:, 3] >= 1.5), :3] if len(samples) else np.zeros((0, 3)),
    }
    if len(vessels.branches):
        irc = a.irc_from_uvw(vessels.branches)
        ok = (irc[:, 0] >= 0) & (irc[:, 0] <= z - 1) & (_lung_depth_points(a, vessels.branches) > 0.5)
        pools["branching"] = vessels.branches[ok]
    else:
        pools["branching"] = np.zeros((0, 3))
    weights = np.asarray(config.negative_mix, dtype=float)
    counts = rng.multinomial(n_neg, weights / weights.sum())
    keep_out = [(b.centre_uvw, b.radius_mm * _MAX_LOBE + 2.0) for b in nodules]

    def allowed(p: np.ndarray) -> bool:
        return all(np.linalg.norm(p - c) > r for c, r in keep_out)

    for kind, count in zip(NEGATIVE_KINDS, counts):
        got = 0
        for _ in range(20):
            if got >= count:
                break
            want = 2 * (count - got) + 8
            if kind in pools:
                pool = pools[kind] if len(pools[kind]) else pools["vessel"]
                if not len(pool):
                    pool = None
            else:
                pool = None
            if pool is not None:
                pts = pool[rng.integers(0, len(pool), want)] + rng.normal(0, 0.5, (want, 3))
            else:
                mask = wall if kind == "wall" else lung
                irc = rng.random((want * 8, 3)) * np.array(a.shape) - 0.5
                idx = np.clip(np.round(irc).astype(int), 0, np.array(a.shape) - 1)
                hit = mask[idx[:, 0], idx[:, 1], idx[:, 2]]
                pts = a.uvw_from_irc(irc[hit][:want])
            irc = a.irc_from_uvw(pts)
            ok = np.all((irc > -0.45) & (irc < np.array(a.shape) - 0.55), axis=1)
            for p in pts[ok]:
                if got >= count:
                    break
                if allowed(p):
                    uvw.append(p)
                    cls.append(0)
                    kinds.append(kind)
                    got += 1
    return uvw, cls, kinds


# ----------------------------------------------------------------------------------------------------------
# The data set on disk
# ----------------------------------------------------------------------------------------------------------

def _write_csv_atomic(path: Path, header: Iterable[str] | None, rows: Iterable[list[str]]) -> None:
    """A CSV with LUNA16's CRLF line ends, written to a temporary name and renamed."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if header is not None:
        writer.writerow(list(header))
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="ascii") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)


def _make_scan_files(root: str, plan: ScanPlan, config: SynthConfig) -> dict[str, Any]:
    """Worker: build one scan, write its .mhd/.raw atomically, return its table rows and counts."""
    scan = synthesize_scan(plan, config)
    path = Path(root) / plan.subset / f"{plan.series_uid}.mhd"
    write_scan(path, scan.volume, scan.geometry, compress=False)
    nbytes = path.stat().st_size + path.with_suffix(".raw").stat().st_size
    return {
        "index": plan.index, "annotations": scan.annotation_rows, "excluded": scan.excluded_rows,
        "candidates": scan.candidate_rows, "candidate_kinds": scan.candidate_kinds, "stats": scan.stats,
        "voxels": int(scan.volume.size), "bytes": nbytes, "shape": scan.volume.shape,
        "nodule_kinds": [n["kind"] for n in scan.nodules],
        "nodule_attachments": [n["attachment"] for n in scan.nodules],
    }


def _prepare_root(root: Path, plans: list[ScanPlan], config: SynthConfig) -> None:
    """Create root; refuse a folder with LUNA16-like content not made by luna.synth; drop stale files."""
    marker = root / MARKER_NAME
    if root.exists() and not root.is_dir():
        raise SynthError(f"{root}: output path exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    ours = marker.is_file()
    luna_like = [p for p in root.iterdir() if p.name.startswith("subset") or p.suffix == ".csv"]
    if luna_like and not ours:
        raise SynthError(f"{root}: folder holds {luna_like[0].name} but was not written by luna.synth "
                         f"(no {MARKER_NAME}); refusing to write into it")
    (root / "candidates.csv").unlink(missing_ok=True)  # an interrupted run must not look complete
    meta = {"generator": "luna.synth", "version": __version__, "config": config.to_dict()}
    tmp = marker.with_name(marker.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, marker)
    if not ours:
        return
    wanted = {(p.subset, p.series_uid) for p in plans}
    subsets = {p.subset for p in plans}
    for folder in sorted(root.glob("subset*")):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix in (".mhd", ".raw", ".zraw") and (folder.name, f.stem) not in wanted:
                f.unlink()
        if folder.name not in subsets and not any(folder.iterdir()):
            folder.rmdir()


def synthesize(root: Path, config: SynthConfig, jobs: int = 1) -> dict[str, Any]:
    """Write the whole data set under ``root`` (scans in parallel with ``jobs`` processes); CSVs last.

    Returns summary counts: scans, nodules, candidates, negatives per positive, flipped/FOV/contrast scans,
    voxels, bytes on disk, seconds.
    """
    root = Path(root)
    if jobs < 1:
        raise SynthError(f"jobs = {jobs}: must be >= 1")
    t0 = time.perf_counter()
    plans = plan_dataset(config)
    _prepare_root(root, plans, config)
    logger.info("synthesizing %d scans in %d subsets under %s with %d job(s)", len(plans), config.n_subsets, root, jobs)
    results: dict[int, dict[str, Any]] = {}

    def progress(done: int) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (len(plans) - done)
        logger.info("scan %d/%d done, %.1f s elapsed, ETA %.1f s", done, len(plans), elapsed, eta)

    if jobs == 1:
        for plan in plans:
            results[plan.index] = _make_scan_files(str(root), plan, config)
            progress(len(results))
    else:
        # fork on Linux: spawn/forkserver re-import the parent's __main__, which re-runs a Snakemake rule script
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_make_scan_files, str(root), plan, config) for plan in plans]
            for fut in as_completed(futures):
                res = fut.result()
                results[res["index"]] = res
                progress(len(results))
    ordered = [results[p.index] for p in sorted(plans, key=lambda p: p.series_uid)]
    annotations = [row for r in ordered for row in r["annotations"]]
    excluded = [row for r in ordered for row in r["excluded"]]
    candidates = [row for r in ordered for row in r["candidates"]]
    _write_csv_atomic(root / "annotations.csv", ANNOTATIONS_HEADER, annotations)
    _write_csv_atomic(root / "annotations_excluded.csv", ANNOTATIONS_HEADER, excluded)
    uids = sorted(p.series_uid for p in plans)
    _write_csv_atomic(root / "seriesuids.csv", None, [[uid] for uid in uids])
    _write_csv_atomic(root / "candidates.csv", CANDIDATES_HEADER, candidates)  # last: marks the set complete

    n_pos = sum(1 for row in candidates if row[4] == "1")
    n_neg = len(candidates) - n_pos
    kinds: dict[str, int] = {}
    for r in ordered:
        for k in r["candidate_kinds"]:
            kinds[k] = kinds.get(k, 0) + 1
    nodule_kinds: dict[str, int] = {}
    for r in ordered:
        for k in r["nodule_kinds"]:
            nodule_kinds[k] = nodule_kinds.get(k, 0) + 1
    summary = {
        "root": str(root),
        "n_subsets": config.n_subsets,
        "n_scans": len(plans),
        "n_scans_with_nodules": sum(1 for r in ordered if r["annotations"]),
        "n_nodules": len(annotations),
        "n_excluded": len(excluded),
        "n_candidates": len(candidates),
        "n_positive_candidates": n_pos,
        "n_negative_candidates": n_neg,
        "negatives_per_positive": round(n_neg / n_pos, 2) if n_pos else None,
        "candidate_kinds": dict(sorted(kinds.items())),
        "nodule_kinds": dict(sorted(nodule_kinds.items())),
        "n_juxtapleural": sum(a == "wall" for r in ordered for a in r["nodule_attachments"]),
        "n_juxtavascular": sum(a == "vessel" for r in ordered for a in r["nodule_attachments"]),
        "n_flipped": sum(p.flipped for p in plans),
        "n_circular_fov": sum(p.circular_fov for p in plans),
        "n_contrast": sum(p.contrast for p in plans),
        "n_nodules_shrunk": sum(r["stats"]["nodules_shrunk"] for r in ordered),
        "n_nodules_dropped": sum(r["stats"]["nodules_dropped"] for r in ordered),
        "mean_shape_zyx": [round(float(np.mean([r["shape"][i] for r in ordered])), 1) for i in range(3)],
        "voxels": sum(r["voxels"] for r in ordered),
        "bytes": sum(r["bytes"] for r in ordered),
        "seconds": round(time.perf_counter() - t0, 2),
        "jobs": jobs,
    }
    logger.info("wrote %s: %d scans, %d nodules, %d candidates (%d positive, %.1f negatives per positive), "
                "%.0f MB, %.1f s", root, summary["n_scans"], summary["n_nodules"], summary["n_candidates"], n_pos,
                summary["negatives_per_positive"] or 0.0, summary["bytes"] / 1e6, summary["seconds"])
    if summary["n_nodules_dropped"]:
        logger.warning("%d nodule(s) found no room in their scan and were left out", summary["n_nodules_dropped"])
    return summary


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """argparse with ``--out``, ``--jobs`` and one option per :class:`SynthConfig` field."""
    parser = argparse.ArgumentParser(prog="luna-synth", description=SynthApp.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, metavar="ROOT",
                        help="data folder to write: subset*/<uid>.mhd+.raw and the LUNA16 CSVs")
    parser.add_argument("--jobs", type=int, default=1, help="scans generated in parallel (processes)")
    defaults = SynthConfig()
    for f in fields(SynthConfig):
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"].replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(_option(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(_option(f.name), type=float, nargs="+", default=list(default), help=help_text)
        else:
            parser.add_argument(_option(f.name), type=type(default), default=default, help=help_text)
    return parser


class SynthApp:
    """Write a synthetic LUNA16-format data set (chest-CT-like scans, candidates.csv, annotations.csv)."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.args = build_parser().parse_args(argv)
        self.summary: dict[str, Any] | None = None

    def config(self) -> SynthConfig:
        values = {f.name: getattr(self.args, f.name) for f in fields(SynthConfig)}
        return SynthConfig.from_dict(values)

    def main(self) -> int:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logger.info("Starting %s, %s", type(self).__name__, vars(self.args))
        try:
            self.summary = synthesize(Path(self.args.out), self.config(), jobs=self.args.jobs)
        except (ValueError, OSError) as exc:  # SynthError, ScanError: one line naming key or file
            print(f"luna-synth: error: {exc}", file=sys.stderr)
            return 2
        logger.info("summary: %s", json.dumps(self.summary))
        return 0


def main(argv: list[str] | None = None) -> None:
    """Console script ``luna-synth``."""
    sys.exit(SynthApp(argv).main())


if __name__ == "__main__":
    main()
