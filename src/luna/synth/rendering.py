"""From parameters to a scan: rendering an anatomy with its vessels, nodules and excluded findings into an int16
volume (vectorised numpy in slabs of slices, vessels and blobs on small bounding boxes, so memory stays bounded
at full size; the vessel segments in batches of one box shape, :func:`_vessel_occupancy`), and one whole scan
(:func:`synthesize_scan`: anatomy, vessels, nodules, volume, annotation rows and CAD-like candidates). Every scan
is built from its own seed-derived RNGs (``SeedSequence(seed, spawn_key=(1, index))``, and ``(2, index)`` for the
image noise), so scans can be made in any order or in parallel and are byte-identical for the same config. Pure:
no files are written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from luna.geometry import Geometry, irc_to_xyz, is_inside, xyz_to_irc
from luna.synth.anatomy import (_Anatomy, _grow_vessels, _lung_depth, _lung_depth_points, _sample_anatomy, _Texture,
                                _Vessels)
from luna.synth.config import NEGATIVE_KINDS, ScanPlan, SynthConfig, format_annotation_mm, format_candidate_mm
from luna.synth.lesions import _EDGE_MM, _MAX_LOBE, _MIN_LOBE, _Blob, _place_blobs

AIR_HU = -1000.0
OUTSIDE_FOV_HU = -2048.0
_CHUNK_VOXELS = 3_000_000  # voxels rendered at once (bounds memory at full size)


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
    """Partial-volume occupancy (0..1) of a tapered tube from p0 (radius r0) to p1 (radius r1) on a voxel box
    (chunk-relative z): :func:`_capsules_occupancy` of this one segment."""
    start = np.array([[box[0].start + k0, box[1].start, box[2].start]])
    shape = np.array([s.stop - s.start for s in box])
    return _capsules_occupancy(a, seg[None], start, shape)[0]


def _segment_boxes(a: _Anatomy, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel boxes [lo, hi) (canonical (i, r, c), clipped to the scan; (S, 3) int arrays) holding every voxel that
    each vessel segment occupies: a cube of half-size reach (half its length + its larger radius + the edge) around
    its midpoint, as :func:`_box`."""
    d = segments[:, 3:6] - segments[:, :3]
    reach = np.sqrt((d * d).sum(axis=1)) / 2 + np.maximum(segments[:, 6], segments[:, 7]) + _EDGE_MM
    irc = a.irc_from_uvw((segments[:, :3] + segments[:, 3:6]) / 2)
    half = reach[:, None] / np.array([a.sz, a.sp, a.sp])
    lo = np.maximum(np.floor(irc - half).astype(int), 0)
    hi = np.minimum(np.ceil(irc + half).astype(int) + 1, np.array(a.shape))
    return lo, hi


_BOX_STEP = 2  # vessel boxes are rounded up to multiples of this many voxels, so that most share a few shapes
_BATCH_VOXELS = 1 << 21  # voxels of one batch of same-shape boxes


def _vessel_occupancy(a: _Anatomy, segments: np.ndarray, lo: np.ndarray, hi: np.ndarray, region_lo: np.ndarray,
                      region_hi: np.ndarray) -> np.ndarray:
    """Maximum occupancy of the vessel segments over the voxel region [region_lo, region_hi) (canonical index).

    The same numbers as :func:`_capsule_occupancy` segment by segment, computed for many segments at once: each
    box (``lo``, ``hi`` from :func:`_segment_boxes`, clipped to the region) is grown to a multiple of _BOX_STEP
    voxels and moved back inside the region where it would leave it. The added voxels lie outside the segment's
    full box, where its occupancy is 0, so the maximum is unchanged; batches of equal shape share each numpy call
    (one call per segment cost ~0.1 ms, a third of a default scan's time)."""
    out = np.zeros(tuple(region_hi - region_lo), dtype=np.float32)
    lo_c, hi_c = np.maximum(lo, region_lo), np.minimum(hi, region_hi)
    keep = np.all(hi_c > lo_c, axis=1)
    if not keep.any():
        return out
    segments, lo_c, hi_c = segments[keep], lo_c[keep], hi_c[keep]
    size = np.minimum(-(-(hi_c - lo_c) // _BOX_STEP) * _BOX_STEP, region_hi - region_lo)
    start = np.minimum(lo_c, region_hi - size)
    shapes, group = np.unique(size, axis=0, return_inverse=True)
    for g, shape in enumerate(shapes):
        members = np.flatnonzero(group.ravel() == g)
        per_batch = max(1, _BATCH_VOXELS // int(np.prod(shape)))
        for b in range(0, len(members), per_batch):
            idx = members[b:b + per_batch]
            occ = _capsules_occupancy(a, segments[idx], start[idx], shape)
            local = start[idx] - region_lo
            for j, (i0, r0, c0) in enumerate(local.tolist()):
                view = out[i0:i0 + shape[0], r0:r0 + shape[1], c0:c0 + shape[2]]
                np.maximum(view, occ[j], out=view)
    return out


def _capsules_occupancy(a: _Anatomy, segments: np.ndarray, start: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy (0..1) of S tapered tubes (p0, p1, r0, r1 per row) on S voxel boxes of one shape
    starting at ``start`` ((S, 3) canonical (i, r, c)): (S, *shape) float32, every element computed by the same
    float32 operations whatever the batch, so a segment's numbers do not depend on its box or batch."""
    f32 = np.float32
    p0 = segments[:, :3]
    steps = [np.arange(int(m)) for m in shape]
    du = (((start[:, 2, None] + steps[2]) - a.cc) * a.sp - p0[:, 0, None]).astype(f32)[:, None, None, :]
    dv = (((start[:, 1, None] + steps[1]) - a.rc) * a.sp - p0[:, 1, None]).astype(f32)[:, None, :, None]
    dw = ((start[:, 0, None] + steps[0]) * a.sz - p0[:, 2, None]).astype(f32)[:, :, None, None]
    d = (segments[:, 3:6] - p0).astype(f32)
    inv_l2 = np.array([f32(1 / max(float(v.dot(v)), 1e-9)) for v in d], dtype=f32)[:, None, None, None]
    d0, d1, d2 = (d[:, k, None, None, None] for k in range(3))
    t = np.clip((du * d0 + dv * d1 + dw * d2) * inv_l2, 0, 1)
    ex, ey, ez = du - t * d0, dv - t * d1, dw - t * d2
    dist = np.sqrt(ex * ex + ey * ey + ez * ez)
    r0 = segments[:, 6].astype(f32)[:, None, None, None]
    dr = (segments[:, 7] - segments[:, 6]).astype(f32)[:, None, None, None]
    radius = r0 + t * dr
    return np.clip((radius - dist) * f32(1 / _EDGE_MM) + f32(0.5), 0, 1)


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
        seg_lo, seg_hi = _segment_boxes(a, s)
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
            sel = np.flatnonzero((seg_w[:, 1] >= k0) & (seg_w[:, 0] < k1))
            vocc = _vessel_occupancy(a, vessels.segments[sel], seg_lo[sel], seg_hi[sel],
                                     np.array([k0, rs.start, cs.start]), np.array([k1, rs.stop, cs.stop]))
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
