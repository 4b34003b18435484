"""luna.synth's configuration and pure helpers: :class:`SynthConfig` (every knob of the data set, validated on
construction, with :class:`SynthError` naming the bad key), the table headers and size limits, LUNA16's number
formats, the nodule-diameter sampler and the plan of a data set (:func:`plan_dataset`: UIDs, subsets, nodule
counts and flip/FOV/contrast flags from the master seed alone). Nothing here touches voxels or files, so every
other module of the package builds on it and it stays cheap to import and to test.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

CANDIDATES_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "class")
ANNOTATIONS_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
FULL_SIZE_XY = 512
FULL_EXTENT_Z_MM = (300.0, 380.0)
MIN_FOV_MM = 60.0  # smallest in-plane field of view (size x spacing) that holds two lungs
MAX_SCAN_VOXELS = 2**28  # largest scan (LUNA16's largest: 512 x 512 x 764, ~2e8); a worker needs ~13 bytes a voxel
MAX_SCANS_PER_SUBSET = 10_000  # LUNA16: ~89
MAX_SUBSETS = 100  # LUNA16: 10
MAX_NEGATIVES_PER_POSITIVE = 2000.0  # LUNA16: ~400 (candidates.csv), ~640 (candidates_V2.csv)
MAX_EXCLUDED_PER_SCAN = 200.0  # LUNA16: ~40 (35,192 findings in 888 scans)
MAX_NOISE_HU = 500.0
MAX_MIX_WEIGHT = 1e6
MIN_DIAMETER_MASS = 1e-3  # least share of ln-normal diameter draws inside [diameter_min_mm, diameter_max_mm]
NODULE_KINDS = ("solid", "part_solid", "ground_glass", "calcified")
NEGATIVE_KINDS = ("vessel", "large_vessel", "branching", "wall", "parenchyma")


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
        50.0, "negative candidates per expected positive candidate of a scan (nodules_per_scan x (1 + "
        "two_candidate_fraction)), those on excluded findings included (LUNA16 has ~400)")
    two_candidate_fraction: float = _knob(
        0.3, "fraction of nodules with two positive candidates instead of one")
    excluded_per_scan: float = _knob(
        2.0, "mean non-nodule findings per scan written to annotations_excluded.csv (Poisson)")
    full_size: bool = _knob(
        False, f"LUNA16-size scans: {FULL_SIZE_XY}x{FULL_SIZE_XY} in-plane, "
        f"{FULL_EXTENT_Z_MM[0]:g}-{FULL_EXTENT_Z_MM[1]:g} mm in z (overrides the size knobs)")
    size_xy_min: int = _knob(192, "smallest in-plane size in voxels (square slices)")
    size_xy_max: int = _knob(256, "largest in-plane size in voxels")
    extent_z_mm_min: float = _knob(100.0, "shortest scan length in z, mm (a slab of the chest; a scan has at least 8 "
                                          "slices, so a short range with thick slices comes out longer)")
    extent_z_mm_max: float = _knob(200.0, "longest scan length in z, mm")
    spacing_xy_min_mm: float = _knob(0.46, "smallest in-plane voxel spacing, mm (as scanners reconstruct: a field of "
                                            "view of whole mm / 512, so a multiple of 1/512 mm; the next one above "
                                            "when none lies in the range)")
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
        "1.3.6.1.4.1.14519.5.2.1.6279.6001.", "series UID root, ending in '.', at most 34 characters; a 30-digit "
        "random number follows (as LUNA16)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "slice_thicknesses_mm", tuple(float(v) for v in self.slice_thicknesses_mm))
        object.__setattr__(self, "negative_mix", tuple(float(v) for v in self.negative_mix))

        def bad(key: str, value: Any, why: str) -> SynthError:
            return SynthError(f"synthetic.{key} = {value!r}: {why}")

        def check_range(low_key: str, high_key: str, lowest: float, highest: float) -> None:
            """A (min, max) pair: the error names the key that is out of range, or both when min > max."""
            low, high = getattr(self, low_key), getattr(self, high_key)
            need = f"need {lowest:g} <= {low_key} <= {high_key} <= {highest:g}"
            if not lowest <= low <= highest:
                raise bad(low_key, low, need)
            if not lowest <= high <= highest:
                raise bad(high_key, high, need)
            if low > high:
                raise bad(low_key, (low, high), f"{low_key} is above {high_key}; {need}")

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
        for key, highest in (("n_subsets", MAX_SUBSETS), ("scans_per_subset", MAX_SCANS_PER_SUBSET)):
            if not 1 <= getattr(self, key) <= highest:
                raise bad(key, getattr(self, key), f"must be from 1 to {highest:,}")
        if self.seed < 0:
            raise bad("seed", self.seed, "must be >= 0")
        check_range("size_xy_min", "size_xy_max", 32, 2048)
        check_range("extent_z_mm_min", "extent_z_mm_max", 10, 1000)
        check_range("spacing_xy_min_mm", "spacing_xy_max_mm", 0.1, 5)
        size_min, size_max, _, extent_max = self.size_ranges()
        if size_min * self.spacing_xy_min_mm < MIN_FOV_MM:
            key, value = ("spacing_xy_min_mm", self.spacing_xy_min_mm) if self.full_size else ("size_xy_min", size_min)
            size = f"full_size ({FULL_SIZE_XY} voxels)" if self.full_size else "size_xy_min"
            raise bad(key, value,
                      f"with {size} and spacing_xy_min_mm = {self.spacing_xy_min_mm:g} the field of view can be "
                      f"{size_min * self.spacing_xy_min_mm:.0f} mm, too small for a chest (need >= {MIN_FOV_MM:g} mm)")
        if not self.slice_thicknesses_mm or not all(0.1 <= t <= 10 for t in self.slice_thicknesses_mm):
            raise bad("slice_thicknesses_mm", self.slice_thicknesses_mm, "need one or more values in [0.1, 10]")
        slices = max(8, math.ceil(extent_max / min(self.slice_thicknesses_mm)))
        if size_max * size_max * slices > MAX_SCAN_VOXELS:
            key, value = ("slice_thicknesses_mm", self.slice_thicknesses_mm) if self.full_size else (
                "size_xy_max", size_max)
            raise bad(key, value,
                      f"a scan can be {size_max} x {size_max} x {slices} = {size_max * size_max * slices:.2e} voxels "
                      f"(in-plane size, longest extent_z_mm_max / thinnest slice_thicknesses_mm); need <= "
                      f"{MAX_SCAN_VOXELS:.2e} (LUNA16's largest: 512 x 512 x 764)")
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
        for key, highest in (("negatives_per_positive", MAX_NEGATIVES_PER_POSITIVE),
                             ("excluded_per_scan", MAX_EXCLUDED_PER_SCAN), ("noise_hu", MAX_NOISE_HU)):
            value = getattr(self, key)
            if not 0 <= value <= highest:  # NaN too
                raise bad(key, value, f"must be a number from 0 to {highest:g}")
        if not 0 < self.nodules_per_scan <= 20:  # none: nothing to train or score (the schema says so too)
            raise bad("nodules_per_scan", self.nodules_per_scan, "must be a number > 0 and <= 20")
        if not -1000 <= self.lung_hu <= -500:
            raise bad("lung_hu", self.lung_hu, "must lie in [-1000, -500]")
        if not 0 < self.diameter_min_mm < self.diameter_max_mm <= 60:
            raise bad("diameter_min_mm", (self.diameter_min_mm, self.diameter_max_mm),
                      "need 0 < diameter_min_mm < diameter_max_mm <= 60")
        if not (math.isfinite(self.diameter_log_sigma) and self.diameter_log_sigma > 0):
            raise bad("diameter_log_sigma", self.diameter_log_sigma, "must be a finite number > 0")
        if not math.isfinite(self.diameter_log_mu):
            raise bad("diameter_log_mu", self.diameter_log_mu, "must be a finite number")
        mass = truncated_normal_mass(math.log(self.diameter_min_mm), math.log(self.diameter_max_mm),
                                     self.diameter_log_mu, self.diameter_log_sigma)
        if mass < MIN_DIAMETER_MASS:  # sample_diameters_mm draws until enough fall inside: it would not return
            raise bad("diameter_log_mu", self.diameter_log_mu,
                      f"with diameter_log_sigma = {self.diameter_log_sigma:g} a diameter falls in [diameter_min_mm, "
                      f"diameter_max_mm] = [{self.diameter_min_mm:g}, {self.diameter_max_mm:g}] mm with probability "
                      f"{mass:.1e}, need >= {MIN_DIAMETER_MASS:g}")
        if (len(self.negative_mix) != len(NEGATIVE_KINDS)
                or not all(0 <= w <= MAX_MIX_WEIGHT for w in self.negative_mix) or sum(self.negative_mix) <= 0):
            raise bad("negative_mix", self.negative_mix,
                      f"need {len(NEGATIVE_KINDS)} weights from 0 to {MAX_MIX_WEIGHT:g} ({', '.join(NEGATIVE_KINDS)}) "
                      "with a positive sum")
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
    if n > 0 and not truncated_normal_mass(lo, hi, mu, sigma) >= MIN_DIAMETER_MASS:
        raise SynthError(f"diameters ln N({mu:g}, {sigma:g}) fall in [{min_mm:g}, {max_mm:g}] mm too rarely to draw")
    while out.size < n:
        z = rng.normal(mu, sigma, size=max(16, 2 * (n - out.size)))
        out = np.concatenate([out, z[(z >= lo) & (z <= hi)]])
    return np.exp(out[:n])


def _normal_cdf(x: float | np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """P(z <= x) for z ~ N(mu, sigma), with erfc: accurate far in the lower tail (no scipy needed)."""
    return 0.5 * np.vectorize(math.erfc)(-(np.asarray(x, dtype=float) - mu) / (sigma * math.sqrt(2.0)))


def truncated_normal_mass(lo: float, hi: float, mu: float, sigma: float) -> float:
    """P(lo <= z <= hi) for z ~ N(mu, sigma): how often :func:`sample_diameters_mm` keeps a draw (on ln mm)."""
    return float(_normal_cdf(hi, mu, sigma) - _normal_cdf(lo, mu, sigma))


def truncated_lognormal_cdf(d_mm: np.ndarray, mu: float, sigma: float, min_mm: float, max_mm: float) -> np.ndarray:
    """CDF of :func:`sample_diameters_mm`'s distribution (for checks)."""
    lo, hi = math.log(min_mm), math.log(max_mm)
    d = np.clip(np.asarray(d_mm, dtype=float), min_mm, max_mm)
    return (_normal_cdf(np.log(d), mu, sigma) - _normal_cdf(lo, mu, sigma)) / truncated_normal_mass(lo, hi, mu, sigma)


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
