"""Augmentation: shapes/dtypes kept, finite, deterministic per generator, rotation round trip and target convention."""
from __future__ import annotations

import numpy as np
import pytest

from E3PoseLogic import augment as aug


def blob(shape=(40, 44, 36)):
    idx = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    mask = (((idx / [12.0, 9.0, 7.0]) ** 2).sum(-1) <= 1).astype(np.uint8)
    mask[idx[..., 1] > 4] *= 2  # an asymmetric second label
    vol = (mask > 0) * 0.6 + 0.2 + 0.05 * np.sin(idx[..., 0] / 3.0)
    return vol.astype(np.float32), mask


def dice(a, b):
    return 2.0 * np.sum(a & b) / max(1, a.sum() + b.sum())


INTENSITY = {
    "bias_field": lambda v, r: aug.bias_field(v, r),
    "spin_history_band": lambda v, r: aug.spin_history_band(v, r, mask=blob()[1] > 0, spacing=3.0),
    "spin_history_band_nomask": lambda v, r: aug.spin_history_band(v, r),
    "low_resolution": lambda v, r: aug.low_resolution(v, r),
    "low_resolution_axis": lambda v, r: aug.low_resolution(v, r, factor=(2.0, 3.0), axis="random"),
    "gaussian_noise": lambda v, r: aug.gaussian_noise(v, r),
    "rician_noise": lambda v, r: aug.rician_noise(v, r),
    "gamma": lambda v, r: aug.gamma(v, r),
    "percentile": lambda v, r: aug.percentile_normalise(v),
    "minmax": lambda v, r: aug.minmax(v),
    "e3cnn": lambda v, r: aug.augment_intensity(v, r, "e3cnn", mask=blob()[1] > 0),
    "unet": lambda v, r: aug.augment_intensity(v, r, "unet"),
    "override": lambda v, r: aug.augment_intensity(v, r, {"preset": "unet", "lowres_p": 1.0, "noise_p": 0.0}),
}


@pytest.mark.parametrize("name", sorted(INTENSITY))
def test_intensity_shape_dtype_finite_deterministic(name):
    vol, _ = blob()
    before = vol.copy()
    f = INTENSITY[name]
    a = f(vol, np.random.default_rng(3))
    b = f(vol, np.random.default_rng(3))
    assert a.shape == vol.shape and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    assert np.array_equal(a, b)
    assert np.array_equal(vol, before)  # input untouched


def test_ranges():
    vol, mask = blob()
    rng = np.random.default_rng(0)
    for cfg in ("e3cnn", "unet"):
        out = aug.augment_intensity(vol * 250 + 10, rng, cfg, mask=mask > 0)
        assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    m = aug.minmax(vol)
    assert m.min() == 0.0 and m.max() == pytest.approx(1.0)
    assert np.all(aug.minmax(np.ones((4, 4, 4))) == 0)
    p = aug.percentile_normalise(vol)
    assert p.min() == 0.0 and p.max() == 1.0
    band = aug.spin_history_band(np.ones((30, 30, 30), np.float32), rng, alpha=(1.5, 1.5), sigma_mm=(3.0, 3.0))
    assert band.min() >= 0.0 and band.max() <= 1.0 and band.min() < 0.5  # dark, never negative
    _, field = aug.bias_field(np.ones((8, 9, 10), np.float32), rng, return_field=True)
    assert np.all(field > 0)
    with pytest.raises(ValueError):
        aug.augment_intensity(vol, rng, {"noise_prob": 1.0})


@pytest.mark.parametrize("max_angle", [None, 180.0, 90.0])
def test_rotation_round_trip_and_proper(max_angle):
    vol, mask = blob()
    rng = np.random.default_rng(7)
    v, m, A = aug.random_rotation(vol, mask, rng, max_angle_deg=max_angle)
    assert v.shape == vol.shape and v.dtype == vol.dtype and m.dtype == mask.dtype
    assert np.allclose(A @ A.T, np.eye(3), atol=1e-10) and np.linalg.det(A) == pytest.approx(1.0)
    assert set(np.unique(m)) <= {0, 1, 2}
    back = aug.rotate_about_centre(m, A.T, order=0)
    for lab in (1, 2):
        assert dice(back == lab, mask == lab) > 0.95
    v2, m2, A2 = aug.random_rotation(vol, mask, np.random.default_rng(7), max_angle_deg=max_angle)
    assert np.array_equal(v, v2) and np.array_equal(m, m2) and np.array_equal(A, A2)


def test_rotation_moves_content_by_A_and_target_convention():
    """A structure at array-axis position v lands at A v; so R_target = R_vc @ A.T maps its new position to the
    same canonical coordinates (the training-target rule)."""
    shape = (41, 41, 41)
    c = (np.array(shape) - 1) / 2
    vol = np.zeros(shape, np.float32)
    p = np.array([10.0, 3.0, -5.0])
    vol[tuple((c + p).astype(int))] = 1.0
    vol = aug.ndimage.gaussian_filter(vol, 1.0)
    rng = np.random.default_rng(1)
    v, _, A = aug.random_rotation(vol, None, rng, max_angle_deg=None)
    found = np.array(np.unravel_index(np.argmax(v), shape)) - c
    assert np.linalg.norm(found - A @ p) < 1.01
    r_vc = aug.random_rotation_matrix(rng, None)
    r_target = r_vc @ A.T
    assert np.allclose(r_target @ (A @ p), r_vc @ p)


def test_rotation_anisotropic_spacing():
    vol, mask = blob()
    spacing = (1.0, 1.0, 2.5)
    v, m, A = aug.random_rotation(vol, mask, np.random.default_rng(2), max_angle_deg=30.0, spacing=spacing)
    back = aug.rotate_about_centre(m, A.T, order=0, spacing=spacing)
    assert dice(back == 1, mask == 1) > 0.9


def test_low_resolution_single_axis_blurs_only_that_axis():
    rng = np.random.default_rng(0)
    vol = (np.indices((32, 32, 32)).sum(0) % 2).astype(np.float32)  # checkerboard: max high frequency
    out = aug.low_resolution(vol, rng, factor=(3.0, 3.0), axis=2)
    assert np.std(np.diff(out, axis=2)) < 0.5 * np.std(np.diff(vol, axis=2))
    assert out.shape == vol.shape
