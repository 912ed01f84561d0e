"""The E3-CNN read on turned copies of its cube (``E3PoseLogic.turned_reading``): the turns, the way a turned cube is
sampled and turned back, and the pooling of the answers."""
import numpy as np
import pytest

from E3PoseLogic.crop import crop_array, crop_for_e3cnn
from E3PoseLogic.rotation import axes_to_rotation, geodesic_deg, grid_symmetries
from E3PoseLogic.turned_reading import TURN_DEG, TURNS, largest_group_mean, turned_readings, turns


def _rot(axis, deg):
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.radians(deg) * np.asarray(axis, dtype=float)).as_matrix()


def test_turns_are_closed_under_the_grid_symmetries():
    """A volume stored mirrored or turned by 90 deg is read from the same set of views: g q g^T is again a turn."""
    qs = turns()
    assert qs.shape == (TURNS, 3, 3) == (6, 3, 3)
    for q in qs:
        assert np.isclose(np.linalg.det(q), 1.0) and np.isclose(geodesic_deg(np.eye(3), q), TURN_DEG)
    for _, _, g in grid_symmetries():
        for q in qs:
            assert min(geodesic_deg(g @ q @ g.T, p) for p in qs) < 1e-9
    assert turns(0).shape == (0, 3, 3)
    with pytest.raises(ValueError, match="0 or 6"):
        turns(4)


def test_a_turned_cube_samples_the_grid_at_centre_plus_turn():
    """Crop point u samples centre + q u: a quarter turn about index axis k is np.rot90 of the crop in the other two
    axes (exact on an even cube about a voxel-corner centre), in the direction q gives."""
    rng = np.random.default_rng(0)
    x = rng.random((30, 30, 30)).astype(np.float32)
    mask = np.zeros_like(x, dtype=np.uint8)
    mask[9:21, 9:21, 9:21] = 1  # centre of mass 14.5: a voxel corner, so the 16^3 cube sits on grid points
    _, box = crop_for_e3cnn(x, mask, 11 / 16, 16, "cube")  # bounding-box extent 11 voxels: side 16
    assert np.isclose(box.step, 1.0)
    plain = crop_array(x, box)
    q = _rot([0, 0, 1], 90)  # (u0, u1) -> (-u1, u0)
    turned = crop_array(x, box, turn=q)
    # turned[a, b] = x at centre + (-u_b, u_a) = plain[-b, a]: np.rot90 by -1 in (0, 1)
    np.testing.assert_allclose(turned, np.rot90(plain, -1, (0, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="cube"):
        crop_array(x, crop_for_e3cnn(x, mask, 11 / 16, 16, "box")[1], turn=q)


def _two_blob_head(shape=40):
    """A 'head' whose axes a reader can measure: a bright blob along a (front) and a dim one along b (down)."""
    ii = np.stack(np.meshgrid(*[np.arange(shape)] * 3, indexing="ij")).astype(float)
    c = np.full(3, (shape - 1) / 2.0)
    frame = _rot([0.3, -0.5, 0.8], 50)  # columns: e_x, e_y (a), e_z (b) on the grid
    x = np.zeros((shape,) * 3)
    for v, level in ((frame[:, 1], 1.0), (frame[:, 2], 0.5)):
        d2 = ((ii - (c + 6.0 * v)[:, None, None, None]) ** 2).sum(0)
        x += level * np.exp(-d2 / (2 * 2.0 ** 2))
    x += 0.2 * np.exp(-((ii - c[:, None, None, None]) ** 2).sum(0) / (2 * 8.0 ** 2))
    mask = (((ii - c[:, None, None, None]) ** 2).sum(0) <= 10.0 ** 2).astype(np.uint8)
    return x.astype(np.float32), mask, frame


def _moment_reader(crops):
    """(p, a, b) of each crop from its intensity moments: a towards the bright blob, b towards the dim one."""
    out = []
    for c in crops:
        s = c.shape[0]
        u = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2.0] * 3, indexing="ij")).reshape(3, -1)
        w = c.reshape(-1)
        a = u @ (w * (w > 0.6 * w.max()))  # the bright blob
        dim = (w > 0.25 * w.max()) & (w < 0.6 * w.max())
        b = u @ (w * dim)
        b = b - a * (a @ b) / (a @ a)
        out.append(np.stack([np.cross(a, b), a, b]))
    return np.array(out)


def test_turned_readings_turn_every_answer_back_to_the_grid():
    """With a reader that measures the head, every turned answer turned back is the head's frame (to the reader's
    few degrees; turned the wrong way they are about 40 deg off), all seven agree, and the pool is the frame."""
    from E3PoseLogic.crop import crop_input

    x, mask, frame = _two_blob_head()
    crop, box = crop_for_e3cnn(x, mask, 1.0, 16, "cube")
    first = _moment_reader(crop[None])[0]
    assert geodesic_deg(axes_to_rotation(*first)[0], frame) < 3.0
    for q in turns():
        back = _moment_reader(crop_input(x, box, turn=q)[None])[0] @ q.T
        assert geodesic_deg(axes_to_rotation(*back)[0], frame) < 5.0
    rotation, info = turned_readings(_moment_reader, x, box, first)
    assert info["turned_readings"] == 6 and info["agreeing"] == 7 and info["moved_deg"] < 3.0
    assert geodesic_deg(rotation, frame) < 3.0
    none, info0 = turned_readings(_moment_reader, x, box, first, n=0)
    assert info0["turned_readings"] == 0 and geodesic_deg(none, axes_to_rotation(*first)[0]) == 0.0


def test_largest_group_mean_leaves_out_the_half_turns_and_ignores_order():
    base = _rot([1, 2, 3], 40)
    near = [base @ _rot(a, d) for a, d in (([1, 0, 0], 4), ([0, 1, 0], -3), ([0, 0, 1], 5), ([1, 1, 0], 2))]
    flipped = [base @ np.diag([-1.0, -1.0, 1.0]) @ _rot([0, 1, 0], d) for d in (2, -2, 4)]
    r, n = largest_group_mean(np.stack(flipped[:1] + near + flipped[1:]))
    assert n == 4 and geodesic_deg(r, base) < 3.0
    r2, n2 = largest_group_mean(np.stack(near[::-1] + flipped))
    assert n2 == 4 and geodesic_deg(r, r2) < 1e-9
    # equal groups: the one holding the first reading wins, wherever the others stand
    for order in ([0, 1, 2, 3], [0, 3, 2, 1]):
        two_two = np.stack([near[0], flipped[0], near[1], flipped[1]])[order]
        assert geodesic_deg(largest_group_mean(two_two)[0], base) < 6.0


def test_pooled_counts_reads_a_json_entry_defensively():
    from E3PoseLogic.turned_reading import pooled_counts

    assert pooled_counts({"turned_readings": 6, "agreeing": 5, "moved_deg": 2.0}) == (7, 5)
    assert pooled_counts({"turned_readings": 6}) == (7, None)
    for bad in (None, {}, {"turned_readings": 0}, {"turned_readings": True}, {"turned_readings": float("nan")},
                {"turned_readings": "six"}, [6, 5]):
        assert pooled_counts(bad) is None
