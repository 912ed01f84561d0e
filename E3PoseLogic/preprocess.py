"""The U-Net input exactly as upstream builds it (torchio 0.20.6 transforms), without torchio.

Upstream ``preprocess_seg`` = RescaleIntensity(0, 1) -> Resample(3 mm, linear) -> CropOrPad(128) ->
RescaleIntensity(0, 1). The published weights were trained on that grid and intensity scale, so every step is
reproduced to float32 round-off, including torchio's particular choices:

* min-max in float32: ``(x - min) / (max - min)``;
* Resample (0.20.6, before torchio's June 2025 "symmetric resampling" change): size = ceil(n * s / s_new) per axis,
  first voxel centre at continuous index 0.5 * (s_new / s - 1) of the input (the new voxel's corner coincides with
  the old one's), direction kept, SimpleITK linear interpolation, 0 outside, no anti-aliasing;
* CropOrPad about the centre: per axis the difference d = 128 - n is split ceil(|d|/2) before, floor(|d|/2) after;
  padding (zeros) first, then cropping; the affine origin moves with the first index.

The U-Net grid ("unet grid") is therefore: 128^3 voxels of 3 mm along the input's own voxel axes (same direction
cosines, same handedness), centred (to within half a voxel) on the input's field of view.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from . import frames

UNET_SPACING = 3.0
UNET_SIZE = 128


def minmax(x: np.ndarray) -> np.ndarray:
    """float32 min-max to [0, 1] with torchio's operation order; a constant input is returned unchanged (as torchio)."""
    a = np.array(x, dtype=np.float32, copy=True)
    lo, hi = a.min(), a.max()
    rng = hi - lo
    if rng == 0:
        return a
    a -= lo
    a /= rng
    return a


def resampled_grid(ijk_to_ras: np.ndarray, shape, spacing: float = UNET_SPACING):
    """(ijk_to_ras, shape) of torchio 0.20.6 ``Resample(spacing)`` applied to this grid."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    old_spacing = frames.voxel_sizes(m)
    new_spacing = np.array([float(spacing)] * 3) if np.ndim(spacing) == 0 else np.asarray(spacing, dtype=np.float64)
    old_size = np.asarray(shape, dtype=np.int64)
    new_size = np.ceil(old_size * old_spacing / new_spacing).astype(np.int64)  # same float ops as torchio
    new_size[old_size == 1] = 1
    first_index = 0.5 * (new_spacing / old_spacing - 1)
    out = np.eye(4)
    out[:3, :3] = frames.direction_cosines(m) * new_spacing
    out[:3, 3] = frames.apply(m, first_index)
    return out, tuple(int(s) for s in new_size)


def crop_or_pad_bounds(shape, target) -> Tuple[np.ndarray, np.ndarray]:
    """torchio ``CropOrPad`` about the centre: (pad_before, crop_before) per axis (the rest goes after)."""
    diff = np.asarray(target, dtype=np.int64) - np.asarray(shape, dtype=np.int64)
    pad = np.maximum(diff, 0)
    crop = np.maximum(-diff, 0)
    return np.ceil(pad / 2).astype(np.int64), np.ceil(crop / 2).astype(np.int64)


def crop_or_pad(array: np.ndarray, ijk_to_ras: np.ndarray, target) -> Tuple[np.ndarray, np.ndarray]:
    """Zero-pad / crop ``array`` to ``target`` about its centre; returns (array, ijk_to_ras of the new grid)."""
    shape = np.array(array.shape[:3])
    target = np.broadcast_to(np.asarray(target, dtype=np.int64), (3,))
    pad_before, crop_before = crop_or_pad_bounds(shape, target)
    pad_total = np.maximum(target - shape, 0)
    padded = np.pad(array, [(int(b), int(t - b)) for b, t in zip(pad_before, pad_total)], mode="constant")
    sl = tuple(slice(int(c), int(c + t)) for c, t in zip(crop_before, target))
    out = padded[sl]
    m = np.array(ijk_to_ras, dtype=np.float64)
    m[:3, 3] = frames.apply(m, crop_before - pad_before)
    return np.ascontiguousarray(out), m


def resample_to_grid(
    array: np.ndarray,
    ijk_to_ras: np.ndarray,
    target_ijk_to_ras: np.ndarray,
    target_shape,
    order: int = 1,
    default: float = 0.0,
) -> np.ndarray:
    """Sample ``array`` (on grid ``ijk_to_ras``) at the voxel centres of the target grid, through world coordinates.

    order 0 = nearest (labels/masks), 1 = linear. SimpleITK does the work (the same interpolators torchio uses):
    points within half a voxel outside the source are clamped to its border, farther points get ``default``.
    The output dtype is the input's (bool is sampled as uint8).
    """
    return Resampler(array, ijk_to_ras)(target_ijk_to_ras, target_shape, order, default)


class Resampler:
    """``resample_to_grid`` for many target grids of one source: the source is handed to SimpleITK once.

    Why: the frame judge's search samples the same volume on 512 turned cubes, and copying the volume into a
    SimpleITK image for each took a third of that work. The values are ``resample_to_grid``'s, bit for bit."""

    def __init__(self, array: np.ndarray, ijk_to_ras: np.ndarray):
        a = np.asarray(array)
        if a.dtype == bool:
            a = a.astype(np.uint8)
        self.image = _to_sitk(a, ijk_to_ras)

    def __call__(self, target_ijk_to_ras, target_shape, order: int = 1, default: float = 0.0) -> np.ndarray:
        import SimpleITK as sitk

        interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear}.get(int(order))
        if interp is None:
            raise ValueError(f"order must be 0 (nearest) or 1 (linear), not {order}")
        origin, spacing, direction = frames.sitk_geometry(target_ijk_to_ras)
        out = sitk.Resample(
            self.image,
            [int(s) for s in target_shape],
            sitk.Transform(),
            interp,
            origin,
            spacing,
            direction,
            float(default),
            self.image.GetPixelID(),
        )
        return frames.kji_to_ijk(sitk.GetArrayFromImage(out)).copy()


def field_of_view(shape, ijk_to_ras: np.ndarray, grid_ijk_to_ras: np.ndarray, grid_shape) -> np.ndarray:
    """Where a grid has image data (bool): resampled grids are zero outside the input's field of view, and zero
    there means "unknown", not "dark"."""
    ones = np.ones(tuple(int(n) for n in shape), np.uint8)
    return resample_to_grid(ones, ijk_to_ras, grid_ijk_to_ras, tuple(grid_shape), order=0) > 0


def _to_sitk(array_ijk: np.ndarray, ijk_to_ras: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(frames.ijk_to_kji(array_ijk)))
    origin, spacing, direction = frames.sitk_geometry(ijk_to_ras)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def unet_input(
    array_ijk: np.ndarray, ijk_to_ras: np.ndarray, spacing: float = UNET_SPACING, size: int = UNET_SIZE
) -> Tuple[np.ndarray, np.ndarray]:
    """The segmentation U-Net input: (x float32 (size,)*3 in [0, 1], unet_ijk_to_ras 4x4).

    The grid: ``size``^3 voxels of ``spacing`` mm along the input's voxel axes, about the input's centre (see the
    module docstring). Outside the input's field of view x is 0.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    x = minmax(array_ijk)
    grid, shape = resampled_grid(m, x.shape, spacing)
    x = resample_to_grid(x, m, grid, shape, order=1)
    x, grid = crop_or_pad(x, grid, (size, size, size))
    return minmax(x), grid


def map_unet_mask_to_input(mask_unet: np.ndarray, unet_ijk_to_ras: np.ndarray, ijk_to_ras: np.ndarray, shape):
    """A U-Net-grid mask (e.g. brain, eyes) on the input grid (uint8): the mask interpolated linearly through world
    coordinates, kept where at least one half. The published code maps it nearest-neighbour, which draws the U-Net's
    voxels (6 mm for the bundled model) as staircases on the finer input grid; the linear map follows the same
    boundary half-way between voxel centres without the steps (brain Dice against the true label 0.878 -> 0.890
    median on 20 tuning volumes, session 27).

    Input voxels outside the U-Net field of view (beyond the central 384 mm) get 0. Only the input voxels within
    reach of the mask are resampled (the linear map is 0 beyond one U-Net voxel of it): the same values as the whole
    grid, in a fraction of the time (the brain is a small part of most volumes; an empty mask costs nothing).
    """
    m = np.asarray(mask_unet)
    shape = tuple(int(n) for n in shape)
    out = np.zeros(shape, dtype=np.uint8)
    idx = np.argwhere(m)
    if idx.size == 0:
        return out
    lo, hi = idx.min(0) - 1.0, idx.max(0) + 1.0  # U-Net voxels the interpolation can reach
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    ijk = frames.apply(np.linalg.inv(np.asarray(ijk_to_ras, np.float64)) @ np.asarray(unet_ijk_to_ras, np.float64),
                       corners)
    start = np.clip(np.floor(ijk.min(0)).astype(np.int64) - 1, 0, shape)
    stop = np.clip(np.ceil(ijk.max(0)).astype(np.int64) + 2, 0, shape)
    if np.any(stop <= start):
        return out
    block = np.asarray(ijk_to_ras, np.float64).copy()
    block[:3, 3] = frames.apply(ijk_to_ras, start.astype(np.float64))  # the same voxels, indexed from ``start``
    sub = resample_to_grid(m.astype(np.float32), unet_ijk_to_ras, block, tuple(stop - start), order=1)
    out[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))] = sub >= 0.5
    return out
