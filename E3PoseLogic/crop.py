"""The E3-CNN input: a cube around the brain, scale-normalised so the brain fills a fixed fraction of it.

Published rule (restated): on the U-Net grid, drop the zero padding (bounding box of non-zero voxels); take the brain
bounding box (inclusive min/max, centre (min+max)/2, extent max-min); the cube side is mean(extent)/scale voxels;
corners round(centre -/+ side/2) clipped to the array (so near the edge of the field of view the crop is clipped, not
padded); resize with the aspect ratio kept so the largest side is ``size`` (linear, torchio ``Resize`` geometry), then
min-max to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .preprocess import crop_or_pad, minmax, resample_to_grid, resampled_grid


@dataclass
class CropBox:
    start: np.ndarray  # inclusive start on the U-Net grid
    stop: np.ndarray  # exclusive stop on the U-Net grid
    side: float  # nominal cube side in U-Net voxels
    resized_shape: tuple

    def to_dict(self):
        return {"start": self.start.tolist(), "stop": self.stop.tolist(), "side_voxels": float(self.side),
                "resized_shape": list(self.resized_shape)}


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


def crop_for_e3cnn(volume, mask, scale=0.6, size=64):
    """-> (E3-CNN input float32 in [0, 1], CropBox). ``volume`` and ``mask`` are on the U-Net grid."""
    box = crop_box(volume, mask, scale, size)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(box.start, box.stop))
    return minmax(resize(np.ascontiguousarray(volume[sl], dtype=np.float32), box.resized_shape)), box
