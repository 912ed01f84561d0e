"""U-Net preprocessing: bit-compatible with upstream (torchio 0.20.6) and world-position preserving."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _support import pipeline_cases, reference, reference_shape, require_fixtures
from _support import rotation as rot
from E3PoseLogic import frames
from E3PoseLogic.preprocess import (
    crop_or_pad,
    crop_or_pad_bounds,
    map_unet_mask_to_input,
    minmax,
    resample_to_grid,
    resampled_grid,
    unet_input,
)


# ---------------------------------------------------------------------------------------------- upstream fixtures
@pytest.mark.parametrize("case", pipeline_cases())
def test_unet_input_matches_upstream(case):
    base = require_fixtures(f"pipeline/{case}_reference.npz", f"pipeline/input/{case}.nii.gz") / "pipeline"
    from E3PoseLogic.volume_io import load_volume

    ref = np.load(base / f"{case}_reference.npz")
    array, aff = load_volume(base / "input" / f"{case}.nii.gz")
    assert np.array_equal(aff, ref["affine"])
    x, unet_aff = unet_input(array, aff)
    want, index = reference(ref, "unet_input")  # the repository's trimmed copy stores every 2nd voxel per axis
    assert x.dtype == np.float32 and x.shape == reference_shape(ref, "unet_input")[2:] == (128, 128, 128)
    assert np.abs(unet_aff - ref["unet_aff"]).max() <= 1e-6
    # measured: bitwise equal (max abs difference 0.0) on both cases
    assert np.abs(x[None, None][index] - want).max() <= 1e-5


# ---------------------------------------------------------------------------------------------- torchio facts
def test_minmax():
    x = minmax(np.array([[-3.0, 1.0], [5.0, 0.0]]))
    assert x.dtype == np.float32 and x.min() == 0 and x.max() == 1
    assert np.allclose(x, [[0, 0.5], [1, 0.375]])
    c = np.full((3, 3), 4.0)
    assert np.array_equal(minmax(c), c)  # torchio leaves a constant image unchanged


def test_resampled_grid_torchio_0_20_6():
    aff = np.eye(4)
    aff[:3, :3] = rot("z", 30) @ np.diag([1.5, 1.25, 2.5])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    grid, shape = resampled_grid(aff, (160, 161, 47), 3.0)
    assert shape == (80, 68, 40)  # ceil(160*1.5/3), ceil(161*1.25/3 = 67.08), ceil(47*2.5/3 = 39.17)
    assert np.allclose(frames.voxel_sizes(grid), 3.0)
    assert np.allclose(frames.direction_cosines(grid), frames.direction_cosines(aff))
    # first voxel centre at input index 0.5 * (3 / s - 1): the corners of the first voxels coincide
    assert np.allclose(grid[:3, 3], frames.apply(aff, [0.5, 0.7, 0.1]))


def test_crop_or_pad_bounds_and_origin():
    pad_before, crop_before = crop_or_pad_bounds((124, 128, 121), (128, 128, 128))
    assert pad_before.tolist() == [2, 0, 4] and crop_before.tolist() == [0, 0, 0]  # torchio: (2, 2, 0, 0, 4, 3)
    pad_before, crop_before = crop_or_pad_bounds((132, 128, 135), (128, 128, 128))
    assert pad_before.tolist() == [0, 0, 0] and crop_before.tolist() == [2, 0, 4]
    a = np.arange(9 * 6 * 7, dtype=np.float32).reshape(9, 6, 7) + 1
    aff = np.eye(4)
    aff[:3, :3] = rot("x", 20) * 2.0
    aff[:3, 3] = [5.0, 6.0, 7.0]
    out, out_aff = crop_or_pad(a, aff, (6, 9, 7))
    assert out.shape == (6, 9, 7)
    # every kept voxel keeps its world position
    for idx in [(0, 2, 0), (3, 5, 6), (5, 7, 3)]:
        src = np.linalg.inv(aff) @ out_aff @ np.append(idx, 1.0)
        assert np.allclose(src[:3], np.round(src[:3]))
        assert out[idx] == a[tuple(np.round(src[:3]).astype(int))]
    assert (out[:, :2] == 0).all() and (out[:, -1] == 0).all()  # 3 padded: 2 before, 1 after


# ---------------------------------------------------------------------------------------------- world geometry
def blob_volume(aff, shape, centre, sigma=7.0):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    w = frames.apply(aff, ijk)
    return (100.0 + 900.0 * np.exp(-((w - centre) ** 2).sum(-1) / (2 * sigma**2))).astype(np.float32)


def grid(d, spacing, shape, centre_fov):
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(spacing)
    m[:3, 3] = np.asarray(centre_fov) - m[:3, :3] @ ((np.array(shape) - 1) / 2)
    return m


GRIDS = {
    "anisotropic": (np.eye(3), (0.8, 1.1, 3.5), (120, 100, 30)),
    "oblique": (rot("z", 30) @ rot("x", -50) @ rot("y", 20), (1.25, 1.25, 2.5), (96, 96, 48)),
    "mirrored": (rot("y", -35) @ rot("z", 15) @ np.diag([1.0, -1.0, 1.0]), (1.5, 1.2, 2.0), (80, 100, 60)),
    "mirrored_big": (np.diag([-1.0, 1.0, 1.0]) @ rot("x", 10), (1.0, 1.0, 1.0), (400, 200, 120)),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_unet_input_preserves_world_position(name):
    d, spacing, shape = GRIDS[name]
    fov_centre = np.array([12.0, -30.0, 45.0])
    aff = grid(d, spacing, shape, fov_centre)
    blob_centre = fov_centre + np.array([9.0, -6.0, 4.0])
    x, unet_aff = unet_input(blob_volume(aff, shape, blob_centre), aff)
    assert x.shape == (128, 128, 128) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.allclose(frames.voxel_sizes(unet_aff), 3.0)
    assert np.allclose(frames.direction_cosines(unet_aff), frames.direction_cosines(aff))  # handedness kept
    # the blob above its background level: its centre of mass must land at the true world centre
    w = np.clip(x - np.median(x[x > 0]), 0, None)
    ijk = np.stack(np.meshgrid(*[np.arange(128)] * 3, indexing="ij"), -1)
    com = (ijk * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    assert np.linalg.norm(frames.apply(unet_aff, com) - blob_centre) < 1.5
    # the U-Net grid is centred on the input's field of view (to within one 3 mm voxel)
    assert np.linalg.norm(frames.apply(unet_aff, [63.5, 63.5, 63.5]) - fov_centre) < 3.0


def test_unet_mask_maps_back_to_input_grid():
    d, spacing, shape = GRIDS["mirrored"]
    centre = np.array([5.0, 5.0, -5.0])
    aff = grid(d, spacing, shape, centre)
    _, unet_aff = unet_input(blob_volume(aff, shape, centre), aff)

    def ball(a, sh, r=20.0):
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in sh], indexing="ij"), -1).astype(float)
        return (np.linalg.norm(frames.apply(a, ijk) - centre, axis=-1) <= r).astype(np.uint8)

    mask_unet = ball(unet_aff, (128, 128, 128))
    on_input = map_unet_mask_to_input(mask_unet, unet_aff, aff, shape)
    want = ball(aff, shape)
    assert on_input.shape == shape and on_input.dtype == np.uint8
    # only voxels within one 3 mm U-Net voxel of the sphere surface may differ
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    dist = np.abs(np.linalg.norm(frames.apply(aff, ijk) - centre, axis=-1) - 20.0)
    assert not np.any((on_input != want) & (dist > 3.0 * np.sqrt(3)))
    assert abs(int(on_input.sum()) - int(want.sum())) < 0.1 * want.sum()
    # the linear map follows the surface more closely than the published nearest-neighbour one (its voxel steps)
    nearest = resample_to_grid(mask_unet, unet_aff, aff, shape, order=0)
    assert np.sum(on_input != want) < 0.8 * np.sum(nearest != want)
    # resampled only near the mask: the values of the whole grid's map; an empty mask maps to an empty one
    whole = resample_to_grid(mask_unet.astype(np.float32), unet_aff, aff, shape, order=1) >= 0.5
    assert on_input.sum() > 1000 and np.mean(on_input != whole) < 1e-5  # a voxel exactly at 0.5 may round either way
    assert not map_unet_mask_to_input(np.zeros_like(mask_unet), unet_aff, aff, shape).any()
    edge = np.zeros_like(mask_unet)  # a block about the input's corner voxel: partly outside the input
    c = np.rint(frames.apply(np.linalg.inv(unet_aff) @ aff, [0.0, 0.0, 0.0])).astype(int)
    edge[tuple(slice(v - 3, v + 3) for v in c)] = 1
    whole = resample_to_grid(edge.astype(np.float32), unet_aff, aff, shape, order=1) >= 0.5
    assert whole.any() and np.mean(map_unet_mask_to_input(edge, unet_aff, aff, shape) != whole) < 1e-5


def test_resample_to_grid_identity_and_shift():
    a = np.random.default_rng(0).random((10, 11, 12)).astype(np.float32)
    aff = grid(rot("x", 33) @ np.diag([1.0, -1.0, 1.0]), (1.0, 2.0, 3.0), a.shape, (1.0, 2.0, 3.0))
    for order in (0, 1):
        assert np.allclose(resample_to_grid(a, aff, aff, a.shape, order=order), a, atol=1e-6)
    shifted = aff.copy()
    shifted[:3, 3] = frames.apply(aff, [2, 0, 1])  # target voxel (0,0,0) = source voxel (2,0,1)
    out = resample_to_grid(a, aff, shifted, a.shape, order=0)
    assert np.array_equal(out[:-2, :, :-1], a[2:, :, 1:])
    assert (out[-2:] == 0).all()  # outside the source: default 0
    labels = resample_to_grid(a > 0.5, aff, aff, a.shape, order=0)
    assert labels.dtype == np.uint8 and np.array_equal(labels, (a > 0.5).astype(np.uint8))
    with pytest.raises(ValueError):
        resample_to_grid(a, aff, aff, a.shape, order=3)
    # one source sampled on many grids (the frame judge's search) gives each grid's values bit for bit
    from E3PoseLogic.preprocess import Resampler

    sample = Resampler(a, aff)
    for target in (shifted, aff):
        assert np.array_equal(sample(target, (7, 9, 5)), resample_to_grid(a, aff, target, (7, 9, 5)))


def test_logic_modules_import_light():
    code = (
        "import sys; import E3PoseLogic.frames, E3PoseLogic.atomic, E3PoseLogic.volume_io, E3PoseLogic.preprocess; "
        "import E3PoseLogic.pipeline, E3PoseLogic.checkpoints, E3PoseLogic.models, E3PoseLogic.outputs; "
        "import E3PoseLogic.mrml, E3PoseLogic.qc, E3PoseLogic.synth, E3PoseLogic.evaluate; "
        "from E3PoseLogic.cli import build_parser; build_parser(); "
        "bad = [m for m in ('torch', 'e3nn', 'vtk', 'slicer', 'SimpleITK') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_mask_in_the_padding_is_no_brain():
    """The U-Net grid pads a thin volume with zeros; a 'brain' drawn wholly there maps onto the image as nothing, so
    check_mask refuses it (the pipeline then tries its other grids), as it refuses one that crosses the image's edge."""
    from E3PoseLogic.errors import MaskAtBorder, NoBrainFound
    from E3PoseLogic.preprocess import field_of_view, map_unet_mask_to_input, unet_input
    from E3PoseLogic.segmentation import check_mask

    affine = np.diag([2.0, 4.0, 2.0, 1.0])
    shape = (100, 40, 100)  # 160 mm along j: the 64 x 6 mm grid reaches well beyond it
    x, g = unet_input(np.random.default_rng(0).random(shape).astype(np.float32), affine, 6.0, 64)
    fov = field_of_view(shape, affine, g, x.shape)
    js = np.flatnonzero(fov.any(axis=(0, 2)))
    mask = np.zeros(x.shape, np.uint8)
    mask[28:36, 2:8, 28:36] = 1  # below the first row of image data
    assert js[0] > 8 and not (mask.astype(bool) & fov).any()
    assert not map_unet_mask_to_input(mask, g, affine, shape).any()
    with pytest.raises(NoBrainFound, match=r"thin\.nii: .*outside the image's field of view"):
        check_mask(mask, "thin.nii", 216.0, fov=fov)
    mask[:] = 0
    mask[28:36, js[0] - 2:js[0] + 4, 28:36] = 1  # across the edge of the image
    with pytest.raises(MaskAtBorder):
        check_mask(mask, "thin.nii", 216.0, fov=fov)
    mask[:] = 0
    mask[28:36, 28:34, 28:36] = 1  # inside
    assert check_mask(mask, "thin.nii", 216.0, fov=fov) == pytest.approx(8 * 6 * 8 * 0.216)
