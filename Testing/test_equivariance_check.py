"""The crop-equivariance check of issue 10 (Resources/benchmarks/equivariance_check.py) on one head."""
from __future__ import annotations

import numpy as np
import pytest

from _support import blob_phantom, load_script

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def script():
    return load_script("equivariance_check")


@pytest.fixture(scope="module")
def pipeline():
    from E3PoseLogic.pipeline import Pipeline

    return Pipeline.from_files(device="cpu")  # the bundled, trained networks


def test_cube_crop_is_exact_on_the_grid_and_the_box_is_not(script, pipeline):
    x = blob_phantom((48, 48, 48), seed=6)
    ii = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing="ij")).astype(float)
    c, r = np.array([24.4, 22.7, 25.1]), np.array([9.3, 7.1, 8.2])
    mask = ((((ii - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1).astype(np.uint8)
    res = script.check_volume(pipeline, x, mask, np.random.default_rng(0), turns=1)
    assert len(res["cube"]["grid"]) == len(res["box"]["grid"]) == 48
    assert max(res["cube"]["grid"]) < 0.1  # float32 round-off only
    assert max(res["box"]["grid"]) > 1.0  # the published box moves by a voxel under mirrors
    assert len(res["cube"]["turned"]) == 1 and np.isfinite(res["cube"]["turned"][0])


def test_turn_on_grid_keeps_the_centre_of_mass(script):
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    mask = np.zeros((32, 32, 32), np.uint8)
    mask[10:20, 12:18, 9:23] = 1
    q = Rotation.from_euler("xyz", [30, -50, 70], degrees=True).as_matrix()
    _, mt = script.turn_on_grid(mask.astype(np.float32), mask, q)
    np.testing.assert_allclose(ndimage.center_of_mass(mt), ndimage.center_of_mass(mask), atol=0.3)
    assert abs(int(mt.sum()) - int(mask.sum())) < 0.1 * mask.sum()


def test_an_empty_folder_is_a_clear_error(script, tmp_path, capsys):
    assert script.main([str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "no NIfTI volume in" in capsys.readouterr().err
