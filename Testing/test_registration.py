"""The registration baseline: template conventions, the LPS/RAS bookkeeping of the fitted transform, convergence
from near the truth (also with mirrored voxel storage), the start modes, and the template file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from E3PoseLogic import registration as reg
from E3PoseLogic.errors import CheckpointError, E3PoseError
from E3PoseLogic.rotation import geodesic_deg

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_SEED, CASE_SEED, CASE_INDEX = 101, 202, 2  # case: 2.4 mm isotropic, 30 weeks, oblique grid


def _rotvec(axis, degrees):
    from scipy.spatial.transform import Rotation

    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(degrees)).as_matrix()


def _brain_ml(case):
    from E3PoseLogic import frames

    return float((case.label == 1).sum() * np.prod(frames.voxel_sizes(case.affine)) / 1000.0)


def _tuple(case, image=None):
    return (case.image if image is None else image, case.affine, case.rotation_ras, case.com_ras, _brain_ml(case))


@pytest.fixture(scope="module")
def template():
    from E3PoseLogic.synth.dataset import make_case

    return reg.build_template(_tuple(make_case(TEMPLATE_SEED, i)) for i in range(4))


@pytest.fixture(scope="module")
def case():
    from E3PoseLogic.synth.dataset import make_case

    return make_case(CASE_SEED, CASE_INDEX)


def _perturbed_start(case, degrees=12.0, shift=(2.0, -2.0, 1.5)):
    start = np.eye(4)
    start[:3, :3] = _rotvec((1.0, -2.0, 0.5), degrees) @ case.rotation_ras
    start[:3, 3] = case.com_ras + np.asarray(shift)
    return start


def _mirrored(array, affine, axis=0):
    """The same physical image stored with one voxel axis reversed (det of the direction cosines flips)."""
    n = array.shape[axis]
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = n - 1
    return np.ascontiguousarray(np.flip(array, axis)), np.asarray(affine, dtype=np.float64) @ flip


def _assert_proper(r):
    assert r.shape == (3, 3)
    assert np.allclose(r.T @ r, np.eye(3), atol=1e-6)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ cheap checks
def test_import_needs_neither_simpleitk_nor_torch():
    code = ("import sys, E3PoseLogic.registration; "
            "bad = [m for m in ('SimpleITK', 'torch', 'scipy') if m in sys.modules]; assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("mirror", [False, True])
def test_transform_bookkeeping_round_trips(mirror):
    """pose -> SimpleITK LPS transform -> pose, and the transform sends the brain centre to the canonical origin and
    the world direction R e_y to canonical +y (scaled)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    for _ in range(5):
        r = _rotvec(rng.normal(size=3), rng.uniform(0, 180))
        com, scale = rng.normal(scale=40.0, size=3), rng.uniform(0.6, 1.6)
        tx = reg._similarity(sitk, r, com, scale)
        f = np.diag([-1.0, -1.0, 1.0])
        assert np.allclose(tx.TransformPoint(tuple(f @ com)), 0.0, atol=1e-9)
        tip = np.array(tx.TransformPoint(tuple(f @ (com + 10.0 * r[:, 1]))))
        assert np.allclose(tip, [0.0, 10.0 / scale, 0.0], atol=1e-9)
        r2, com2, scale2 = reg._pose(tx)
        _assert_proper(r2)
        assert geodesic_deg(r, r2) < 1e-6 and np.allclose(com, com2) and scale2 == pytest.approx(scale)


def test_cube_group_and_spread_rotations():
    cube = reg.cube_rotations()
    assert cube.shape == (24, 3, 3)
    for r in cube:
        _assert_proper(r)
    d = geodesic_deg(cube[:, None], cube[None])
    assert np.all(d[~np.eye(24, dtype=bool)] > 89.0)  # distinct: the closest two are 90 degrees apart
    assert np.array_equal(reg.spread_rotations(24), cube)
    six = reg.spread_rotations(6, seed=1)
    assert np.array_equal(six, reg.spread_rotations(6, seed=1))
    d6 = geodesic_deg(six[:, None], six[None])
    assert np.all(d6[~np.eye(6, dtype=bool)] > 60.0)  # spread, not clustered


def test_template_is_in_the_canonical_frame(case):
    """Built from the eye label alone: the eyes come out anterior (+y), inferior (+z) and left-right symmetric;
    built from the brain label: its centre of mass is the array centre."""
    eyes = reg.build_template([_tuple(case, (case.label == 2).astype(np.float32))], spacing_mm=2.0, size=64)
    brain = reg.build_template([_tuple(case, (case.label == 1).astype(np.float32))], spacing_mm=2.0, size=64)
    assert eyes.image.shape == (64, 64, 64) and eyes.image.dtype == np.float32
    assert brain.radius_mm == pytest.approx(reg.equivalent_radius(_brain_ml(case)))

    def centroid(w):
        idx = np.stack(np.nonzero(w > 0.5), 1).astype(np.float64)
        t2c = brain.ijk_to_canonical()
        return (idx @ t2c[:3, :3].T + t2c[:3, 3]).mean(0)

    c_brain = centroid(brain.image)
    assert np.linalg.norm(c_brain) < 2.0  # mm, within a voxel
    c_eyes = centroid(eyes.image)
    assert c_eyes[1] > 15.0 and c_eyes[2] > 0.0 and abs(c_eyes[0]) < 5.0
    left = eyes.image[:32].sum()
    right = eyes.image[32:].sum()
    assert 0.7 < left / right < 1.4  # one eye on each side of the mid-sagittal plane


def test_template_save_load_round_trip(template, tmp_path):
    path = reg.save_template(template, tmp_path / "head_template.npz")
    back = reg.load_template(path)
    assert np.array_equal(back.image, template.image)
    assert back.spacing_mm == template.spacing_mm and back.radius_mm == template.radius_mm
    assert back.provenance == template.provenance and back.provenance["n_cases"] == 4
    centre = back.ijk_to_canonical() @ np.append((np.array(back.image.shape) - 1) / 2.0, 1.0)
    assert np.allclose(centre[:3], 0.0)


def test_bad_template_files_name_the_file(tmp_path):
    garbage = tmp_path / "not_a_template.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="not_a_template.npz"):
        reg.load_template(garbage)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(E3PoseError, match="foreign.npz.*not an E3Pose registration template"):
        reg.load_template(foreign)
    with pytest.raises(CheckpointError, match="missing_template.npz.*not found"):
        reg.load_template(tmp_path / "missing_template.npz")


def test_bad_starts_are_refused(template, case):
    with pytest.raises(ValueError, match="start must be"):
        reg.register(case.image, case.affine, template, start="sideways")
    with pytest.raises(ValueError, match="det < 0"):
        reg.register(case.image, case.affine, template, start=np.diag([-1.0, 1.0, 1.0]))


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.slow
def test_converges_from_a_perturbed_truth(template, case):
    """Started 12 degrees and 3 mm off the true pose, the fit lands within 8 degrees and 4 mm of it."""
    start = _perturbed_start(case)
    assert geodesic_deg(start[:3, :3], case.rotation_ras) == pytest.approx(12.0)
    res = reg.register(case.image, case.affine, template, start=start)
    _assert_proper(res.rotation)
    assert res.starts == 1 and not res.info["failed"] and np.isfinite(res.metric)
    assert geodesic_deg(res.rotation, case.rotation_ras) < 8.0
    assert np.linalg.norm(res.translation - case.com_ras) < 4.0
    true_scale = reg.equivalent_radius(_brain_ml(case)) / template.radius_mm
    assert 0.75 * true_scale < res.scale < 1.3 * true_scale


@pytest.mark.slow
def test_mirrored_storage_gives_the_same_pose(template, case):
    """Reversing a voxel axis (det < 0 direction cosines) changes nothing physical, so the pose must not change;
    the rotation start is then a 3x3 (brain centre from the perturbed pose via ``centre``)."""
    array, affine = _mirrored(case.image, case.affine, axis=1)
    assert np.linalg.det(affine[:3, :3]) < 0
    start = _perturbed_start(case)
    res = reg.register(array, affine, template, start=start[:3, :3], centre=start[:3, 3])
    _assert_proper(res.rotation)
    assert geodesic_deg(res.rotation, case.rotation_ras) < 8.0
    assert np.linalg.norm(res.translation - case.com_ras) < 4.0


@pytest.mark.slow
@pytest.mark.parametrize("start, starts", [("identity", 1), ("moments", 4), ("multistart", 3)])
def test_start_modes_run_and_return_proper_rotations(template, case, start, starts):
    """Smoke test (few iterations): the right number of starts, a proper rotation, the best metric kept."""
    array, affine = _mirrored(case.image, case.affine, axis=0)  # mirrored storage: identity must stay proper
    res = reg.register(array, affine, template, start=start, n_starts=3, iterations=5)
    _assert_proper(res.rotation)
    assert res.starts == starts and res.info["start"].startswith(start)
    assert np.all(np.isfinite(res.translation)) and res.scale > 0 and res.seconds > 0
    ok = [m for m, bad in zip(res.info["metrics"], res.info["start_failed"]) if not bad]
    assert res.info["failed"] == (not ok)
    assert res.metric == (min(ok) if ok else min(res.info["metrics"]))
