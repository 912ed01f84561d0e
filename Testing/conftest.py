"""Shared fixtures: a headless Slicer scene (slicer-core, no Qt) and a synthetic fetal head of known pose.

Nothing heavy is imported at module top: tests that do not use these fixtures do not pay for slicer/vtk.
"""
from __future__ import annotations

import numpy as np
import pytest

from _support import rotation, true_brain_ml  # noqa: F401  (rotation re-exported for the test modules)


# canonical landmarks (mm): x = left-right (to the left), y = posterior -> anterior, z = superior -> inferior
BRAIN_RADII = (30.0, 36.0, 28.0)
EYES = ((-17.0, 34.0, 10.0), (17.0, 34.0, 10.0))
EYE_RADIUS = 6.0
MARKER = (14.0, -10.0, -14.0)  # left, posterior, superior: breaks every symmetry of the ellipsoid
MARKER_RADIUS = 6.0


def make_synthetic_head(shape=(48, 48, 40), spacing=(2.4, 2.4, 3.0), grid_rotation=None, mirror=False,
                        pose_rotation=None, centre=(6.0, -4.0, 10.0)):
    """(i, j, k) float32 volume, its affine, the pose (canonical -> world 4x4), brain/eye masks, a PoseResult."""
    from E3PoseLogic.result import PoseResult

    d = np.eye(3) if grid_rotation is None else np.asarray(grid_rotation, float)
    if mirror:
        d = d @ np.diag([-1.0, 1.0, 1.0])
    g = np.eye(4)
    g[:3, :3] = d @ np.diag(spacing)
    half = (np.array(shape) - 1) / 2.0
    g[:3, 3] = np.asarray(centre) - g[:3, :3] @ half  # grid centred on the head
    r = rotation("z", 35) @ rotation("x", -25) @ rotation("y", 15) if pose_rotation is None else pose_rotation
    pose = np.eye(4)
    pose[:3, :3] = r
    pose[:3, 3] = np.asarray(centre) + np.array([3.0, -2.0, 1.5])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    world = ijk @ g[:3, :3].T + g[:3, 3]
    can = (world - pose[:3, 3]) @ r  # inv(R) (w - t)
    brain = (((can / np.array(BRAIN_RADII)) ** 2).sum(1) <= 1.0)
    eyes = np.zeros(len(can), bool)
    for e in EYES:
        eyes |= ((can - e) ** 2).sum(1) <= EYE_RADIUS ** 2
    marker = ((can - MARKER) ** 2).sum(1) <= MARKER_RADIUS ** 2
    vol = np.full(len(can), 10.0, np.float32)
    vol[brain] = 100.0
    vol[eyes] = 200.0
    vol[marker] = 400.0
    vol = vol.reshape(shape)
    brain_m = brain.reshape(shape).astype(np.uint8)
    eye_m = eyes.reshape(shape).astype(np.uint8)
    flip = np.diag([np.sign(np.linalg.det(d)), 1.0, 1.0])
    result = PoseResult(
        rotation=r, translation=pose[:3, 3].copy(), brain_mask=brain_m, eye_mask=eye_m, ijk_to_ras=g,
        rotation_voxel=d.T @ r @ flip, confidence={"determinant": 1.0},
        provenance={"model": {"e3cnn": {"path": "synthetic", "sha256": "0" * 64}}, "device": "cpu",
                    "e3pose_version": "test"},
    )
    return dict(array=vol, affine=g, pose=pose, brain=brain_m, eyes=eye_m, marker=marker.reshape(shape),
                result=result)


KNOWN_HEADS_SEED = 9301  # synth seed never used by a training, tuning or test set


@pytest.fixture(scope="session")
def heads():
    """Six standard synthetic heads of known pose (seed 9301) with their true brain volumes (ml), read-only: the
    refinement and residual tests share them."""
    from E3PoseLogic.synth.dataset import make_case

    return [(case, true_brain_ml(case)) for case in (make_case(KNOWN_HEADS_SEED, i) for i in range(6))]


@pytest.fixture
def synthetic_head():
    return make_synthetic_head(grid_rotation=rotation("x", 20) @ rotation("z", -30), mirror=True)


@pytest.fixture
def headless_app():
    pytest.importorskip("slicer")
    from E3PoseLogic.mrml.scene_app import create_headless_app

    app = create_headless_app()
    yield app
    app.scene.Clear(1)


@pytest.fixture
def scene(headless_app):
    return headless_app.scene
