"""Augmentation: each function's own effect (a rotation moves a marker to the rotated place, a bias field is a smooth
multiplicative field of the stated form and range, a spin-history band is a dark plane of the stated depth and width,
resolution loss removes high frequencies along the chosen axes only, noise has the stated law, gamma the stated
exponent), the published chains in their order with their settings, and shapes/dtypes/determinism. A function that
returns its input fails every effect test."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from E3PoseLogic import augment as aug


def blob(shape=(40, 44, 36)):
    idx = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    mask = (((idx / [12.0, 9.0, 7.0]) ** 2).sum(-1) <= 1).astype(np.uint8)
    mask[idx[..., 1] > 4] *= 2  # an asymmetric second label
    vol = (mask > 0) * 0.6 + 0.2 + 0.05 * np.sin(idx[..., 0] / 3.0)
    return vol.astype(np.float32), mask


def dice(a, b):
    return 2.0 * np.sum(a & b) / max(1, a.sum() + b.sum())


def coords(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


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
def test_intensity_shape_dtype_finite_deterministic_and_changes_the_volume(name):
    vol, _ = blob()
    before = vol.copy()
    f = INTENSITY[name]
    a = f(vol, np.random.default_rng(3))
    b = f(vol, np.random.default_rng(3))
    assert a.shape == vol.shape and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    assert np.array_equal(a, b)
    assert np.array_equal(vol, before)  # input untouched
    assert np.max(np.abs(a - vol)) > 0.01  # it does something (the effect tests below say what)


# ------------------------------------------------------------------------------------------------ normalisation
def test_minmax_is_the_affine_map_to_unit_range():
    vol, _ = blob()
    m = aug.minmax(vol * 250 + 10)
    lo, hi = float(vol.min()), float(vol.max())
    assert np.allclose(m, (vol - lo) / (hi - lo), atol=1e-5)
    assert m.min() == 0.0 and m.max() == pytest.approx(1.0)
    const = aug.minmax(np.full((4, 4, 4), 3.0))
    assert np.all(np.isfinite(const)) and np.ptp(const) == 0  # constant input: no NaN


def test_percentile_normalise_ignores_a_bright_outlier():
    rng = np.random.default_rng(0)
    v = rng.uniform(0.0, 1.0, (30, 30, 30)).astype(np.float32)
    v[0, 0, 0] = 1000.0  # min-max would squash everything else to < 0.001
    p = aug.percentile_normalise(v)
    lo, hi = np.percentile(v, [0.5, 99.5])
    assert np.allclose(p, np.clip((v - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert p.min() == 0.0 and p.max() == 1.0 and p[0, 0, 0] == 1.0
    assert np.median(p) == pytest.approx(0.5, abs=0.02)
    assert np.median(aug.minmax(v)) < 0.001


# ------------------------------------------------------------------------------------------------ bias field
def _monomials(shape, order=3):
    x, y, z = (np.linspace(-1.0, 1.0, n) for n in shape)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    return np.stack([X ** a * Y ** b * Z ** c for a in range(order + 1) for b in range(order + 1 - a)
                     for c in range(order + 1 - a - b)], -1)


def test_bias_field_is_exp_of_the_polynomial():
    """Fixed coefficients c: log field = c * (sum of the 20 monomials x^a y^b z^c, a+b+c <= 3) on [-1, 1]^3."""
    shape = (9, 11, 13)
    v = np.random.default_rng(0).uniform(0.5, 1.5, shape).astype(np.float32)
    out, field = aug.bias_field(v, np.random.default_rng(0), coefficients=(0.1, 0.1), return_field=True)
    expected = np.exp(0.1 * _monomials(shape).sum(-1))
    assert np.allclose(field, expected, rtol=1e-5)
    assert np.allclose(out, v * expected, rtol=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bias_field_smooth_with_coefficients_in_range(seed):
    """Random coefficients: the log field is a cubic polynomial (smooth) whose coefficients lie in U(0, 0.5)."""
    shape = (9, 11, 13)
    v = np.ones(shape, np.float32)
    out, field = aug.bias_field(v, np.random.default_rng(seed), return_field=True)
    assert np.allclose(out, field)  # multiplicative
    basis = _monomials(shape).reshape(-1, 20)
    coef, *_ = np.linalg.lstsq(basis, np.log(field).ravel().astype(np.float64), rcond=None)
    assert np.max(np.abs(basis @ coef - np.log(field).ravel())) < 1e-4  # exactly a cubic: smooth
    assert np.all(coef > -1e-3) and np.all(coef < 0.5 + 1e-3)
    assert coef.max() > 0.1  # not a constant field
    assert 1.0 - 1e-6 <= field[4, 5, 6] <= np.exp(0.5) + 1e-6  # centre: exp(constant coefficient)
    # without return_field, the same draw gives the same output
    assert np.array_equal(aug.bias_field(v, np.random.default_rng(seed)), out)


# ------------------------------------------------------------------------------------------------ spin history
@pytest.mark.parametrize("seed,spacing", [(0, 1.0), (1, 1.0), (2, (1.0, 1.5, 2.0))])
def test_spin_history_band_is_a_dark_plane(seed, spacing):
    """factor(x) = 1 - alpha exp(-d^2 / 2 sigma^2) with d the distance (mm) of x to one plane: recover the plane
    from the output alone and check every voxel against the formula."""
    shape, alpha, sigma = (36, 40, 32), 0.8, 3.0
    out = aug.spin_history_band(np.ones(shape, np.float32), np.random.default_rng(seed), spacing=spacing,
                                alpha=(alpha, alpha), sigma_mm=(sigma, sigma))
    assert out.max() <= 1.0 and out.min() >= 0.0
    assert out.min() < 1.0 - 0.9 * alpha  # as dark as alpha says, somewhere
    x = coords(shape).reshape(-1, 3) * np.broadcast_to(np.asarray(spacing, float), (3,))
    f = out.ravel().astype(np.float64)
    # approximate normal: the thin direction of the dark voxels
    dark = x[f < 1.0 - 0.5 * alpha]
    w, vecs = np.linalg.eigh(np.cov((dark - dark.mean(0)).T))
    n0 = vecs[:, 0]
    assert np.sqrt(w[0]) < 2.0 * sigma < np.sqrt(w[1])  # a slab: thin one way, wide the others
    # |d| from the formula where it is well conditioned; signed by the approximate normal; fit the plane exactly
    use = (f > 1.0 - 0.7 * alpha) & (f < 0.97)
    absd = np.sqrt(-2.0 * sigma ** 2 * np.log((1.0 - f[use]) / alpha))
    side = np.sign((x[use] - dark.mean(0)) @ n0)
    sol, *_ = np.linalg.lstsq(np.c_[x[use], -np.ones(use.sum())], side * absd, rcond=None)
    n, pos = sol[:3], sol[3]
    assert np.linalg.norm(n) == pytest.approx(1.0, abs=1e-3)
    pred = np.clip(1.0 - alpha * np.exp(-((x @ n - pos) ** 2) / (2 * sigma ** 2)), 0.0, None)
    assert np.max(np.abs(pred - f)) < 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_spin_history_band_with_mask_crosses_the_mask(seed):
    """With a mask and p_outside=0 the plane lies across the mask (the published placement), wherever it is."""
    shape = (40, 40, 40)
    c = coords(shape)
    mask = ((c - [30.0, 9.0, 28.0]) ** 2).sum(-1) <= 5.0 ** 2  # small, off centre
    out = aug.spin_history_band(np.ones(shape, np.float32), np.random.default_rng(seed), mask=mask,
                                alpha=(0.9, 0.9), sigma_mm=(2.0, 2.0), p_outside=0.0)
    assert out[mask].min() < 0.5
    band = out < 0.5
    assert band.sum() < 0.5 * band.size  # a band, not the whole volume


# ------------------------------------------------------------------------------------------------ resolution
def stripes(shape, axis, period=2):
    s = (np.arange(shape[axis]) % period).astype(np.float32)
    return np.broadcast_to(s.reshape([-1 if a == axis else 1 for a in range(3)]), shape).copy()


def roughness(v, axis):
    return float(np.mean(np.abs(np.diff(v, axis=axis))))


def test_low_resolution_single_axis_blurs_only_that_axis():
    rng = np.random.default_rng(0)
    vol = (np.indices((32, 32, 32)).sum(0) % 2).astype(np.float32)  # checkerboard: max high frequency
    out = aug.low_resolution(vol, rng, factor=(3.0, 3.0), axis=2)
    assert np.std(np.diff(out, axis=2)) < 0.5 * np.std(np.diff(vol, axis=2))
    assert out.shape == vol.shape
    # content that does not vary along the chosen axis is untouched; stripes across it are wiped out
    shape = (24, 28, 32)
    for axis in range(3):
        across = stripes(shape, (axis + 1) % 3)
        assert np.allclose(aug.low_resolution(across, rng, factor=(3.0, 3.0), axis=axis), across, atol=1e-5)
        along = stripes(shape, axis)
        assert roughness(aug.low_resolution(along, rng, factor=(3.0, 3.0), axis=axis), axis) < 0.2 * roughness(
            along, axis)


def test_low_resolution_isotropic_blurs_every_axis_and_keeps_smooth_content():
    rng = np.random.default_rng(1)
    shape = (24, 28, 32)
    for axis in range(3):
        v = stripes(shape, axis)
        assert roughness(aug.low_resolution(v, rng, factor=(2.5, 2.5)), axis) < 0.2 * roughness(v, axis)
    ramp = coords(shape).sum(-1).astype(np.float32) / 80.0
    out = aug.low_resolution(ramp, rng, factor=(2.5, 2.5))
    inner = (slice(4, -4),) * 3  # the linear ramp survives away from the edges
    assert np.allclose(out[inner], ramp[inner], atol=0.02)
    assert np.array_equal(aug.low_resolution(ramp, rng, factor=(1.0, 1.0)), ramp)  # factor 1: unchanged


def test_low_resolution_random_axis_picks_one_axis():
    shape = (24, 28, 32)
    v = stripes(shape, 0) + stripes(shape, 1) + stripes(shape, 2)
    seen = set()
    for seed in range(8):
        out = aug.low_resolution(v, np.random.default_rng(seed), factor=(3.0, 3.0), axis="random")
        blurred = [a for a in range(3) if roughness(out, a) < 0.2 * roughness(v, a)]
        kept = [a for a in range(3) if roughness(out, a) == pytest.approx(roughness(v, a), rel=1e-3)]
        assert len(blurred) == 1 and len(kept) == 2
        seen.add(blurred[0])
    assert len(seen) >= 2


# ------------------------------------------------------------------------------------------------ noise, gamma
def test_gaussian_noise_has_the_stated_sigma():
    vol, _ = blob()
    out = aug.gaussian_noise(vol, np.random.default_rng(0), sigma=(0.1, 0.1))
    r = (out - vol).astype(np.float64)
    assert r.std() == pytest.approx(0.1, rel=0.02) and abs(r.mean()) < 0.003
    assert abs(np.corrcoef(r.ravel(), vol.ravel())[0, 1]) < 0.02  # additive, independent of the signal
    for seed in range(4):  # default: sigma U(0, 0.03)
        assert (aug.gaussian_noise(vol, np.random.default_rng(seed)) - vol).std() < 0.031


def test_rician_noise_is_the_magnitude_of_complex_gaussian_noise():
    rng = np.random.default_rng(0)
    s = 0.05
    dark = aug.rician_noise(np.zeros((40, 40, 40), np.float32), rng, sigma=(s, s))
    assert dark.min() >= 0.0
    assert dark.mean() == pytest.approx(s * np.sqrt(np.pi / 2), rel=0.02)  # Rayleigh: biased upward
    bright = aug.rician_noise(np.ones((40, 40, 40), np.float32), rng, sigma=(s, s))
    assert bright.mean() == pytest.approx(1.0 + s * s / 2, abs=0.002) and bright.std() == pytest.approx(s, rel=0.03)


def test_gamma_raises_the_normalised_volume_to_the_drawn_power():
    vol, _ = blob()
    m = aug.minmax(vol).astype(np.float64)
    assert np.allclose(aug.gamma(vol, np.random.default_rng(0), log_gamma=(-0.5, -0.5)), m ** np.exp(-0.5),
                       atol=1e-6)
    inside = (m > 0.05) & (m < 0.95)
    for seed in range(4):
        out = aug.gamma(vol, np.random.default_rng(seed)).astype(np.float64)
        g = np.log(out[inside]) / np.log(m[inside])
        assert np.ptp(g) < 1e-3  # one exponent for every voxel
        assert np.exp(-0.8) - 1e-4 <= g.mean() <= 1.0 + 1e-4


# ------------------------------------------------------------------------------------------------ composed chains
STEPS = ("minmax", "bias_field", "percentile_normalise", "spin_history_band", "low_resolution", "gaussian_noise",
         "gamma")


@pytest.fixture
def chain_log(monkeypatch):
    """Record the top-level steps augment_intensity calls (name, settings, input, output), running the real ones."""
    log, depth = [], [0]
    for name in STEPS:
        real = getattr(aug, name)

        def spy(v, *a, _real=real, _name=name, **k):
            depth[0] += 1
            try:
                out = _real(v, *a, **k)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                log.append((_name, k, np.array(v, copy=True), out))
            return out

        monkeypatch.setattr(aug, name, spy)
    return log


@pytest.mark.parametrize("cfg,order", [
    ({"preset": "e3cnn", "lowres_p": 1.0},
     ["minmax", "bias_field", "minmax", "spin_history_band", "low_resolution", "percentile_normalise", "gamma"]),
    ({"preset": "unet", "noise_p": 1.0},
     ["minmax", "bias_field", "percentile_normalise", "spin_history_band", "gaussian_noise", "gamma"]),
    ({"preset": "unet", "lowres_p": 1.0, "noise_p": 0.0},
     ["minmax", "bias_field", "percentile_normalise", "spin_history_band", "low_resolution", "gamma"]),
])
def test_augment_intensity_runs_the_published_chain(chain_log, cfg, order):
    vol, mask = blob()
    preset = aug.PRESETS[cfg["preset"]]
    out = aug.augment_intensity(vol * 300 + 5, np.random.default_rng(0), cfg, mask=mask > 0, spacing=3.0)
    assert [name for name, *_ in chain_log] == order
    steps = {name: k for name, k, _, _ in chain_log}
    assert steps["bias_field"]["coefficients"] == preset["bias_coefficients"]
    band = steps["spin_history_band"]
    assert band["sigma_mm"] == preset["spin_sigma_mm"] and band["alpha"] == preset["spin_alpha"]
    assert band["spacing"] == 3.0 and np.array_equal(band["mask"], mask > 0)
    assert steps["gamma"]["log_gamma"] == preset["log_gamma"]
    if "low_resolution" in steps:
        assert steps["low_resolution"]["factor"] == preset["lowres_factor"]
    if "gaussian_noise" in steps:
        assert steps["gaussian_noise"]["sigma"] == preset["noise_sigma"]
    for (_, _, _, prev_out), (_, _, nxt_in, _) in zip(chain_log, chain_log[1:]):
        assert np.array_equal(prev_out, nxt_in)  # each step works on the previous one's output
    assert np.array_equal(out, chain_log[-1][3])
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)


def test_augment_intensity_rejects_unknown_settings():
    with pytest.raises(ValueError):
        aug.augment_intensity(blob()[0], np.random.default_rng(0), {"noise_prob": 1.0})


# ------------------------------------------------------------------------------------------------ rotation
def marker_volume(shape, p_mm, spacing=(1.0, 1.0, 1.0)):
    """A Gaussian spot at p_mm (from the array centre) in a volume, and a one-voxel label there."""
    c = (np.array(shape) - 1) / 2
    idx = np.round(c + np.asarray(p_mm) / np.asarray(spacing)).astype(int)
    vol = np.zeros(shape, np.float32)
    vol[tuple(idx)] = 1.0
    vol = aug.ndimage.gaussian_filter(vol, 1.2)
    lab = np.zeros(shape, np.uint8)
    lab[tuple(idx)] = 1
    lab = aug.ndimage.binary_dilation(lab, iterations=2).astype(np.uint8)
    return vol, lab, (idx - c) * np.asarray(spacing)


def found_mm(v, spacing=(1.0, 1.0, 1.0)):
    c = (np.array(v.shape) - 1) / 2
    return (np.array(np.unravel_index(np.argmax(v), v.shape)) - c) * np.asarray(spacing)


def label_centre_mm(lab, spacing=(1.0, 1.0, 1.0)):
    c = (np.array(lab.shape) - 1) / 2
    return (np.argwhere(lab > 0).mean(0) - c) * np.asarray(spacing)


@pytest.mark.parametrize("spacing,A,p,expected", [
    ((1.0, 1.0, 1.0), Rotation.from_euler("z", 90, degrees=True).as_matrix(), (10, 0, 0), (0, 10, 0)),
    ((1.0, 1.0, 1.0), Rotation.from_euler("x", 90, degrees=True).as_matrix(), (0, 8, 3), (0, -3, 8)),
    ((1.0, 1.0, 2.0), Rotation.from_euler("x", 90, degrees=True).as_matrix(), (0, 10, 0), (0, 0, 10)),
])
def test_rotate_about_centre_known_quarter_turns(spacing, A, p, expected):
    shape = (41, 41, 31)
    vol, lab, p = marker_volume(shape, p, spacing)
    assert np.allclose(A @ p, expected)
    assert np.allclose(found_mm(aug.rotate_about_centre(vol, A, order=1, spacing=spacing), spacing), expected,
                       atol=1e-6)
    # nearest-neighbour labels: exact on isotropic grids, within half a thick voxel otherwise
    tol = 1e-6 if len(set(spacing)) == 1 else 0.5 * max(spacing)
    assert np.allclose(label_centre_mm(aug.rotate_about_centre(lab, A, order=0, spacing=spacing), spacing),
                       expected, atol=tol)


@pytest.mark.parametrize("max_angle", [None, 180.0, 90.0])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5)])
def test_random_rotation_moves_marker_to_A_p_and_round_trips(max_angle, spacing):
    shape = (45, 45, 27)
    vol, lab, p = marker_volume(shape, (9.0, -6.0, 5.0), spacing)
    rng = np.random.default_rng(7)
    v, m, A = aug.random_rotation(vol, lab, rng, max_angle_deg=max_angle, spacing=spacing)
    assert v.shape == vol.shape and v.dtype == vol.dtype and m.dtype == lab.dtype
    assert np.allclose(A @ A.T, np.eye(3), atol=1e-10) and np.linalg.det(A) == pytest.approx(1.0)
    assert np.linalg.norm(A @ p - p) > 3.0  # the draw really moves it
    tol = 0.75 * np.linalg.norm(spacing)  # the voxel holding the maximum
    assert np.linalg.norm(found_mm(v, spacing) - A @ p) < tol
    assert np.linalg.norm(label_centre_mm(m, spacing) - A @ p) < tol
    back = aug.rotate_about_centre(m, A.T, order=0, spacing=spacing)
    assert np.linalg.norm(label_centre_mm(back, spacing) - p) < tol
    v2, m2, A2 = aug.random_rotation(vol, lab, np.random.default_rng(7), max_angle_deg=max_angle, spacing=spacing)
    assert np.array_equal(v, v2) and np.array_equal(m, m2) and np.array_equal(A, A2)


def test_rotation_labels_stay_labels():
    vol, mask = blob()
    v, m, A = aug.random_rotation(vol, mask, np.random.default_rng(7), max_angle_deg=None)
    assert set(np.unique(m)) <= {0, 1, 2}
    back = aug.rotate_about_centre(m, A.T, order=0)
    for lab in (1, 2):
        assert dice(back == lab, mask == lab) > 0.95


def test_rotation_target_convention():
    """A structure at array-axis position v lands at A v; so R_target = R_vc @ A.T maps its new position to the
    same canonical coordinates (the training-target rule)."""
    rng = np.random.default_rng(1)
    p = np.array([10.0, 3.0, -5.0])
    A = aug.random_rotation_matrix(rng, None)
    r_vc = aug.random_rotation_matrix(rng, None)
    assert np.allclose((r_vc @ A.T) @ (A @ p), r_vc @ p)


def test_random_rotation_matrix_draws():
    rng = np.random.default_rng(0)
    # bounded Euler draws: A = Rx Ry Rz with each angle in [-max, max]
    angles = np.array([Rotation.from_matrix(aug.random_rotation_matrix(rng, 30.0)).as_euler("XYZ", degrees=True)
                       for _ in range(300)])
    assert np.abs(angles).max() <= 30.0 + 1e-6 and np.abs(angles).max() > 25.0
    # None: uniform over SO(3): the rotation angle has mean pi/2 + 2/pi
    theta = [Rotation.from_matrix(aug.random_rotation_matrix(rng, None)).magnitude() for _ in range(3000)]
    assert np.mean(theta) == pytest.approx(np.pi / 2 + 2 / np.pi, abs=0.04)
