"""Resources/training/gpu_unet_stream.py, which trained the bundled U-Net's GPU phases: its training inputs must be
what inference builds (the SimpleITK-free resampling it used on the GPU machine, the in-memory phantoms)."""
import itertools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from _support import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("gpu_unet_stream", "training")


def _oblique(rng, spacing, shape):
    """A turned grid of ``shape`` voxels whose centre is near the world origin."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_rotvec(rng.normal(size=3)).as_matrix() @ np.diag(spacing)
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + rng.uniform(-5, 5, 3)
    return a


@pytest.mark.parametrize("order", [0, 1])
def test_scipy_resampling_matches_simpleitk(script, order):
    from E3PoseLogic.preprocess import resample_to_grid

    rng = np.random.default_rng(3)
    for trial in range(3):
        src = _oblique(rng, rng.uniform(2.0, 3.0, 3), (30, 26, 22))
        dst = _oblique(rng, rng.uniform(2.5, 3.5, 3), (24, 28, 20))
        a = rng.random((30, 26, 22)).astype(np.float32)
        if order == 0:
            a = (a * 3).astype(np.uint8)
        ref = resample_to_grid(a, src, dst, (24, 28, 20), order=order)
        out = script.scipy_resample_to_grid(a, src, dst, (24, 28, 20), order=order)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert 0.2 < np.mean(ref != 0) < 0.9  # part inside, part outside the source
        if order:
            np.testing.assert_allclose(out, ref, atol=1e-5)
        else:  # a point within rounding of a voxel boundary may go either way on another CPU
            assert np.mean(out != ref) <= 1e-3
    with pytest.raises(ValueError, match="order"):
        script.scipy_resample_to_grid(a, src, dst, (4, 4, 4), order=3)


def test_in_memory_case_equals_the_files_path(script, tmp_path):
    """A streamed case is the U-Net input that ``e3pose synth`` + ``training.data.unet_case`` make from files."""
    from E3PoseLogic.synth import generate_dataset
    from E3PoseLogic.training.data import unet_case

    opts = dict(script.RECIPES[3][1])  # varied anatomy, navigator-like
    generate_dataset(tmp_path, n=1, seed=4242, cfg=script.synth_config(opts))
    img = next((tmp_path / "images").glob("*.nii.gz"))
    x_ref, y_ref = unet_case(img, tmp_path / "labels" / img.name, script.SPACING, script.SIZE)
    x, y, tag = script.unet_case((4242, 0, opts, False))
    assert tag == "4242_0" and x.shape == x_ref.shape == (64, 64, 64)
    assert np.abs(x.astype(np.float32) - x_ref).max() < 2e-3  # float16 storage
    assert (y_ref == 1).sum() > 500 and np.mean(y != y_ref) < 1e-3  # NIfTI stores the affine in float32


def test_recipe_stream(script):
    shares = [s for s, _ in script.RECIPES]
    assert abs(sum(shares) - 1.0) < 1e-9
    a = list(itertools.islice(script.training_jobs(False), 2000))
    assert a == list(itertools.islice(script.training_jobs(False), 2000))  # deterministic
    seeds = np.array([j[0] for j in a]) - script.SEED_BASE
    np.testing.assert_allclose(np.bincount(seeds, minlength=len(shares)) / len(a), shares, atol=0.04)
    assert len({(j[0], j[1]) for j in a}) == len(a)  # every draw a new phantom
    assert len(script.val_jobs(False)) == 84
