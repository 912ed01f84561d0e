"""Scanner side of the simulation: voxel grid (spacing, field of view, oblique/mirrored affine, origin), the fetal
head pose in that grid, and the image artefacts (bias field, spin-history bands, resolution loss, Rician noise)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from .. import augment


@dataclass
class AcquisitionConfig:
    """What kinds of volumes to simulate. ``None`` fields are drawn per case."""

    size_mm: Optional[Sequence[float]] = None  # field of view per axis (one value = cube)
    voxel_mm: Optional[Sequence[float]] = None  # spacing per axis (one value = isotropic)
    navigator: bool = False  # ~6 mm voxels over ~380 mm, low SNR, more spin-history bands
    oblique_prob: float = 0.5  # direction cosines rotated off the scanner axes
    mirror_prob: float = 0.15  # det(direction cosines) < 0
    anisotropic_prob: float = 0.3  # thick slices (in-plane 1.2-2.0 mm, slices 3-5 mm)
    max_dim: int = 160
    lowres_prob: float = 0.2
    spin_history_prob: float = 0.3
    bias_prob: float = 0.9

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _three(v) -> np.ndarray:
    return np.broadcast_to(np.asarray(v, dtype=np.float64).ravel(), (3,)).copy() if np.size(v) in (1, 3) else None


def sample_grid(rng: np.random.Generator, cfg: AcquisitionConfig, head_radius_mm: float):
    """(affine float64 4x4, shape) of one acquisition; the field of view always holds a head of that radius."""
    if cfg.voxel_mm is not None:
        spacing = _three(cfg.voxel_mm)
    elif cfg.navigator:
        spacing = np.full(3, rng.uniform(5.5, 6.5))
    elif rng.random() < cfg.anisotropic_prob:
        spacing = np.full(3, rng.uniform(1.2, 2.0))
        spacing[rng.integers(3)] = rng.uniform(3.0, 5.0)
    else:
        spacing = np.full(3, rng.uniform(1.5, 3.0))
    if cfg.size_mm is not None:
        fov = _three(cfg.size_mm)
    elif cfg.navigator:
        fov = np.full(3, rng.uniform(360.0, 400.0))
    else:
        fov = rng.uniform(200.0, 320.0, size=3)
    need = 2.0 * head_radius_mm + 2.0 * spacing
    n = np.maximum(np.round(fov / spacing), np.ceil(need / spacing))
    n = np.minimum(n, cfg.max_dim).astype(int)
    # base orientation: one of the 6 axis permutations (axial / coronal / sagittal stacks), as a proper rotation
    perm = rng.permutation(3)
    D = np.eye(3)[:, perm] * rng.choice([-1.0, 1.0], size=3)
    if np.linalg.det(D) < 0:
        D[:, 0] *= -1.0
    if rng.random() < cfg.oblique_prob:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        D = Rotation.from_rotvec(axis * np.deg2rad(rng.uniform(5.0, 45.0))).as_matrix() @ D
    if rng.random() < cfg.mirror_prob:
        D[:, rng.integers(3)] *= -1.0
    A = np.eye(4)
    A[:3, :3] = D * spacing
    centre_world = rng.normal(scale=30.0, size=3)  # random origin
    A[:3, 3] = centre_world - A[:3, :3] @ ((n - 1) / 2.0)
    # NIfTI stores the sform as float32: use exactly what a reader will get back
    A = A.astype(np.float32).astype(np.float64)
    return A, tuple(int(v) for v in n)


def sample_pose(rng: np.random.Generator, affine, shape, head_radius_mm: float) -> np.ndarray:
    """Phantom -> world 4x4: rotation uniform over SO(3), head centre uniform where the whole head stays inside."""
    A = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((A[:3, :3] ** 2).sum(0))
    n = np.asarray(shape, dtype=np.float64)
    extent = (n - 1) * spacing
    slack = np.maximum(0.0, extent / 2.0 - head_radius_mm - spacing)
    offset_mm = rng.uniform(-1.0, 1.0, size=3) * slack
    centre_idx = (n - 1) / 2.0 + offset_mm / spacing
    pose = np.eye(4)
    pose[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    pose[:3, 3] = A[:3, :3] @ centre_idx + A[:3, 3]
    return pose


def acquire(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, spacing, cfg: AcquisitionConfig,
            slice_axis: Optional[int] = None) -> np.ndarray:
    """Scanner artefacts on a noise-free [0, 1] image: bias field, spin-history bands, resolution loss, Rician noise."""
    v = image.astype(np.float32, copy=True)
    if rng.random() < cfg.bias_prob:
        v = augment.bias_field(v, rng, coefficients=(-0.3, 0.3))
    p_band = min(1.0, cfg.spin_history_prob * (2.0 if cfg.navigator else 1.0))
    for _ in range(int(rng.integers(1, 3))):
        if rng.random() < p_band:
            v = augment.spin_history_band(v, rng, mask=(label == 1), spacing=spacing, sigma_mm=(2.0, 6.0),
                                          alpha=(0.3, 0.9))
    if rng.random() < cfg.lowres_prob:
        v = augment.low_resolution(v, rng, factor=(1.2, 2.0), axis=slice_axis)
    sigma = (0.06, 0.15) if cfg.navigator else (0.01, 0.05)
    return augment.rician_noise(v, rng, sigma=sigma)
