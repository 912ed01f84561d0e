"""The E3-CNN input: a cube around the brain, scale-normalised so the brain fills a fixed fraction of it.

Published rule (restated): on the U-Net grid, drop the zero padding (bounding box of non-zero voxels); take the brain
bounding box (inclusive min/max, centre (min+max)/2, extent max-min); the cube side is mean(extent)/scale voxels;
corners round(centre -/+ side/2) clipped to the array (so near the edge of the field of view the crop is clipped, not
padded); resize with the aspect ratio kept so the largest side is ``size`` (linear, torchio ``Resize`` geometry), then
min-max to [0, 1].

``shape="cube"`` (new models): a cube of ``size``^3 voxels centred on the brain's centre of mass, with the same
side, sampled (linear, 0 outside the grid). The published box depends on how the brain's extent and its rounding
fall along the array axes, and its odd sides put the stride-2 pooling of the E3-CNN on different voxels for a head
and its mirror image; a cube of even side about the centre of mass turns and mirrors with the head (exactly for the
grid's 48 signed axis permutations), so the network's equivariance reaches the input it is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .preprocess import crop_or_pad, minmax, resample_to_grid, resampled_grid


CROP_SHAPES = ("box", "cube")


@dataclass
class CropBox:
    start: np.ndarray  # inclusive start on the U-Net grid
    stop: np.ndarray  # exclusive stop on the U-Net grid
    side: float  # nominal cube side in U-Net voxels
    resized_shape: tuple
    shape: str = "box"  # "box" (published) or "cube" (see the module docstring)
    centre: Optional[np.ndarray] = None  # "cube": the crop's centre on the U-Net grid (the brain's centre of mass)

    @property
    def step(self) -> float:
        """U-Net voxels per crop voxel (the crop's spacing in U-Net voxels)."""
        if self.shape == "cube":
            return self.side / float(self.resized_shape[0])
        return float(max(np.asarray(self.stop) - np.asarray(self.start))) / float(max(self.resized_shape))

    def to_dict(self):
        d = {"start": self.start.tolist(), "stop": self.stop.tolist(), "side_voxels": float(self.side),
             "resized_shape": list(self.resized_shape), "shape": self.shape}
        if self.centre is not None:
            d["centre_voxel"] = np.asarray(self.centre).tolist()
        return d


def check_crop_shape(shape: str) -> str:
    if shape not in CROP_SHAPES:
        raise ValueError(f"crop shape must be one of {', '.join(CROP_SHAPES)}, not {shape!r}")
    return shape


def bbox(mask):
    """Inclusive (min, max) index of the non-zero voxels per axis."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise ValueError("empty mask has no bounding box")
    return np.array([i.min() for i in idx]), np.array([i.max() for i in idx])


def crop_box(volume, mask, scale=0.6, size=64):
    lo_fov, hi_fov = bbox(volume != 0)
    sub_mask = mask[tuple(slice(a, b + 1) for a, b in zip(lo_fov, hi_fov))]
    lo, hi = bbox(sub_mask)
    centre = (lo + hi) / 2.0
    side = float(np.mean(hi - lo)) / scale
    shape = np.array(sub_mask.shape)
    c1 = np.clip(np.round(centre - side / 2), 0, shape).astype(np.int64)
    c2 = np.clip(np.round(centre + side / 2), 0, shape).astype(np.int64)
    crop_shape = c2 - c1
    resized = tuple(int(v) for v in np.round(crop_shape * size / crop_shape.max()))
    return CropBox(start=lo_fov + c1, stop=lo_fov + c2, side=side, resized_shape=resized)


def resize(array, shape, order=1):
    """torchio ``Resize``: resample to the spacing that gives ``shape``, then crop/pad to exactly ``shape``."""
    unit = np.eye(4)
    new_spacing = np.ones(3) * np.array(array.shape) / np.array(shape)
    grid, grid_shape = resampled_grid(unit, array.shape, new_spacing)
    out = resample_to_grid(array, unit, grid, grid_shape, order=order)
    return crop_or_pad(out, grid, shape)[0]


def cube_box(volume, mask, scale=0.6, size=64):
    """The "cube" crop: ``size``^3 voxels about the mask's centre of mass, side as in ``crop_box``."""
    from scipy import ndimage

    lo, hi = bbox(mask)
    side = float(np.mean(hi - lo)) / scale
    centre = np.array(ndimage.center_of_mass(np.asarray(mask) > 0), dtype=np.float64)
    shape = np.array(np.shape(volume))
    start = np.clip(np.floor(centre - side / 2), 0, shape).astype(np.int64)
    stop = np.clip(np.ceil(centre + side / 2) + 1, 0, shape).astype(np.int64)
    return CropBox(start=start, stop=stop, side=side, resized_shape=(int(size),) * 3, shape="cube", centre=centre)


def crop_points(box, turn=None):
    """Cube crop voxel centres on the U-Net grid: [3, S, S, S] index coordinates; ``turn`` (3x3 rotation, U-Net
    index axes) turns the cube about its centre (crop point u samples the grid at centre + turn u)."""
    s = box.resized_shape[0]
    t = (np.arange(s) - (s - 1) / 2.0) * box.step
    g = np.stack(np.meshgrid(t, t, t, indexing="ij"), 0)
    if turn is not None:
        g = np.einsum("ij,j...->i...", np.asarray(turn, dtype=np.float64), g)
    return g + np.asarray(box.centre)[:, None, None, None]


def crop_array(array, box, order=1, turn=None):
    """``array`` (on the U-Net grid) on the crop's voxels: the E3-CNN input before min-max, or the mask (order 0).
    ``turn``: the cube turned about its centre (``crop_points``; cube crops only)."""
    if box.shape == "cube":
        from scipy import ndimage

        return ndimage.map_coordinates(np.asarray(array, dtype=np.float32), crop_points(box, turn), order=order,
                                       mode="constant", cval=0.0)
    if turn is not None:
        raise ValueError("only a cube crop can be turned")
    sl = tuple(slice(int(a), int(b)) for a, b in zip(box.start, box.stop))
    return resize(np.ascontiguousarray(array[sl], dtype=np.float32), box.resized_shape, order=order)


def crop_input(volume, box, turn=None):
    """The E3-CNN input on ``box``: ``volume`` (U-Net grid) on the crop's voxels, float32 min-max to [0, 1]
    (``turn``: see ``crop_array``)."""
    return minmax(crop_array(volume, box, turn=turn)).astype(np.float32, copy=False)


def crop_for_e3cnn(volume, mask, scale=0.6, size=64, shape="box"):
    """-> (E3-CNN input float32 in [0, 1], CropBox). ``volume`` and ``mask`` are on the U-Net grid; ``shape``: "box"
    (published) or "cube" (see the module docstring)."""
    make_box = cube_box if check_crop_shape(shape) == "cube" else crop_box
    box = make_box(volume, mask, scale, size)
    return crop_input(volume, box), box
