"""Analytic fetal-head phantom in canonical millimetres, rendered on any voxel grid.

Phantom coordinates q (mm) are the canonical axes: x = left-right (points to the fetal left), y = posterior ->
anterior, z = superior -> inferior; the origin is near the brain centre (the exact brain centre of mass is measured
from the rendered label, because the canonical origin is defined that way).

Every structure is an ellipsoid-like shape described by a radial distance d (mm, negative inside) computed from
(|x|, y, z): using |x| makes the head exactly mirror-symmetric about the mid-sagittal plane x = 0, which is what the
E(3)-Pose pseudovector e_x relies on; a small optional term in signed x adds realistic asymmetry. Occupancies are
linear ramps of d over one fine-grid step, and the renderer averages a finer grid into each voxel: partial volume
without a costly high-resolution intermediate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

F32 = np.float32

# Tissue intensity ranges (T2-like: fluid bright, white matter brighter than cortex in the fetus, skull dark).
INTENSITY_RANGES = {
    "csf": (0.85, 1.0), "amniotic": (0.85, 1.0), "wm": (0.55, 0.75), "cortex": (0.28, 0.45),
    "cerebellum": (0.35, 0.5), "brainstem": (0.3, 0.45), "skull": (0.04, 0.18), "scalp": (0.35, 0.55),
    "vitreous": (0.8, 1.0), "lens": (0.08, 0.3), "maternal": (0.25, 0.5), "fat": (0.6, 0.85),
    "body": (0.35, 0.55), "placenta": (0.45, 0.65), "air": (0.0, 0.03),
}


@dataclass
class PhantomParams:
    """Everything random about one head (geometry in canonical mm, intensities in [0, 1]). JSON-able via ``to_dict``."""

    ga_weeks: float
    bpd_mm: float  # biparietal diameter, outer skull
    ofd_mm: float  # occipito-frontal diameter, outer skull
    tcd_mm: float  # transverse cerebellar diameter
    skull_mm: float
    csf_mm: float
    scalp_mm: float
    cortex_mm: float
    cerebrum_centre: np.ndarray  # (3,)
    cerebrum_axes: np.ndarray  # (ax, ay, az superior, az inferior)
    taper: float  # frontal narrowing
    shape_freq: np.ndarray  # (K, 3)
    shape_amp: np.ndarray  # (K,)
    shape_phase: np.ndarray  # (K,)
    fold_freq: np.ndarray
    fold_phase: np.ndarray
    fold_mm: float
    asym_amp: float
    fissure_mm: float
    fissure_z: float
    vent_centre: np.ndarray  # on the +x side
    vent_axes: np.ndarray
    vent_angle: float  # radians, about z
    cb_centre: np.ndarray
    cb_axes: np.ndarray
    bs_centre: np.ndarray
    bs_axes: np.ndarray
    bs_tilt: float  # radians, about x
    eye_centre: np.ndarray  # on the +x side
    eye_radius: float
    iod_mm: float  # eye centre-to-centre distance
    face_centre: np.ndarray
    face_axes: np.ndarray
    body_centre: np.ndarray
    body_axes: np.ndarray
    body_frame: np.ndarray  # 3x3, columns = body axes in canonical coordinates (last = long axis)
    intensity: Dict[str, float] = field(default_factory=dict)
    # --- set only by ``vary_phantom`` (issue 11); the defaults draw the original phantom
    deform_freq: Optional[np.ndarray] = None  # (K, 3) rad/mm
    deform_amp: Optional[np.ndarray] = None  # (K, 3) mm
    deform_phase: Optional[np.ndarray] = None  # (K,)
    sulcus_mm: float = 0.0  # depth of CSF-filled sulci from the cortical surface
    deep_grey_centre: Optional[np.ndarray] = None  # on the +x side
    deep_grey_axes: Optional[np.ndarray] = None

    @property
    def deform_reach_mm(self) -> float:
        """Largest displacement the deformation can make."""
        return 0.0 if self.deform_amp is None else float(np.linalg.norm(self.deform_amp, axis=1).sum())

    @property
    def head_radius_mm(self) -> float:
        """Radius of a sphere about the phantom origin that holds the whole head (scalp and face included)."""
        m = self.csf_mm + self.skull_mm + self.scalp_mm
        bump = 1.0 + float(np.sum(np.abs(self.shape_amp))) + self.asym_amp
        r = [np.linalg.norm(self.cerebrum_centre) + float(np.max(self.cerebrum_axes)) * bump + m + self.fold_mm,
             np.linalg.norm(self.cb_centre) + float(np.max(self.cb_axes)) + m + 2.0,
             np.linalg.norm(self.face_centre) + float(np.max(self.face_axes)),
             np.linalg.norm(self.eye_centre) + self.eye_radius]
        return float(max(r)) + 3.0 + self.deform_reach_mm

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PhantomParams":
        kw = dict(d)
        for k, v in kw.items():
            if isinstance(v, list):
                kw[k] = np.asarray(v, dtype=np.float64)
        return cls(**kw)


def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sample_phantom(rng: np.random.Generator, ga_weeks: Optional[float] = None,
                   ga_range: Tuple[float, float] = (20.0, 38.0), asymmetry: float = 0.01) -> PhantomParams:
    """Draw one head. Sizes follow gestational age (BPD ~45-95 mm, OFD ~55-115 mm, TCD ~ GA mm over 20-38 weeks)."""
    ga = float(rng.uniform(*ga_range)) if ga_weeks is None else float(ga_weeks)
    t = float(np.clip((ga - 20.0) / 18.0, 0.0, 1.0))
    bpd = float(np.clip((45.0 + 50.0 * t) * rng.uniform(0.95, 1.05), 45.0, 95.0))
    ofd = float(np.clip((55.0 + 60.0 * t) * rng.uniform(0.95, 1.05), 55.0, 115.0))
    tcd = float(np.clip(ga * rng.uniform(0.92, 1.08), 18.0, 42.0))
    skull = float(rng.uniform(1.5, 2.8))
    csf = float(rng.uniform(1.5, 3.5))
    scalp = float(rng.uniform(2.0, 4.0))
    cortex = float(rng.uniform(2.0, 3.5))
    m = skull + csf
    ax, ay = bpd / 2.0 - m, ofd / 2.0 - m
    azs = 0.72 * ay * rng.uniform(0.93, 1.07)
    azi = 0.8 * azs * rng.uniform(0.93, 1.07)
    k = 4
    shape_freq = _unit(rng, k) * rng.uniform(1.0, 3.0, size=(k, 1))
    fold_freq = _unit(rng, 6) * rng.uniform(14.0, 24.0, size=(6, 1))
    iod = float(np.clip((30.0 + 20.0 * t) * rng.uniform(0.95, 1.05), 30.0, 50.0))
    eye_r = float(np.clip((8.0 + 7.0 * t) * rng.uniform(0.92, 1.08), 8.0, 15.0)) / 2.0
    eye_c = np.array([iod / 2.0, 0.76 * ay, 0.86 * azi])
    face_c = np.array([0.0, 0.55 * ay, 0.72 * azi])
    face_a = np.array([iod / 2.0 + eye_r + 4.0, 0.5 * ay + eye_r, 0.65 * azi + eye_r])
    neck = np.array([0.0, -0.15 * ay, 0.7 * azi])
    flex = np.deg2rad(rng.uniform(-30.0, 40.0))
    lateral = np.deg2rad(rng.uniform(-20.0, 20.0))
    base = np.array([0.0, -0.25, 1.0]) / np.hypot(0.25, 1.0)
    cx, sx, cy, sy = np.cos(flex), np.sin(flex), np.cos(lateral), np.sin(lateral)
    rot = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    long_axis = rot @ base
    e1 = np.cross([0.0, 1.0, 0.0], long_axis)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(long_axis, e1)
    half_len = 1.1 * ofd * rng.uniform(0.9, 1.1)
    body_c = neck + long_axis * (half_len - 8.0)
    inten = {k_: float(rng.uniform(*r)) for k_, r in INTENSITY_RANGES.items()}
    return PhantomParams(
        ga_weeks=ga, bpd_mm=bpd, ofd_mm=ofd, tcd_mm=tcd, skull_mm=skull, csf_mm=csf, scalp_mm=scalp,
        cortex_mm=cortex, cerebrum_centre=np.array([0.0, 0.0, -0.08 * azs]),
        cerebrum_axes=np.array([ax, ay, azs, azi]), taper=float(rng.uniform(0.04, 0.12)),
        shape_freq=shape_freq, shape_amp=rng.uniform(0.0, 0.025, size=k), shape_phase=rng.uniform(0, 2 * np.pi, k),
        fold_freq=fold_freq, fold_phase=rng.uniform(0, 2 * np.pi, 6), fold_mm=0.5 + 5.0 * t * rng.uniform(0.7, 1.2),
        asym_amp=float(rng.uniform(0.0, asymmetry)), fissure_mm=float(rng.uniform(0.6, 1.3)),
        fissure_z=float(-0.15 * azs),
        vent_centre=np.array([0.17 * ax + 2.5, -0.05 * ay, -0.12 * azs]),
        vent_axes=np.array([rng.uniform(2.5, 4.5), 0.45 * ay * rng.uniform(0.9, 1.1), 0.2 * azs]),
        vent_angle=float(np.deg2rad(rng.uniform(4.0, 14.0))),
        cb_centre=np.array([0.0, -0.5 * ay, 0.7 * azi]),
        cb_axes=np.array([tcd / 2.0, 0.28 * tcd, 0.3 * tcd]),
        bs_centre=np.array([0.0, -0.18 * ay, 0.8 * azi]),
        bs_axes=np.array([0.2 * tcd, 0.24 * tcd, 0.7 * azi]),
        bs_tilt=float(np.deg2rad(rng.uniform(10.0, 25.0))),
        eye_centre=eye_c, eye_radius=eye_r, iod_mm=iod, face_centre=face_c, face_axes=face_a,
        body_centre=body_c, body_axes=np.array([0.55 * bpd, 0.5 * bpd, half_len]),
        body_frame=np.stack([e1, e2, long_axis], axis=1), intensity=inten,
    )


@dataclass
class Variation:
    """Randomisation for transfer beyond the phantom (issue 11, SynthSeg-style). Off by default, and drawn from a
    generator of its own, so that every seed keeps the images it always had."""

    random_contrast: float = 0.0  # probability that every tissue's intensity is drawn U(0, 1) on its own
    deform_mm: float = 0.0  # largest smooth displacement of the anatomy; per case U(0, deform_mm)
    anatomy: bool = False  # CSF-filled sulci (deepening with age) and deep grey nuclei

    @property
    def active(self) -> bool:
        return self.random_contrast > 0 or self.deform_mm > 0 or self.anatomy

    def to_dict(self) -> dict:
        return asdict(self)


DEFORM_COMPONENTS = 4
DEFORM_WAVELENGTH_MM = (35.0, 90.0)
DEFORM_MAX_GRADIENT = 0.5  # bound on |du/dq|: the map stays one-to-one (no folded anatomy)


def vary_phantom(P: PhantomParams, rng: np.random.Generator, variation: Variation) -> PhantomParams:
    """A copy of ``P`` with random contrast, deformation and anatomy drawn from ``rng`` as ``variation`` asks.

    Random contrast draws every tissue (and the surroundings) U(0, 1) independently: inverted and flat contrasts
    included, so that a network learns shapes, not one MRI weighting. The deformation is a sum of a few smooth
    sinusoidal displacements in canonical mm (both hemispheres deform differently: a real head is not exactly
    mirror-symmetric); the pose label stays the undeformed head's frame.
    """
    from dataclasses import replace

    inten = dict(P.intensity)
    if variation.random_contrast > 0 and rng.random() < variation.random_contrast:
        inten = {k: float(rng.uniform(0.0, 1.0)) for k in sorted(INTENSITY_RANGES)}
        inten["deepgrey"] = float(rng.uniform(0.0, 1.0))
    else:
        inten["deepgrey"] = float(_lerp(inten["cortex"], inten["wm"], rng.uniform(0.2, 0.6)))
    kw = dict(intensity=inten)
    if variation.deform_mm > 0:
        k = DEFORM_COMPONENTS
        freq = _unit(rng, k) * (2 * np.pi / rng.uniform(*DEFORM_WAVELENGTH_MM, size=(k, 1)))
        amp = _unit(rng, k) * rng.uniform(0.2, 1.0, size=(k, 1))
        amp *= rng.uniform(0.0, variation.deform_mm) / np.linalg.norm(amp, axis=1).sum()
        grad = float((np.linalg.norm(amp, axis=1) * np.linalg.norm(freq, axis=1)).sum())
        if grad > DEFORM_MAX_GRADIENT:
            amp *= DEFORM_MAX_GRADIENT / grad
        kw.update(deform_freq=freq, deform_amp=amp, deform_phase=rng.uniform(0, 2 * np.pi, k))
    if variation.anatomy:
        t = float(np.clip((P.ga_weeks - 20.0) / 18.0, 0.0, 1.0))
        ax, ay, azs = P.cerebrum_axes[:3]
        kw.update(sulcus_mm=float(t * rng.uniform(0.4, 1.0) * (P.cortex_mm + P.fold_mm)),
                  deep_grey_centre=np.array([0.2 * ax, 0.02 * ay, 0.05 * azs]) * rng.uniform(0.9, 1.1, 3),
                  deep_grey_axes=np.array([0.14 * ax, 0.22 * ay, 0.2 * azs]) * rng.uniform(0.85, 1.15, 3))
    return replace(P, **kw)


def _deform(qx, qy, qz, P: PhantomParams):
    """Material coordinates q + u(q) of the points q: the anatomy drawn there."""
    dx, dy, dz = np.zeros_like(qx), np.zeros_like(qy), np.zeros_like(qz)
    for f, a, ph in zip(P.deform_freq.astype(F32), P.deform_amp.astype(F32), P.deform_phase):
        s = np.sin(qx * f[0] + qy * f[1] + qz * f[2] + F32(ph))
        dx += a[0] * s
        dy += a[1] * s
        dz += a[2] * s
    return qx + dx, qy + dy, qz + dz


# ------------------------------------------------------------------------------------------------------- geometry
def _ellipsoid_d(x, y, z, ax, ay, az, scale=None):
    """Radial distance (mm) to an axis-aligned ellipsoid surface: negative inside. ``scale`` = 1 + delta(direction)."""
    r = np.sqrt(x * x + y * y + z * z) + F32(1e-4)
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2) + F32(1e-6)
    surf = r / rho if scale is None else r * scale / rho
    return r - surf


def _occ(d, w, offset=0.0):
    """Occupancy of {d < offset}: a ramp one step ``w`` wide (partial volume)."""
    return np.clip(F32(0.5) - (d - F32(offset)) / F32(w), 0.0, 1.0)


def _lerp(a, b, t):
    return a + (b - a) * t


def head_layers(qx, qy, qz, P: PhantomParams, w: float):
    """Evaluate the head at canonical points (float32 arrays, any shape), ramp width ``w`` mm.

    Returns (intensity inside the head, head occupancy, brain occupancy, eye occupancy). The head's contribution
    to a voxel is intensity * occupancy; outside it the environment shows.
    """
    it = P.intensity
    if P.deform_amp is not None:
        qx, qy, qz = _deform(qx, qy, qz, P)
    ax_ = np.abs(qx)
    c = P.cerebrum_centre.astype(F32)
    x, y, z = ax_ - c[0], qy - c[1], qz - c[2]
    r = np.sqrt(x * x + y * y + z * z) + F32(1e-4)
    ux, uy, uz = x / r, y / r, z / r
    scale = np.ones_like(r)
    for f, a, ph in zip(P.shape_freq.astype(F32), P.shape_amp, P.shape_phase):
        scale += F32(a) * np.cos(ux * f[0] + uy * f[1] + uz * f[2] + F32(ph))
    if P.asym_amp > 0:
        scale += F32(P.asym_amp) * np.sin(F32(2.0) * (qx - c[0]) / r + F32(1.3) * uy)
    a = P.cerebrum_axes.astype(F32)
    ax_eff = a[0] * (F32(1.0) - F32(P.taper) * np.clip(y / a[1], -1.0, 1.0))
    az_eff = np.where(z < 0, a[2], a[3])
    d_cer = _ellipsoid_d(x, y, z, ax_eff, a[1], az_eff, scale)
    fold = np.zeros_like(r)
    for f, ph in zip(P.fold_freq.astype(F32), P.fold_phase):
        fold += np.cos(ux * f[0] + uy * f[1] + uz * f[2] + F32(ph))
    # white-matter boundary folds inward (gyri) but never reaches the surface: the cortical ribbon stays visible
    fold = np.clip(F32(0.5) + fold / F32(2.0 * np.sqrt(len(P.fold_phase))), 0.0, 1.0)
    d_wm = d_cer + F32(P.cortex_mm) + fold * F32(P.fold_mm)
    del ux, uy, uz, scale, ax_eff, az_eff

    cb = P.cb_centre.astype(F32)
    d_cb = _ellipsoid_d(qx - cb[0], qy - cb[1], qz - cb[2], *P.cb_axes.astype(F32))
    m1, m2, m3 = P.csf_mm, P.csf_mm + P.skull_mm, P.csf_mm + P.skull_mm + P.scalp_mm
    fc = P.face_centre.astype(F32)
    d_face = _ellipsoid_d(qx - fc[0], qy - fc[1], qz - fc[2], *P.face_axes.astype(F32))
    occ_head = np.maximum(np.maximum(_occ(d_cer, w, m3), _occ(d_cb, w, m3)), _occ(d_face, w))
    skull_in = np.maximum(_occ(d_cer, w, m1), _occ(d_cb, w, m1 + 1.0))
    skull_out = np.maximum(_occ(d_cer, w, m2), _occ(d_cb, w, m2 + 1.0))

    img = np.full_like(r, it["scalp"])
    img = _lerp(img, F32(it["skull"]), skull_out)
    img = _lerp(img, F32(it["csf"]), skull_in)
    o_cer = _occ(d_cer, w)
    img = _lerp(img, F32(it["cortex"]), o_cer)
    img = _lerp(img, F32(it["wm"]), _occ(d_wm, w))
    if P.sulcus_mm > 0:  # CSF clefts in the valleys of the folding pattern, deepest at their middle
        valley = np.clip((fold - F32(0.72)) / F32(0.2), 0.0, 1.0)
        img = _lerp(img, F32(it["csf"]), o_cer * _occ(-d_cer, w, F32(P.sulcus_mm) * valley))
        del valley
    del fold
    if P.deep_grey_centre is not None:  # thalami / basal ganglia (mirrored)
        gc, ga = P.deep_grey_centre.astype(F32), P.deep_grey_axes.astype(F32)
        img = _lerp(img, F32(it["deepgrey"]), _occ(_ellipsoid_d(ax_ - gc[0], qy - gc[1], qz - gc[2], *ga), w))
    # interhemispheric fissure down to an arch (corpus callosum level), deeper at the frontal and occipital poles
    z_cut = F32(P.fissure_z) + F32(0.9 * P.cerebrum_axes[2]) * np.clip(y / a[1], -1.0, 1.0) ** 2
    o_fis = _occ(ax_, w, P.fissure_mm) * _occ(qz - z_cut, w) * o_cer
    img = _lerp(img, F32(it["csf"]), o_fis)
    del d_wm, o_fis

    # lateral ventricles (mirrored), rotated about z so that the frontal horns converge
    vc, va, th = P.vent_centre.astype(F32), P.vent_axes.astype(F32), P.vent_angle
    vx, vy = ax_ - vc[0], qy - vc[1]
    ct, st = F32(np.cos(th)), F32(np.sin(th))
    d_v = _ellipsoid_d(ct * vx + st * vy, -st * vx + ct * vy, qz - vc[2], *va)
    img = _lerp(img, F32(it["csf"]), _occ(d_v, w))
    del vx, vy, d_v

    o_cb = _occ(d_cb, w)
    img = _lerp(img, F32(it["csf"]), _occ(d_cb, w, 2.0) * skull_in)  # cisterna magna / CSF around the cerebellum
    img = _lerp(img, F32(it["cerebellum"]), o_cb)

    bc, ba, tl = P.bs_centre.astype(F32), P.bs_axes.astype(F32), P.bs_tilt
    by, bz = qy - bc[1], qz - bc[2]
    ct, st = F32(np.cos(tl)), F32(np.sin(tl))
    d_bs = _ellipsoid_d(qx - bc[0], ct * by - st * bz, st * by + ct * bz, *ba)
    o_bs = _occ(d_bs, w) * occ_head
    img = _lerp(img, F32(it["brainstem"]), o_bs)
    brain = np.maximum(np.maximum(o_cer, o_cb), o_bs * skull_in)
    del by, bz, d_bs

    ec = P.eye_centre.astype(F32)
    ex, ey, ez = ax_ - ec[0], qy - ec[1], qz - ec[2]
    re = F32(P.eye_radius)
    d_eye = np.sqrt(ex * ex + ey * ey + ez * ez) - re
    eye = _occ(d_eye, w)
    img = _lerp(img, F32(it["vitreous"]), eye)
    ly = ey - F32(0.62) * re
    d_lens = np.sqrt(ex * ex + ly * ly + ez * ez) - F32(0.3) * re
    img = _lerp(img, F32(it["lens"]), _occ(d_lens, w))
    return img, occ_head, brain, eye


# -------------------------------------------------------------------------------------------------------- render
def _axis_coords(M, b, fi, fj, fk):
    """Canonical coordinates of a separable index grid: q = M @ (i, j, k) + b, as three broadcast float32 arrays."""
    fi, fj, fk = (np.asarray(v, dtype=np.float64) for v in (fi, fj, fk))
    out = []
    for r in range(3):
        a = (M[r, 0] * fi + b[r]).astype(F32)[:, None, None]
        out.append(a + (M[r, 1] * fj).astype(F32)[None, :, None] + (M[r, 2] * fk).astype(F32)[None, None, :])
    return out


def _texture(rng, shape, n=6, amplitude=0.12):
    """Smooth random multiplicative texture (maternal organs, fetal body): low-resolution noise, upsampled."""
    from scipy import ndimage

    small = rng.normal(size=(n, n, n)).astype(F32)
    tex = ndimage.zoom(small, np.asarray(shape) / n, order=1, mode="nearest", grid_mode=True)
    return F32(1.0) + F32(amplitude) * tex[: shape[0], : shape[1], : shape[2]]


@dataclass
class Environment:
    """Maternal surroundings in world mm: uterus (amniotic fluid) and abdomen ellipsoids, placenta cap, texture seed."""

    uterus_centre: np.ndarray
    uterus_axes: np.ndarray
    uterus_frame: np.ndarray  # 3x3 columns
    wall_mm: float  # maternal tissue between uterus and abdominal surface
    fat_mm: float
    placenta_dir: np.ndarray
    placenta_mm: float
    texture_seed: int

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


def sample_environment(rng: np.random.Generator, head_centre: np.ndarray, head_radius: float) -> Environment:
    """Uterus big enough to hold the head wherever the offset puts it."""
    from scipy.spatial.transform import Rotation

    axes = rng.uniform(head_radius + 20.0, head_radius + 70.0, size=3)
    slack = max(0.0, float(axes.min()) - head_radius - 8.0)
    off = rng.normal(size=3)
    off *= rng.uniform(0.0, slack) / max(np.linalg.norm(off), 1e-9)
    pd = rng.normal(size=3)
    return Environment(
        uterus_centre=np.asarray(head_centre, float) + off, uterus_axes=axes,
        uterus_frame=Rotation.random(random_state=rng).as_matrix(), wall_mm=float(rng.uniform(15.0, 60.0)),
        fat_mm=float(rng.uniform(5.0, 20.0)), placenta_dir=pd / np.linalg.norm(pd),
        placenta_mm=float(rng.uniform(15.0, 35.0)), texture_seed=int(rng.integers(2 ** 31)))


def _environment_image(P: PhantomParams, env: Environment, affine, shape, pose, w):
    """Whole-grid background: air, abdominal fat, maternal tissue, placenta, amniotic fluid, fetal body."""
    it = P.intensity
    A = np.asarray(affine, float)
    ii, jj, kk = (np.arange(n) for n in shape)
    # uterus-frame coordinates
    Mu = env.uterus_frame.T @ A[:3, :3]
    bu = env.uterus_frame.T @ (A[:3, 3] - env.uterus_centre)
    ux, uy, uz = _axis_coords(Mu, bu, ii, jj, kk)
    au = env.uterus_axes.astype(F32)
    d_ut = _ellipsoid_d(ux, uy, uz, *au)
    d_ab = _ellipsoid_d(ux, uy, uz, *(au + F32(env.wall_mm)))
    r = np.sqrt(ux * ux + uy * uy + uz * uz) + F32(1e-4)
    pdir = (env.uterus_frame.T @ env.placenta_dir).astype(F32)
    cap = np.clip((ux * pdir[0] + uy * pdir[1] + uz * pdir[2]) / r - F32(0.55), 0.0, 0.1) * F32(10.0)
    del ux, uy, uz, r
    trng = np.random.default_rng(env.texture_seed)
    tex = _texture(trng, shape)
    img = np.full(shape, it["air"], dtype=F32)
    img = _lerp(img, F32(it["fat"]), _occ(d_ab, w))
    img = _lerp(img, F32(it["maternal"]) * tex, _occ(d_ab, w, -env.fat_mm))
    o_ut = _occ(d_ut, w)
    img = _lerp(img, F32(it["amniotic"]), o_ut)
    img = _lerp(img, F32(it["placenta"]) * tex, o_ut * _occ(-d_ut, w, env.placenta_mm) * cap)
    del d_ab, cap
    # fetal body in its own frame (canonical -> body frame)
    R, t = pose[:3, :3], pose[:3, 3]
    Mb = P.body_frame.T @ R.T @ A[:3, :3]
    bb = P.body_frame.T @ (R.T @ (A[:3, 3] - t) - P.body_centre)
    bx, by, bz = _axis_coords(Mb, bb, ii, jj, kk)
    d_b = _ellipsoid_d(bx, by, bz, *P.body_axes.astype(F32))
    tex2 = _texture(trng, shape, n=9, amplitude=0.2)
    img = _lerp(img, F32(it["body"]) * tex2, _occ(d_b, w) * o_ut)
    return img


def render(P: PhantomParams, affine, shape, pose, environment: Optional[Environment] = None,
           fine_mm: float = 1.5, max_points: int = 400_000):
    """Noise-free image (float32, about [0, 1]) and label (uint8: 0 background, 1 brain, 2 eyes) on a voxel grid.

    ``pose``: 4x4 phantom (canonical mm) -> world RAS mm. ``affine``: voxel index -> world. The head is evaluated
    on a finer grid (each voxel split into round(spacing / fine_mm) steps per axis) only inside its bounding box and
    averaged into voxels; the environment (if given) is evaluated once per voxel.
    """
    A = np.asarray(affine, dtype=np.float64)
    pose = np.asarray(pose, dtype=np.float64)
    shape = tuple(int(n) for n in shape)
    spacing = np.sqrt((A[:3, :3] ** 2).sum(0))
    w_env = float(np.mean(spacing))
    image = (_environment_image(P, environment, A, shape, pose, w_env) if environment is not None
             else np.zeros(shape, dtype=F32))
    label = np.zeros(shape, dtype=np.uint8)

    ss = np.maximum(1, np.round(spacing / fine_mm)).astype(int)
    w = float(np.min(spacing / ss))
    centre = np.linalg.solve(A, np.append(pose[:3, 3], 1.0))[:3]
    half = P.head_radius_mm / spacing + 1.0
    lo = np.clip(np.floor(centre - half).astype(int), 0, shape)
    hi = np.clip(np.ceil(centre + half).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        return image, label
    R, t = pose[:3, :3], pose[:3, 3]
    M = R.T @ A[:3, :3]
    b = R.T @ (A[:3, 3] - t)

    def fine(lo_, hi_, s):
        return lo_ + (np.arange((hi_ - lo_) * s) + 0.5) / s - 0.5

    fj, fk = fine(lo[1], hi[1], ss[1]), fine(lo[2], hi[2], ss[2])
    rows = max(1, int(max_points // (len(fj) * len(fk) * ss[0])))
    nj, nk = hi[1] - lo[1], hi[2] - lo[2]
    for i0 in range(lo[0], hi[0], rows):
        i1 = min(hi[0], i0 + rows)
        qx, qy, qz = _axis_coords(M, b, fine(i0, i1, ss[0]), fj, fk)
        img, occ, brain, eye = head_layers(qx, qy, qz, P, w)
        del qx, qy, qz
        blk = (i1 - i0, ss[0], nj, ss[1], nk, ss[2])

        def avg(a):
            return np.broadcast_to(a, (blk[0] * blk[1], blk[2] * blk[3], blk[4] * blk[5])).reshape(blk).mean(
                axis=(1, 3, 5), dtype=F32)

        occ_v = avg(occ)
        head_v = avg(img * occ)
        sl = (slice(i0, i1), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        image[sl] = image[sl] * (F32(1.0) - occ_v) + head_v
        lab = np.zeros(occ_v.shape, dtype=np.uint8)
        lab[avg(brain) >= 0.5] = 1
        lab[avg(eye) >= 0.5] = 2
        label[sl] = lab
    return image, label


def canonical_grid(spacing: float = 1.0, radius_mm: float = 90.0):
    """(affine, shape) of an axis-aligned grid centred on the phantom origin: world = phantom coordinates.

    The grid is symmetric about x = 0, so flipping the array along axis 0 mirrors about the mid-sagittal plane.
    """
    n = int(np.ceil(2 * radius_mm / spacing)) + 1
    A = np.diag([spacing, spacing, spacing, 1.0])
    A[:3, 3] = -spacing * (n - 1) / 2.0
    return A, (n, n, n)


def render_canonical(P: PhantomParams, spacing: float = 1.0, radius_mm: Optional[float] = None, fine_mm=1.5):
    """The head in canonical pose (no environment): (image, label, affine with origin at the brain centre of mass).

    The returned affine maps voxel index -> canonical mm (origin = centre of mass of label 1), the canonical frame
    of E(3)-Pose; ``com_phantom`` (4th return) is where that origin sits in phantom coordinates.
    """
    from scipy import ndimage

    r = P.head_radius_mm + 2 * spacing if radius_mm is None else radius_mm
    A, shape = canonical_grid(spacing, r)
    img, lab = render(P, A, shape, np.eye(4), None, fine_mm=fine_mm)
    com_idx = np.asarray(ndimage.center_of_mass(lab == 1))
    com = A[:3, :3] @ com_idx + A[:3, 3]
    A2 = A.copy()
    A2[:3, 3] -= com
    return img, lab, A2, com
