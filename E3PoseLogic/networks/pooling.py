"""Equivariant pooling of irreps-valued feature maps ([batch, irreps.dim, x, y, z])."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _irrep_slices(irreps):
    """(start, l) of every single irrep copy, in storage order."""
    start = 0
    for mul, ir in irreps:
        for _ in range(mul):
            yield start, ir.l, ir.p
            start += 2 * ir.l + 1


def _gather_windows(values, indices):
    """values [B, C, X, Y, Z], indices [B, x, y, z] flat spatial indices per sample -> [B, C, x, y, z]."""
    b, c = values.shape[:2]
    flat = values.reshape(b, c, -1)
    idx = indices.reshape(b, 1, -1).expand(b, c, -1)
    return torch.gather(flat, 2, idx).reshape(b, c, *indices.shape[1:])


def equivariant_max_pool3d(x, irreps, kernel_size, parity_exact=False):
    """Norm-based max-pool: each irrep copy keeps the vector of largest norm in each window.

    Scalars (l = 0) are max-pooled by value as published, or, with ``parity_exact``, odd scalars by absolute
    value (the only mirror-equivariant choice). Indices are gathered per sample, so batches > 1 are correct (the
    published version read sample 0 for every sample).
    """
    out = []
    for start, l, p in _irrep_slices(irreps):
        block = x[:, start:start + 2 * l + 1]
        if l == 0 and not (parity_exact and p == -1):
            out.append(F.max_pool3d(block, kernel_size, stride=kernel_size))
            continue
        norm = block.abs() if l == 0 else block.norm(dim=1, keepdim=True)
        _, idx = F.max_pool3d(norm, kernel_size, stride=kernel_size, return_indices=True)
        out.append(_gather_windows(block, idx[:, 0]))
    return torch.cat(out, dim=1)


def global_max_norm_pool(x, irreps, parity_exact=False):
    """Over the whole map: the vector of largest norm (pseudovector output)."""
    return equivariant_max_pool3d(x, irreps, tuple(x.shape[2:]), parity_exact)


def global_mean_direction_pool(x, irreps):
    """Over the whole map: the mean of per-voxel unit vectors (vector outputs); scalars are averaged."""
    out = []
    n = x.shape[2] * x.shape[3] * x.shape[4]
    weight = 1.0 / (n + 1e-8)  # the published weights: ones / (count + 1e-8)
    for start, l, _ in _irrep_slices(irreps):
        block = x[:, start:start + 2 * l + 1]
        if l == 0:
            out.append(block.mean(dim=(2, 3, 4), keepdim=True))
        else:
            unit = F.normalize(block, dim=1)
            out.append((weight * unit).sum(dim=(2, 3, 4), keepdim=True))
    return torch.cat(out, dim=1)


def norm_pool_flip_jump(x, irreps, kernel_size, rel_tol, parity_exact=False):
    """How far the choices of ``equivariant_max_pool3d(x, irreps, kernel_size, parity_exact)`` are from a near-tie.

    For every norm-pooled irrep copy (l > 0; odd scalars too with ``parity_exact``) and every window: the largest
    distance, relative to the kept vector's norm, from the kept vector to any vector of the window whose norm is
    within ``rel_tol`` (relative) of the largest norm. 0 where no *different* vector comes that close, i.e. where
    a rounding of the norms smaller than ``rel_tol`` cannot change the pooled output. Returns
    [batch, copies, *windows] (copies in storage order). A diagnostic for comparing implementations whose float32
    rounding differs; pooling itself does not use it.
    """
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    w = [n // s for n, s in zip(x.shape[2:], k)]  # max_pool3d drops the remainder
    x = x[:, :, :w[0] * k[0], :w[1] * k[1], :w[2] * k[2]]
    b = x.shape[0]
    out = []
    for start, l, p in _irrep_slices(irreps):
        if l == 0 and not (parity_exact and p == -1):
            continue  # max by value: a near-tie moves the result by no more than the rounding
        block = x[:, start:start + 2 * l + 1].reshape(b, 2 * l + 1, w[0], k[0], w[1], k[1], w[2], k[2])
        v = block.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, w[0], w[1], w[2], -1, 2 * l + 1)
        norm = v.norm(dim=-1)
        top, idx = norm.max(dim=-1, keepdim=True)  # first maximum, as max_pool3d
        kept = torch.gather(v, -2, idx.unsqueeze(-1).expand(*idx.shape, 2 * l + 1))
        dist = (v - kept).norm(dim=-1)
        near = norm >= top * (1.0 - rel_tol)
        jump = torch.where(near, dist, torch.zeros_like(dist)).amax(dim=-1) / top.squeeze(-1).clamp_min(1e-30)
        out.append(jump)
    if not out:
        return x.new_zeros((b, 0, *w))
    return torch.stack(out, dim=1)
