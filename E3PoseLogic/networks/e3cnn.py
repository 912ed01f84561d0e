"""The E(3)-CNN of E(3)-Pose: an O(3)-equivariant encoder that outputs one pseudovector and two vectors.

Layout (published): ``n_downsample + 1`` gated levels with hidden irreps
``4m x0e + 4m x0o + 2m x1e + 2m x1o + m x2e + m x2o`` (m = mult * 2**level), kernels of diameter 5 voxel steps on a
5^3 lattice whose step doubles with each 2x norm max-pool, spherical harmonics up to ``lmax``, an output
convolution to ``1x1e + 2x1o``, then global pooling: the pseudovector of largest norm and the mean unit vectors.
"""
from __future__ import annotations

import torch
from e3nn import o3

from .config import E3CNNConfig
from .equivariant import EquivariantConv3d, GatedBlock
from .pooling import equivariant_max_pool3d, global_max_norm_pool, global_mean_direction_pool


class Down(torch.nn.Module):
    def __init__(self, cfg: E3CNNConfig, irreps_sh):
        super().__init__()
        blocks, self.irreps_out = [], []
        irreps_in = o3.Irreps(cfg.input_irreps)
        m = cfg.mult
        for level in range(cfg.n_downsample + 1):
            hidden = o3.Irreps(f"{4 * m}x0e + {4 * m}x0o + {2 * m}x1e + {2 * m}x1o + {m}x2e + {m}x2o").simplify()
            step = float(2 ** level)
            block = GatedBlock(irreps_in, hidden, irreps_sh, cfg.diameter * 2 ** level, cfg.num_radial_basis,
                               (step, step, step), cfg.normalization)
            blocks.append(block)
            self.irreps_out.append(block.irreps_out)
            irreps_in = block.irreps_out
            m *= 2
        self.down_blocks = torch.nn.ModuleList(blocks)
        self.parity_exact = cfg.parity_exact_pool

    def forward(self, x):
        last = len(self.down_blocks) - 1
        for i, block in enumerate(self.down_blocks):
            x = block(x)
            if i < last:
                x = equivariant_max_pool3d(x, self.irreps_out[i], 2, self.parity_exact)
        return x


class ConvNet(torch.nn.Module):
    def __init__(self, cfg: E3CNNConfig):
        super().__init__()
        irreps_sh = o3.Irreps.spherical_harmonics(cfg.lmax, p=-1)
        self.down = Down(cfg, irreps_sh)
        self.out = EquivariantConv3d(self.down.irreps_out[-1], cfg.output_irreps, irreps_sh, cfg.diameter,
                                     cfg.num_radial_basis)
        out_irreps = o3.Irreps(cfg.output_irreps)
        if out_irreps.count("0e"):
            raise ValueError("scalar outputs are not supported")
        # published checkpoints carry a zero-size scalar bias
        self.bias = torch.nn.Parameter(torch.zeros(0))
        self.pseudo_irreps = o3.Irreps([(mul, ir) for mul, ir in out_irreps if ir.p == 1])
        self.vector_irreps = o3.Irreps([(mul, ir) for mul, ir in out_irreps if ir.p == -1])
        self.parity_exact = cfg.parity_exact_pool

    def pool(self, x):
        n = self.pseudo_irreps.dim
        return torch.cat([global_max_norm_pool(x[:, :n], self.pseudo_irreps, self.parity_exact),
                          global_mean_direction_pool(x[:, n:], self.vector_irreps)], dim=1)

    def forward(self, x, pool=True):
        x = self.out(self.down(x))
        return self.pool(x) if pool else x


class E3CNN(torch.nn.Module):
    """Input [B, 1, X, Y, Z] in [0, 1] -> [B, 9] = (pseudovector, vector a, vector b), components along the array
    axes. ``forward(x, pool=False)`` returns the unpooled map [B, 9, x, y, z] that training supervises."""

    checkpoint_kind = "e3cnn"  # native checkpoint kind (networks.standard_cnn.StandardCNN: "standard_cnn")
    equivariant = True

    def __init__(self, cfg: E3CNNConfig | None = None):
        super().__init__()
        self.config = cfg or E3CNNConfig()
        self.net = ConvNet(self.config)

    def forward(self, x, pool=True):
        out = self.net(x, pool=pool)
        return out.flatten(1) if pool else out

    def set_kernel_cache(self, enabled: bool):
        for m in self.modules():
            if isinstance(m, EquivariantConv3d):
                m.cache_kernel = enabled
                m.clear_cache()

    def learnable_state_dict(self):
        """Only the parameters: everything else (lattices, bases, Wigner-3j tables) derives from the config."""
        return {k: v for k, v in self.state_dict().items() if k in dict(self.named_parameters())}
