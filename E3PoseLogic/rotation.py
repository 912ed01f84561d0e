"""Rotation maths: the network's axes to a proper rotation, and rotation distances.

The E3-CNN outputs a pseudovector p (the left-right axis, sign-free by the head's mirror symmetry) and two vectors
a (posterior->anterior) and b (superior->inferior). The sign of p is chosen so that [p a b] is right-handed, then the
nearest rotation (orthogonal Procrustes, via SVD) is taken. That is exactly the published rule "use the polar factor of
[p|a|b] if proper, else of [-p|a|b]", written once.
"""
from __future__ import annotations

import numpy as np


def axes_to_rotation(p, a, b):
    """Columns of the result: e_x, e_y, e_z. Returns (R, info) with R proper (det +1) and diagnostics.

    info: ``singular_values`` of the sign-corrected [p|a|b] (all near 1 for three orthonormal unit axes; a small one
    means two axes collapsed), ``det_pab`` (before the sign choice), ``flipped`` (p negated).
    """
    m = np.stack([_unit(p), _unit(a), _unit(b)], axis=1).astype(np.float64)
    det = float(np.linalg.det(m))
    flipped = det < 0
    if flipped:
        m[:, 0] = -m[:, 0]
    u, s, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:  # only for a degenerate (rank-deficient) input: stay proper regardless
        u[:, -1] = -u[:, -1]
        r = u @ vt
    return r, {"singular_values": s.tolist(), "det_pab": det, "flipped": bool(flipped)}


def nearest_rotation(m):
    """Polar factor U V^T of a 3x3 matrix: the nearest orthogonal matrix (round-off in stored or edited rotations).
    Its determinant has the sign of det(m): callers that need a proper rotation check it."""
    u, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64))
    return u @ vt


def _unit(v):
    v = np.asarray(v, dtype=np.float64).reshape(3)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError("a network output axis has zero length")
    return v / n


def geodesic_deg(r1, r2):
    """Angle of the rotation r1^T r2 in degrees (the geodesic distance on SO(3)); batches (..., 3, 3) work too.

    atan2 of the sine (from the skew part) and cosine (from the trace) stays accurate near 0 and 180 degrees,
    where arccos of the trace alone loses half the digits (0.03 degrees for float32 matrices).
    """
    m = np.einsum("...ji,...jk->...ik", np.asarray(r1, dtype=np.float64), np.asarray(r2, dtype=np.float64))
    cos = (np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0
    skew = np.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    angle = np.degrees(np.arctan2(np.linalg.norm(skew, axis=-1) / 2.0, cos))
    return float(angle) if np.ndim(angle) == 0 else angle


def world_rotation(rotation_voxel, direction):
    """Voxel-axis-frame rotation -> world rotation, proper even for mirrored voxel storage (det D < 0).

    a and b are vectors (world = D a) but p is a pseudovector (world = det(D) D p), hence the column sign.
    """
    d = np.asarray(direction, dtype=np.float64)
    flip = np.diag([np.sign(np.linalg.det(d)), 1.0, 1.0])
    # direction cosines from a float32 header are orthogonal only to ~1e-7
    return nearest_rotation(d @ np.asarray(rotation_voxel, dtype=np.float64) @ flip)


def voxel_rotation(rotation, direction):
    """Inverse of ``world_rotation``: a proper world rotation -> the voxel-axis frame (upstream ``rot_img``)."""
    d = np.asarray(direction, dtype=np.float64)
    flip = np.diag([np.sign(np.linalg.det(d)), 1.0, 1.0])
    return d.T @ np.asarray(rotation, dtype=np.float64) @ flip


def axes_to_rotation_torch(p, a, b):
    """Batched torch version for training: inputs [B, 3] -> [B, 3, 3] proper rotations (differentiable)."""
    import torch

    m = torch.stack([torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(a, dim=-1),
                     torch.nn.functional.normalize(b, dim=-1)], dim=-1)
    sign = torch.where(torch.linalg.det(m) < 0, -1.0, 1.0).to(m.dtype)
    m = torch.cat([m[..., :1] * sign[:, None, None], m[..., 1:]], dim=-1)
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def grid_symmetry_matrix(order, flips):
    """The 3x3 matrix on array-index vectors (about the centre) of ``apply_grid_symmetry(a, order, flips)``."""
    g = np.zeros((3, 3))
    for k in range(3):
        g[k, order[k]] = flips[k]
    return g


def apply_grid_symmetry(a, order, flips):
    """A symmetry of the voxel grid: the axes transposed by ``order``, then axis k reversed where ``flips[k] < 0``."""
    b = np.transpose(np.asarray(a), order)
    return np.ascontiguousarray(np.flip(b, [k for k in range(3) if flips[k] < 0]))


def grid_symmetries():
    """The grid's 48 symmetries (signed axis permutations): (order, flips, matrix) each; det -1 for the mirrors."""
    import itertools

    return [(order, flips, grid_symmetry_matrix(order, flips)) for order in itertools.permutations(range(3))
            for flips in itertools.product((1, -1), repeat=3)]
