"""E(3)-equivariant voxel convolution and the gated convolution block (e3nn).

A kernel is a sum over tensor-product paths of (learned radial profile) x (spherical harmonics) x
(Clebsch-Gordan), sampled on a small cubic lattice: the Weiler et al. steerable-CNN construction as e3nn builds it.
Because the kernel is a pure function of the weights, eval mode builds it once and caches it.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import BatchNorm, Gate


class EquivariantConv3d(torch.nn.Module):
    """Self-connection (per-voxel e3nn Linear) + convolution with an equivariant dense kernel.

    ``steps`` is the voxel size in the units of ``diameter``; the lattice has floor(diameter / 2 / step) points on
    each side of the centre. Attribute names (sc, tp, weight, lattice, emb, sh) match the published checkpoints.
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, diameter, num_radial_basis, steps=(1.0, 1.0, 1.0),
                 cutoff=False):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.num_radial_basis = num_radial_basis

        self.sc = o3.Linear(self.irreps_in, self.irreps_out)

        radius = diameter / 2
        axes = []
        for step in steps:
            s = math.floor(radius / step)
            axes.append(torch.arange(-s, s + 1.0) * step)
        lattice = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [x, y, z, 3]; l=1 order = array axes
        self.register_buffer("lattice", lattice)
        self.padding = tuple(n // 2 for n in lattice.shape[:3])

        emb = soft_one_hot_linspace(lattice.norm(dim=-1), 0.0, radius, num_radial_basis,
                                    basis="smooth_finite", cutoff=cutoff)
        self.register_buffer("emb", emb)  # [x, y, z, B]
        sh = o3.spherical_harmonics(self.irreps_sh, lattice, normalize=True, normalization="component")
        self.register_buffer("sh", sh)  # [x, y, z, sh.dim]

        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, self.irreps_sh, self.irreps_out,
                                                 shared_weights=False, compile_right=True)
        self.weight = torch.nn.Parameter(torch.randn(num_radial_basis, self.tp.weight_numel))

        self.cache_kernel = True
        self._cache = None
        self._cache_key = None

    def build_kernel(self):
        """Dense conv3d kernel [out, in, x, y, z] from the radial weights (recomputed from scratch)."""
        n_points = self.sh.shape[0] * self.sh.shape[1] * self.sh.shape[2]
        weight = (self.emb @ self.weight) / n_points  # per-offset tensor-product weights
        kernel = self.tp.right(self.sh, weight)  # [x, y, z, in, out]
        return torch.einsum("xyzio->oixyz", kernel)

    def kernel(self):
        """The kernel, cached while the module is in eval mode and gradients are off."""
        if not self.cache_kernel or self.training or torch.is_grad_enabled():
            return self.build_kernel()
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype, self.emb._version, self.sh._version)
        if self._cache is None or self._cache_key != key:
            # contiguous once, so conv3d does not re-lay-out a permuted view at every call (30% of the CPU time)
            self._cache = self.build_kernel().contiguous()
            self._cache_key = key
        return self._cache

    def clear_cache(self):
        self._cache = None
        self._cache_key = None

    def train(self, mode=True):
        self.clear_cache()
        return super().train(mode)

    def forward(self, x):
        sc = self.sc(x.transpose(1, 4)).transpose(1, 4)
        return sc + torch.nn.functional.conv3d(x, self.kernel(), padding=self.padding)


def _channels_last(module, x):
    """Apply an e3nn module that wants irreps on the last axis to [B, C, x, y, z]."""
    return module(x.transpose(1, 4)).transpose(1, 4)


class GatedBlock(torch.nn.Module):
    """Two x (equivariant conv -> e3nn instance norm -> gate): one level of the encoder."""

    def __init__(self, irreps_in, irreps_hidden, irreps_sh, diameter, num_radial_basis, steps, normalization,
                 cutoff=False):
        super().__init__()
        irreps_hidden = o3.Irreps(irreps_hidden)
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e")
        act_scalars = [torch.relu if ir.p == 1 else torch.tanh for _, ir in scalars]
        # e3nn wants one activation per irreps entry; the published net uses [relu, tanh] for 0e, 0o
        act_gates = [torch.sigmoid] if gates.dim else []

        def make_norm(irreps):
            if normalization == "instance":
                return BatchNorm(irreps, instance=True)
            if normalization == "batch":
                return BatchNorm(irreps)
            return torch.nn.Identity()

        self.gate1 = Gate(scalars, act_scalars, gates, act_gates, gated)
        self.conv1 = EquivariantConv3d(irreps_in, self.gate1.irreps_in, irreps_sh, diameter, num_radial_basis,
                                       steps, cutoff)
        self.batchnorm1 = make_norm(self.gate1.irreps_in)
        self.gate2 = Gate(scalars, act_scalars, gates, act_gates, gated)
        self.conv2 = EquivariantConv3d(self.gate1.irreps_out, self.gate2.irreps_in, irreps_sh, diameter,
                                       num_radial_basis, steps, cutoff)
        self.batchnorm2 = make_norm(self.gate2.irreps_in)
        self.irreps_out = self.gate2.irreps_out

    def forward(self, x):
        x = self.conv1(x)
        x = _channels_last(self.gate1, _channels_last(self.batchnorm1, x))
        x = self.conv2(x)
        x = _channels_last(self.gate2, _channels_last(self.batchnorm2, x))
        return x
