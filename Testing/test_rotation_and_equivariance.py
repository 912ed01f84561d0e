"""Rotation maths and the E(3)-CNN's equivariance: the two vectors and the pseudovector transform as they must."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from _support import blob_phantom, small_e3cnn
from E3PoseLogic.rotation import axes_to_rotation, geodesic_deg, world_rotation


# --------------------------------------------------------------------------------------------------- rotation maths
@pytest.mark.parametrize("seed", range(5))
def test_orthonormal_axes_give_that_rotation(seed):
    r = Rotation.random(random_state=seed).as_matrix()
    out, info = axes_to_rotation(3.0 * r[:, 0], 0.5 * r[:, 1], r[:, 2])
    np.testing.assert_allclose(out, r, atol=1e-12)
    np.testing.assert_allclose(info["singular_values"], 1.0, atol=1e-12)
    assert not info["flipped"]


def test_pseudovector_sign_is_chosen_by_handedness():
    r = Rotation.random(random_state=7).as_matrix()
    out, info = axes_to_rotation(-r[:, 0], r[:, 1], r[:, 2])  # left-handed input: p must be flipped
    np.testing.assert_allclose(out, r, atol=1e-12)
    assert info["flipped"] and info["det_pab"] < 0


@pytest.mark.parametrize("seed", range(20))
def test_always_proper_and_nearest(seed):
    rng = np.random.default_rng(seed)
    p, a, b = rng.standard_normal((3, 3))
    if seed == 0:
        b = a + 1e-9 * rng.standard_normal(3)  # degenerate: two axes collapse
    r, info = axes_to_rotation(p, a, b)
    assert np.isclose(np.linalg.det(r), 1.0) and np.allclose(r.T @ r, np.eye(3), atol=1e-10)
    m = np.stack([p / np.linalg.norm(p) * np.sign(info["det_pab"] or 1), a / np.linalg.norm(a), b / np.linalg.norm(b)], 1)
    if seed:
        # nearest rotation (Frobenius) to the sign-corrected axes: no random rotation is closer
        best = np.linalg.norm(m - r)
        for q in Rotation.random(2000, random_state=seed).as_matrix():
            assert np.linalg.norm(m - q) >= best - 1e-9


def test_geodesic_angle():
    r = Rotation.from_rotvec([0, 0, np.pi / 2]).as_matrix()
    assert geodesic_deg(np.eye(3), r) == pytest.approx(90.0, abs=1e-12)
    assert geodesic_deg(r, r) == pytest.approx(0.0, abs=1e-12)
    small = Rotation.from_rotvec([1e-6, 0, 0]).as_matrix()
    assert geodesic_deg(np.eye(3), small) == pytest.approx(np.degrees(1e-6), rel=1e-6)  # accurate near 0
    assert geodesic_deg(np.eye(3), Rotation.from_rotvec([0, np.pi, 0]).as_matrix()) == pytest.approx(180.0)


@pytest.mark.parametrize("mirror", [False, True])
def test_world_rotation_is_proper_for_mirrored_storage(mirror):
    """Published scanner-space output is improper when det(affine) < 0; ours stays a rotation and is the same
    world pose as the unmirrored storage of the same image."""
    d = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    r_world = Rotation.random(random_state=3).as_matrix()
    if mirror:
        d = d @ np.diag([-1.0, 1, 1])
    # what a perfectly equivariant network sees in the voxel frame: vectors D^T v, pseudovector det(D) D^T p
    det = np.linalg.det(d)
    axes_vox = [det * d.T @ r_world[:, 0], d.T @ r_world[:, 1], d.T @ r_world[:, 2]]
    r_vox, _ = axes_to_rotation(*axes_vox)
    out = world_rotation(r_vox, d)
    np.testing.assert_allclose(out, r_world, atol=1e-12)
    assert np.linalg.det(d @ r_vox) == pytest.approx(det)  # the published D @ R_img has det(D)


# --------------------------------------------------------------------------------------------------- equivariance
torch = pytest.importorskip("torch")


def index_rotation(op, n):
    """The 3x3 matrix acting on array-index vectors (about the centre) of an array operation, found numerically."""
    vecs = []
    for axis in range(3):
        x = np.zeros((n, n, n), np.float32)
        c = [n // 2] * 3
        p = list(c)
        p[axis] += 1
        x[tuple(c)] = 1.0
        x[tuple(p)] = 2.0
        y = op(torch.from_numpy(x)[None, None])[0, 0].numpy()
        c2 = np.argwhere(y == 1.0)[0]
        p2 = np.argwhere(y == 2.0)[0]
        vecs.append(p2 - c2)
    return np.array(vecs, dtype=float).T


def outputs(model, x):
    with torch.inference_mode():
        return model(x)[0].numpy().astype(np.float64).reshape(3, 3)  # rows p, a, b


@pytest.fixture(scope="module")
def model():
    return small_e3cnn(seed=1, parity_exact=True)


@pytest.fixture(scope="module")
def volume():
    return torch.from_numpy(blob_phantom((32, 32, 32), seed=2))[None, None]


def check_equivariance(model, volume, op, tol):
    n = volume.shape[-1]
    g = index_rotation(op, n)
    base = outputs(model, volume)
    moved = outputs(model, op(volume))
    det = round(np.linalg.det(g))
    expected = np.stack([det * g @ base[0], g @ base[1], g @ base[2]])  # pseudovector picks up det(g)
    scale = np.abs(base).max()
    assert np.abs(moved - expected).max() <= tol * scale, (moved, expected)
    # and the rotation built from them follows: R' = g R diag(det g, 1, 1)
    r = axes_to_rotation(*base)[0]
    r2 = axes_to_rotation(*moved)[0]
    assert geodesic_deg(r2, g @ r @ np.diag([det, 1, 1])) < 0.5
    return g


@pytest.mark.parametrize("dims,k", [((2, 3), 1), ((3, 4), 1), ((2, 4), 2)])
def test_rotation_90(model, volume, dims, k):
    g = check_equivariance(model, volume, lambda t: torch.rot90(t, k, dims), 1e-4)
    assert round(np.linalg.det(g)) == 1


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_mirror(model, volume, axis):
    """A mirror flips the vectors' component along the axis and, for the pseudovector, the other two."""
    g = check_equivariance(model, volume, lambda t: torch.flip(t, (axis,)), 1e-4)
    assert round(np.linalg.det(g)) == -1


def test_published_pooling_is_only_approximately_mirror_equivariant(volume):
    """Documented: the published max-pool takes odd scalars by value. With parity_exact_pool=False the 90-degree
    law still holds exactly; a mirror holds only approximately (so new models train with exact pooling)."""
    m = small_e3cnn(seed=1, parity_exact=False)
    check_equivariance(m, volume, lambda t: torch.rot90(t, 1, (2, 3)), 1e-4)
    n = volume.shape[-1]
    g = index_rotation(lambda t: torch.flip(t, (2,)), n)
    base, moved = outputs(m, volume), outputs(m, torch.flip(volume, (2,)))
    expected = np.stack([-g @ base[0], g @ base[1], g @ base[2]])
    assert np.abs(moved - expected).max() > 1e-4 * np.abs(base).max()


# --------------------------------------------------------------------------------------------------- the crop
def _signed_permutation(order, flips):
    """(array operation, 3x3 matrix on index vectors about the centre) of a transpose followed by flips."""
    from E3PoseLogic.rotation import apply_grid_symmetry, grid_symmetry_matrix

    return (lambda a: apply_grid_symmetry(a, order, flips)), grid_symmetry_matrix(order, flips)


@pytest.fixture(scope="module")
def head_on_grid():
    """A blob 'head' on a 40^3 grid with an off-centre, elongated 'brain' mask whose bounding box has odd sides."""
    x = blob_phantom((40, 40, 40), seed=4)
    ii = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij")).astype(float)
    c = np.array([21.3, 18.6, 20.2])
    r = np.array([7.2, 5.1, 6.3])
    mask = (((ii - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1.0
    return x, mask.astype(np.uint8)


@pytest.mark.parametrize("order,flips", [((0, 1, 2), (-1, 1, 1)), ((0, 1, 2), (1, -1, -1)), ((1, 0, 2), (1, 1, 1)),
                                         ((2, 0, 1), (-1, 1, -1))])
def test_cube_crop_turns_and_mirrors_with_the_head(head_on_grid, order, flips):
    """The cube crop of a turned or mirrored head is the turned or mirrored crop: the network then sees exactly
    the same head, so its equivariance reaches the pose. The published box crop follows axis permutations but not
    mirrors: its rounding and odd sides put the content on other voxels."""
    from E3PoseLogic.crop import crop_for_e3cnn

    x, mask = head_on_grid
    op, _ = _signed_permutation(order, flips)
    crop, box = crop_for_e3cnn(x, mask, 0.6, 16, "cube")
    assert crop.shape == (16, 16, 16) and box.shape == "cube"
    np.testing.assert_allclose(crop_for_e3cnn(op(x), op(mask), 0.6, 16, "cube")[0], op(crop), atol=1e-5)
    published = crop_for_e3cnn(x, mask, 0.6, 16)[0]
    turned = crop_for_e3cnn(op(x), op(mask), 0.6, 16)[0]
    if min(flips) > 0:
        np.testing.assert_allclose(turned, op(published), atol=1e-5)
    else:
        assert turned.shape != op(published).shape or np.abs(turned - op(published)).max() > 0.05


def test_cube_crop_is_centred_on_the_centre_of_mass(head_on_grid):
    from scipy import ndimage

    from E3PoseLogic.crop import crop_array, crop_for_e3cnn

    x, mask = head_on_grid
    _, box = crop_for_e3cnn(x, mask, 0.6, 16, "cube")
    np.testing.assert_allclose(box.centre, ndimage.center_of_mass(mask), atol=1e-12)
    m = crop_array(mask, box, order=0)
    np.testing.assert_allclose(ndimage.center_of_mass(m), [7.5, 7.5, 7.5], atol=0.5)
    # the brain's bounding box fills about crop_scale of the cube, as with the published crop
    lo, hi = np.argwhere(m).min(0), np.argwhere(m).max(0)
    assert np.mean(hi - lo + 1) / 16 == pytest.approx(0.6, abs=0.1)
    assert box.to_dict()["shape"] == "cube" and len(box.to_dict()["centre_voxel"]) == 3


@pytest.mark.parametrize("order,flips", [((0, 1, 2), (-1, 1, 1)), ((2, 1, 0), (1, -1, 1))])
def test_network_on_the_cube_crop_follows_a_mirrored_or_turned_head(head_on_grid, order, flips):
    """End to end from the U-Net grid: crop, E3-CNN, rotation. R' = g R diag(det g, 1, 1) to float round-off."""
    from E3PoseLogic.crop import crop_for_e3cnn

    x, mask = head_on_grid
    op, g = _signed_permutation(order, flips)
    model = small_e3cnn(seed=3, parity_exact=True, crop_size=16, crop_shape="cube")
    r = axes_to_rotation(*outputs(model, torch.from_numpy(crop_for_e3cnn(x, mask, 0.6, 16, "cube")[0])[None, None]))[0]
    r2 = axes_to_rotation(*outputs(model, torch.from_numpy(
        crop_for_e3cnn(op(x), op(mask), 0.6, 16, "cube")[0])[None, None]))[0]
    det = round(np.linalg.det(g))
    assert geodesic_deg(r2, g @ r @ np.diag([det, 1, 1])) < 0.5


def test_crop_shape_is_checked():
    from E3PoseLogic.networks.config import E3CNNConfig

    with pytest.raises(ValueError, match="crop shape must be one of box, cube"):
        E3CNNConfig(crop_shape="sphere")
    assert E3CNNConfig.from_dict({"crop_size": 16}).crop_shape == "box"  # older checkpoints: the published crop


def test_grid_symmetries_are_the_48_signed_permutations():
    from E3PoseLogic.rotation import apply_grid_symmetry, grid_symmetries

    syms = grid_symmetries()
    assert len({g.tobytes() for *_, g in syms}) == 48
    assert sorted(round(np.linalg.det(g)) for *_, g in syms) == [-1] * 24 + [1] * 24
    for order, flips, g in syms:
        op = lambda t, o=order, f=flips: torch.from_numpy(apply_grid_symmetry(t[0, 0].numpy(), o, f))[None, None]
        np.testing.assert_array_equal(index_rotation(op, 9), g)
