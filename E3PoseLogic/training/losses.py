"""Published training losses, plus the geodesic alternative and the validation metrics.

U-Net: class-weighted cross-entropy (1, 8, 2) + 0.5 x soft Dice on the non-background classes.
E3-CNN: on the UNPOOLED output map, every voxel supervised against the rows (e_x, e_y, e_z) of R_target:
0.5 mean |p_hat x e_x| (the left-right axis is a pseudovector whose sign the mirror symmetry leaves free, so only its
direction is supervised) + mean |a_hat - e_y| + mean |b_hat - e_z| (L1 over components and voxels).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..rotation import axes_to_rotation_torch

UNET_CLASS_WEIGHTS = (1.0, 8.0, 2.0)


def soft_dice_loss(logits, target, class_weights=UNET_CLASS_WEIGHTS, classes=(1, 2), eps=1e-5):
    """1 - soft Dice per class (batch and voxels pooled), averaged with the class weights."""
    probs = torch.softmax(logits.float(), dim=1)
    total, wsum = 0.0, 0.0
    for c in classes:
        p = probs[:, c]
        y = (target == c).float()
        dice = (2 * (p * y).sum() + eps) / (p.sum() + y.sum() + eps)
        total = total + class_weights[c] * (1 - dice)
        wsum += class_weights[c]
    return total / wsum


def unet_loss(logits, target, class_weights=UNET_CLASS_WEIGHTS, dice_weight=0.5):
    """logits [B, C, X, Y, Z], target [B, X, Y, Z] integer labels."""
    w = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    ce = F.cross_entropy(logits.float(), target.long(), weight=w)
    return ce + dice_weight * soft_dice_loss(logits, target, class_weights)


def hard_dice(pred, target, label):
    """Dice of one label between two integer label maps (1.0 when both are empty)."""
    p, t = (pred == label), (target == label)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * float((p & t).sum()) / denom


def _safe_norm(v, dim, eps=1e-12):
    """Norm with a finite gradient at 0 (a perfect prediction makes the cross product exactly 0)."""
    return torch.sqrt((v * v).sum(dim=dim).clamp_min(eps))


def voxel_axes_loss(out, r_target, pseudo_weight=0.5):
    """out [B, 9, X, Y, Z] (p, a, b), r_target [B, 3, 3] with rows e_x, e_y, e_z in the array-axis frame."""
    out = out.float()
    shape = (out.shape[0], 3) + (1,) * (out.dim() - 2)
    p, a, b = (F.normalize(out[:, 3 * i:3 * i + 3], dim=1, eps=1e-8) for i in range(3))
    ex, ey, ez = (r_target[:, i].float().reshape(shape) for i in range(3))
    cross = torch.cross(p, ex.expand_as(p), dim=1)
    l_p = _safe_norm(cross, dim=1).mean()
    l_a = (a - ey).abs().mean()
    l_b = (b - ez).abs().mean()
    return pseudo_weight * l_p + l_a + l_b


def no_autocast(t):
    """A region that runs in the tensors' own precision even inside a mixed-precision autocast, on t's device."""
    return torch.autocast(t.device.type, enabled=False)


def _float32(fn):
    """Rotation maths in float32 even under mixed-precision autocast (SVD has no half kernels, and a bf16 angle
    is only good to about a degree)."""

    @functools.wraps(fn)
    def wrapper(*tensors):
        with no_autocast(tensors[0]):
            return fn(*(t.float() for t in tensors))

    return wrapper


@_float32
def predicted_rotation(pooled):
    """Pooled output [B, 9] -> [B, 3, 3], columns e_x, e_y, e_z (proper; the published handedness rule)."""
    return axes_to_rotation_torch(pooled[:, 0:3], pooled[:, 3:6], pooled[:, 6:9])


@_float32
def geodesic_angle(r1, r2):
    """Angle (radians) of r1^T r2 for batches [B, 3, 3], via atan2 (accurate and differentiable near 0 and pi)."""
    m = r1.transpose(-1, -2) @ r2
    cos = (m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = torch.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], dim=-1)
    sin = _safe_norm(skew, dim=-1) / 2
    return torch.atan2(sin, cos)


def geodesic_loss(pooled, r_target):
    """Mean geodesic angle (radians) between the predicted rotation and the target (columns = rows of R_target)."""
    return geodesic_angle(predicted_rotation(pooled), r_target.float().transpose(-1, -2)).mean()


def frame_geodesic_loss(pooled, r_target):
    """``geodesic_loss`` for outputs whose (p, a, b) already are a proper orthonormal frame (the standard CNN's
    Gram-Schmidt head): the frame is the rotation, taken as is. Going through ``predicted_rotation`` instead gives the
    same value but no usable gradient: torch's SVD backward divides by s_i^2 - s_j^2, and an orthonormal frame has
    all singular values 1 (non-finite gradients from the first step)."""
    r_pred = pooled.float().reshape(-1, 3, 3).transpose(-1, -2)  # rows p, a, b -> columns e_x, e_y, e_z
    return geodesic_angle(r_pred, r_target.float().transpose(-1, -2)).mean()


def rotation_errors_deg(pooled, r_target) -> np.ndarray:
    """Validation metric: geodesic error per sample in degrees (no gradient)."""
    with torch.no_grad():
        ang = geodesic_angle(predicted_rotation(pooled), r_target.float().transpose(-1, -2))
    return ang.detach().cpu().numpy() * (180.0 / math.pi)
