"""Helpers shared by the test modules (plain functions; pytest fixtures live in conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def rotation(axis, degrees):
    """Right-handed rotation matrix about a coordinate axis ("x", "y" or "z")."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def fixtures_dir() -> Path:
    """The published-code fixtures: $E3POSE_FIXTURES, else ../shared/fixtures/upstream beside the checkout."""
    env = os.environ.get("E3POSE_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "upstream"


def require_fixtures(*names) -> Path:
    base = fixtures_dir()
    for name in names:
        if not (base / name).exists():
            pytest.skip(f"upstream fixture {name} not found under {base}")
    return base


def small_e3cnn(seed=0, parity_exact=True, **overrides):
    """A narrow E3-CNN (same code as the published one) that runs in well under a second on a 32^3 input."""
    import torch

    from E3PoseLogic.networks.config import E3CNNConfig
    from E3PoseLogic.networks.e3cnn import E3CNN

    cfg = dict(mult=1, n_downsample=2, lmax=2, crop_size=32, parity_exact_pool=parity_exact)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return E3CNN(E3CNNConfig(**cfg)).eval()


def blob_phantom(shape=(40, 40, 40), seed=0):
    """A smooth asymmetric blob image (float32) for equivariance tests."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    ii = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    env = np.exp(-3 * (ii ** 2).sum(0))
    x = (x - x.min()) * env
    x[shape[0] // 2 + 5: shape[0] // 2 + 9, shape[1] // 2 - 3: shape[1] // 2, shape[2] // 2: shape[2] // 2 + 6] += 0.5
    return (x / x.max()).astype(np.float32)
