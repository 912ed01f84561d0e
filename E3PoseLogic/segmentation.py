"""From U-Net posteriors to the brain mask (published post-processing) and mask sanity checks."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_THRESHOLDS = (0.9, 0.8, -1.0)  # background, brain, eyes
BRAIN, EYES = 1, 2


def softmax(logits, axis=0):
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def labels_from_posteriors(posteriors, thresholds=DEFAULT_THRESHOLDS):
    """Posteriors [C, x, y, z] -> label map: a class survives only where its posterior exceeds its threshold.

    The published rule (zero sub-threshold posteriors, softmax again, argmax) reduces to an argmax over the
    thresholded posteriors: softmax is monotonic and zeroed entries tie at exp(0) for every class alike, so
    argmax(softmax(q)) = argmax(q). Ties resolve to the lowest class index, as argmax does.
    """
    p = np.asarray(posteriors, dtype=np.float32)
    thr = np.asarray(thresholds, dtype=np.float32).reshape(-1, *([1] * (p.ndim - 1)))
    q = np.where(p > thr, p, np.float32(0.0))
    return np.argmax(q, axis=0).astype(np.uint8)


def largest_component(mask):
    """Largest 6-connected component (ties: the first in C raster order, as the published code keeps)."""
    lab, n = ndimage.label(mask)  # default structure = 6-connectivity in 3D
    if n == 0:
        return np.zeros(mask.shape, dtype=np.uint8)
    sizes = np.bincount(lab.ravel())[1:]
    return (lab == (int(np.argmax(sizes)) + 1)).astype(np.uint8)


# The published eye threshold (-1) makes "eyes" of every voxel where neither background nor brain clears its
# threshold, whatever the eye posterior (0.01 will do): the rim of uncertain voxels around the brain. With a U-Net whose
# eye class was never learned (the bundled one: eye Dice 0) that rim is all the eyes there are, drawn as cyan blobs
# round the brain in QC pictures and in Slicer. An eye voxel must also be more likely eye than not.
EYE_MIN_POSTERIOR = 0.5


def brain_and_eyes(posteriors, thresholds=DEFAULT_THRESHOLDS, eye_min_posterior=EYE_MIN_POSTERIOR):
    """-> (brain mask: largest component of label 1, eye mask), uint8. Eyes: label 2 where the eye posterior is at
    least ``eye_min_posterior`` (None: the published rule's label 2). The brain mask, and so the pose, is the
    published rule's either way: a brain voxel's posterior exceeds 0.8, so no eye posterior can outvote it."""
    labels = labels_from_posteriors(posteriors, thresholds)
    eyes = labels == EYES
    if eye_min_posterior is not None:
        eyes &= np.asarray(posteriors)[EYES] >= np.float32(eye_min_posterior)
    return largest_component(labels == BRAIN), eyes.astype(np.uint8)


def unet_masks(unet, x_unet, thresholds=DEFAULT_THRESHOLDS, device="cpu"):
    """U-Net grid volume (float32, [0,1]) -> (brain mask, eye mask), uint8 on the same grid: the U-Net's forward pass
    and the post-processing above, the one place inference and training (``--unet-crops``) make a mask."""
    import torch

    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x_unet, dtype=np.float32))[None, None].to(device)
        logits = unet(t.contiguous(memory_format=torch.channels_last_3d))[0].float().cpu().numpy()
    return brain_and_eyes(softmax(logits, axis=0), thresholds)


def check_mask(mask, source, voxel_volume_mm3, fov=None, min_volume_ml=5.0):
    """Refuse masks the pose cannot be trusted on: empty, tiny, or cut by the edge of the field of view.

    ``fov`` is a boolean array of where the image has data (the U-Net grid is zero-padded outside it).
    """
    from .errors import MaskAtBorder, NoBrainFound

    n = int(np.count_nonzero(mask))
    if n == 0:
        raise NoBrainFound(source, "the brain mask is empty: no brain found (is the head in the field of view? "
                                 "is this a fetal MRI volume?)")
    volume_ml = n * voxel_volume_mm3 / 1000.0
    if volume_ml < min_volume_ml:
        raise NoBrainFound(source, f"the brain mask is too small ({volume_ml:.1f} ml, {n} voxels; at least "
                                 f"{min_volume_ml:g} ml expected): the pose would be unreliable")
    inside = fov if fov is not None else np.ones(mask.shape, dtype=bool)
    # a mask wholly in the zero padding around the image is not a brain of this image (the U-Net can draw one there;
    # it maps onto the input as nothing); a mask partly outside crosses the edge below
    if not np.count_nonzero(mask.astype(bool) & inside):
        raise NoBrainFound(source, f"the brain mask ({volume_ml:.1f} ml) lies outside the image's field of view, in "
                                 "the padding of the U-Net grid: no brain found in the image")
    shell = np.zeros(mask.shape, dtype=bool)
    shell[[0, -1], :, :] = shell[:, [0, -1], :] = shell[:, :, [0, -1]] = True
    edge = shell | (inside & ~ndimage.binary_erosion(inside, border_value=0))
    touching = int(np.count_nonzero(mask.astype(bool) & edge))
    if touching:
        raise MaskAtBorder(source, f"the brain mask touches the border of the field of view ({touching} voxels): "
                                 "the head is cut off, so its centre and orientation would be wrong")
    return volume_ml
