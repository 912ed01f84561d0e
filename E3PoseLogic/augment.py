"""Augmentation for training (numpy/scipy only), and the MRI artefacts that ``synth`` adds to its phantoms.

Every function takes an explicit ``np.random.Generator`` so that a worker seeded once reproduces its draws, and
returns a new array (inputs are never modified). Intensity functions return float32.

Published settings (E(3)-Pose reference implementation, see ``augment_intensity``):
- E3-CNN: bias field (order 3, coefficients U(0, 0.5)) -> min-max -> spin-history band (sigma 2.3-4.6 mm,
  alpha 0.5-1.5) -> (p 0.9) isotropic resolution loss, factor U(1, 2.5) -> percentile 0.5-99.5 % -> gamma exp(U(-2, 0.1));
  spatial: Euler angles U(+-90) per axis, about the array centre, after the crop.
- U-Net: bias field -> percentile -> spin-history band (sigma 1.5-2.3 mm) -> optional resolution loss (off by default;
  p 0.75, down to 8 mm) -> (p 0.9) Gaussian noise sigma U(0, 0.03) -> min-max -> gamma exp(U(-0.8, 0)).

Rotation targets: ``random_rotation`` moves what sits at array-axis position v (mm, about the array centre) to A v.
The canonical axes written in the voxel-axis frame (``rotation_voxel``, columns) become A @ rotation_voxel, so the CSV
rotation (voxel -> canonical, R_vc = rotation_voxel.T) becomes R_target = R_vc @ A^-1 = R_vc @ A.T.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .preprocess import minmax  # the pipeline's (torchio's) min-max: a constant volume is returned unchanged

Range = Tuple[float, float]


def _spacing3(spacing) -> np.ndarray:
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if np.any(s <= 0):
        raise ValueError(f"spacing must be positive, got {s.tolist()}")
    return s


def _uniform(rng: np.random.Generator, r) -> float:
    if np.isscalar(r):
        return float(r)
    lo, hi = r
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


# ------------------------------------------------------------------------------------------------------- spatial
def random_rotation_matrix(rng: np.random.Generator, max_angle_deg: Optional[float] = 180.0) -> np.ndarray:
    """A proper 3x3 rotation. ``None``: uniform over SO(3). Else upstream's draw: Euler angles U(-max, max) about
    the array axes, composed A = Rx @ Ry @ Rz (not uniform over SO(3), even at 180)."""
    if max_angle_deg is None:
        return Rotation.random(random_state=rng).as_matrix()
    a = rng.uniform(-max_angle_deg, max_angle_deg, size=3)
    rx, ry, rz = (Rotation.from_euler(ax, ang, degrees=True).as_matrix() for ax, ang in zip("xyz", a))
    return rx @ ry @ rz


def rotate_about_centre(array: np.ndarray, A: np.ndarray, order: int, spacing=1.0, cval: float = 0.0) -> np.ndarray:
    """Resample ``array`` so that content at array-axis position v (mm from the array centre) moves to A v."""
    s = _spacing3(spacing)
    c = (np.asarray(array.shape[:3], dtype=np.float64) - 1.0) / 2.0
    # output index o -> input index S^-1 A^T S (o - c) + c
    m = np.diag(1.0 / s) @ np.asarray(A, dtype=np.float64).T @ np.diag(s)
    offset = c - m @ c
    # grid-constant: points a round-off outside the array still interpolate the edge (plain "constant" zeroed the
    # border faces even for exact 90-degree turns)
    out = ndimage.affine_transform(array, m, offset=offset, order=order, mode="grid-constant", cval=cval,
                                   prefilter=False)
    return out.astype(array.dtype, copy=False)


def random_rotation(volume: np.ndarray, mask: Optional[np.ndarray], rng: np.random.Generator,
                    max_angle_deg: Optional[float] = 180.0, spacing=1.0):
    """Rotate image (linear) and label map (nearest) together about the array centre by a random A.

    Returns ``(volume_rot, mask_rot_or_None, A)``; A is the proper rotation in the array-axis frame (mm), and the
    training target becomes R_target = R_vc @ A.T (see module docstring). Zero fill outside the field of view.
    """
    A = random_rotation_matrix(rng, max_angle_deg)
    v = rotate_about_centre(volume, A, order=1, spacing=spacing)
    m = None if mask is None else rotate_about_centre(mask, A, order=0, spacing=spacing)
    return v, m, A


# ----------------------------------------------------------------------------------------------------- intensity
def percentile_normalise(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Map the [lower, upper] percentiles to [0, 1] and clip: robust to single bright voxels, unlike min-max."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, [lower, upper])
    if not hi > lo:
        return minmax(v)
    return np.clip((v - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def bias_field(volume: np.ndarray, rng: np.random.Generator, order: int = 3,
               coefficients: Range = (0.0, 0.5), return_field: bool = False):
    """Multiply by exp(polynomial) of total degree <= ``order`` in coordinates normalised to [-1, 1] per axis.

    Same model as torchio's RandomBiasField (used upstream); evaluated separably so a 160^3 field costs a few
    array passes.
    """
    v = np.asarray(volume, dtype=np.float32)
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in v.shape[:3])
    log_f = np.zeros(v.shape[:3], dtype=np.float32)
    for a in range(order + 1):
        h = np.zeros((v.shape[1], v.shape[2]), dtype=np.float32)
        for b in range(order + 1 - a):
            g = np.zeros(v.shape[2], dtype=np.float32)
            for c in range(order + 1 - a - b):
                g += np.float32(_uniform(rng, coefficients)) * z ** c
            h += np.outer(y ** b, g)
        log_f += (x ** a)[:, None, None] * h[None]
    field = np.exp(log_f)
    out = v * (field if v.ndim == 3 else field[..., None])
    return (out, field) if return_field else out


def spin_history_band(volume: np.ndarray, rng: np.random.Generator, mask: Optional[np.ndarray] = None,
                      spacing=1.0, sigma_mm: Range = (1.5, 2.3), alpha: Range = (0.5, 1.5),
                      p_outside: float = 0.2) -> np.ndarray:
    """Multiply by a dark Gaussian slab 1 - alpha exp(-d^2 / 2 sigma^2) across a plane (clipped at 0).

    Interleaved acquisitions with motion leave such bands. With a mask, as upstream: the plane normal joins a random
    mask-boundary point to the farthest boundary point, and the plane sits near the mask edge (Beta(0.2, 0.2) along
    the normal) or, with ``p_outside``, just outside it. Without a mask: random normal through a random point.
    """
    v = np.asarray(volume, dtype=np.float32)
    s = _spacing3(spacing)
    shape = np.asarray(v.shape[:3])
    pts = None
    if mask is not None and np.any(mask):
        m = np.asarray(mask) > 0
        boundary = m & ~ndimage.binary_erosion(m)
        pts = np.argwhere(boundary).astype(np.float64) * s
        if len(pts) > 4000:  # the farthest-point search is quadratic otherwise
            pts = pts[rng.choice(len(pts), 4000, replace=False)]
    if pts is not None and len(pts) >= 2:
        p0 = pts[rng.integers(len(pts))]
        far = pts[np.argmax(np.sum((pts - p0) ** 2, axis=1))]
        n = far - p0
        if np.linalg.norm(n) < 1e-6:
            n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        proj = pts @ n
        lo, hi = float(proj.min()), float(proj.max())
        if rng.random() < p_outside:
            sig = _uniform(rng, sigma_mm)
            pos = lo - rng.uniform(0, 3 * sig) if rng.random() < 0.5 else hi + rng.uniform(0, 3 * sig)
        else:
            pos = lo + rng.beta(0.2, 0.2) * (hi - lo)
    else:
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        pos = float((rng.uniform(0, 1, 3) * (shape - 1) * s) @ n)
    sigma = _uniform(rng, sigma_mm)
    a = _uniform(rng, alpha)
    d = (np.arange(shape[0], dtype=np.float32) * np.float32(s[0] * n[0]))[:, None, None] \
        + (np.arange(shape[1], dtype=np.float32) * np.float32(s[1] * n[1]))[None, :, None] \
        + (np.arange(shape[2], dtype=np.float32) * np.float32(s[2] * n[2]))[None, None, :] - np.float32(pos)
    factor = np.clip(1.0 - np.float32(a) * np.exp(-d * d / np.float32(2.0 * sigma * sigma)), 0.0, None)
    return v * (factor if v.ndim == 3 else factor[..., None])


def low_resolution(volume: np.ndarray, rng: np.random.Generator, factor: Range = (1.0, 2.5),
                   axis: Union[None, int, str] = None) -> np.ndarray:
    """Lose resolution: anti-aliasing blur, downsample by a random factor, linear upsample back to the same shape.

    ``axis=None``: isotropic (all axes); an int: that axis only (thick slices); ``"random"``: one random axis.
    """
    v = np.asarray(volume, dtype=np.float32)
    f = _uniform(rng, factor)
    if axis == "random":
        axis = int(rng.integers(3))
    axes = range(3) if axis is None else [int(axis)]
    zoom = np.ones(3)
    for a in axes:
        zoom[a] = 1.0 / f
    if np.allclose(zoom, 1.0):
        return v.copy()
    sigma = np.where(zoom < 1.0, 0.4 * (1.0 / zoom), 0.0)  # ~ box slice profile of width f voxels
    blurred = ndimage.gaussian_filter(v, sigma=sigma, mode="nearest", truncate=3.0)
    small_shape = np.maximum(2, np.round(np.asarray(v.shape[:3]) * zoom).astype(int))
    small = ndimage.zoom(blurred, small_shape / np.asarray(v.shape[:3]), order=1, mode="nearest", grid_mode=False)
    back = np.asarray(v.shape[:3]) / np.asarray(small.shape)
    out = ndimage.zoom(small, back, order=1, mode="nearest", grid_mode=False)
    if out.shape != v.shape:  # rounding of the zoom output shape: pad/crop the last plane
        fixed = np.zeros_like(v)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, v.shape))
        fixed[sl] = out[sl]
        out = fixed
    return out.astype(np.float32, copy=False)


def gaussian_noise(volume: np.ndarray, rng: np.random.Generator, sigma: Range = (0.0, 0.03)) -> np.ndarray:
    """Add N(0, sigma^2) noise, sigma in intensity units (the published range assumes a [0, 1] volume)."""
    v = np.asarray(volume, dtype=np.float32)
    s = _uniform(rng, sigma)
    return v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(s)


def rician_noise(volume: np.ndarray, rng: np.random.Generator, sigma: Range = (0.01, 0.05)) -> np.ndarray:
    """Magnitude of complex Gaussian noise: the noise of magnitude MR images (biased upward in dark regions)."""
    v = np.asarray(volume, dtype=np.float32)
    s = np.float32(_uniform(rng, sigma))
    re = v + rng.standard_normal(v.shape, dtype=np.float32) * s
    im = rng.standard_normal(v.shape, dtype=np.float32) * s
    return np.sqrt(re * re + im * im)


def gamma(volume: np.ndarray, rng: np.random.Generator, log_gamma: Range = (-0.8, 0.0)) -> np.ndarray:
    """Contrast change: min-max to [0, 1], then raise to exp(U(log_gamma))."""
    g = np.float32(np.exp(_uniform(rng, log_gamma)))
    return np.power(minmax(volume), g).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ composed
PRESETS = {
    # E3-CNN (notes section 6): the spin-history band has no stated probability upstream: always applied.
    "e3cnn": dict(bias_p=1.0, bias_coefficients=(0.0, 0.5), spin_history_p=1.0, spin_sigma_mm=(2.3, 4.6),
                  spin_alpha=(0.5, 1.5), lowres_p=0.9, lowres_factor=(1.0, 7.5 / 3.0), lowres_axis=None,
                  noise_p=0.0, noise_sigma=(0.0, 0.03), log_gamma=(-2.0, 0.1), chain="e3cnn"),
    # U-Net (notes section 2); resolution loss is off by default upstream (--randomise_res): lowres_p 0.
    "unet": dict(bias_p=1.0, bias_coefficients=(0.0, 0.5), spin_history_p=1.0, spin_sigma_mm=(1.5, 2.3),
                 spin_alpha=(0.5, 1.5), lowres_p=0.0, lowres_factor=(1.0, 8.0 / 3.0), lowres_axis=None,
                 noise_p=0.9, noise_sigma=(0.0, 0.03), log_gamma=(-0.8, 0.0), chain="unet"),
}


def augment_intensity(volume: np.ndarray, rng: np.random.Generator, cfg: Union[str, dict] = "e3cnn",
                      mask: Optional[np.ndarray] = None, spacing=3.0) -> np.ndarray:
    """The published intensity chain; returns float32 in [0, 1].

    ``cfg``: a preset name ("e3cnn", "unet") or a dict of overrides, with an optional ``"preset"`` key (default
    "e3cnn"); keys as in ``PRESETS``. ``mask`` (brain) places the spin-history band near the brain edge;
    ``spacing`` (mm, training data are 3 mm) converts its sigma from mm to voxels.
    """
    if isinstance(cfg, str):
        c = dict(PRESETS[cfg])
    else:
        c = dict(PRESETS[cfg.get("preset", "e3cnn")])
        unknown = set(cfg) - set(c) - {"preset"}
        if unknown:
            raise ValueError(f"unknown augmentation settings: {sorted(unknown)}")
        c.update({k: v for k, v in cfg.items() if k != "preset"})
    v = minmax(volume)
    if rng.random() < c["bias_p"]:
        v = bias_field(v, rng, coefficients=c["bias_coefficients"])
    # e3cnn: min-max before the band, percentile after resolution loss; unet: percentile right after the bias field
    v = percentile_normalise(v) if c["chain"] == "unet" else minmax(v)
    if rng.random() < c["spin_history_p"]:
        v = spin_history_band(v, rng, mask=mask, spacing=spacing, sigma_mm=c["spin_sigma_mm"], alpha=c["spin_alpha"])
    if rng.random() < c["lowres_p"]:
        v = low_resolution(v, rng, factor=c["lowres_factor"], axis=c["lowres_axis"])
    if c["chain"] != "unet":
        v = percentile_normalise(v)
    if rng.random() < c["noise_p"]:
        v = gaussian_noise(v, rng, sigma=c["noise_sigma"])
    v = gamma(v, rng, log_gamma=c["log_gamma"])  # min-max inside
    return v.astype(np.float32, copy=False)
