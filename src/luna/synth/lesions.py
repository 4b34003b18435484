"""Blobs: nodules and excluded findings of one scan. Their shapes (irregular and lobulated, optionally spiculated
or with a solid core), their densities per kind (solid, part-solid, ground-glass, calcified, scar-like) and
their placement inside the lungs (apart from each other, touching the chest wall or a vessel when drawn so),
plus the shape constants that rendering shares. Kept apart from rendering: this decides what a scan holds and
where; rendering decides how it looks in voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from luna.synth.anatomy import _Anatomy, _lung_depth_points, _Vessels
from luna.synth.config import SynthConfig, sample_diameters_mm

_EDGE_MM = 0.8  # width of the partial-volume edge of soft objects (nodules, vessels, lung border)
_MAX_LOBE = 1.35  # largest radius of an irregular nodule, relative to its nominal radius
_MIN_LOBE = 0.78  # smallest


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
    stats = {"nodules_shrunk": 0, "nodules_dropped": 0, "excluded_dropped": 0}
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
        shrunk = False
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
                stats["nodules_shrunk"] += not shrunk  # nodules, not shrink steps
                shrunk = True
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
        else:
            stats["excluded_dropped"] += 1
    order = sorted(range(len(nodules)), key=lambda i: tuple(nodules[i].centre_uvw[::-1]))
    return [nodules[i] for i in order], excluded, stats
