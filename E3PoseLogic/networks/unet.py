"""The segmentation U-Net of E(3)-Pose (background, brain, eyes), laid out as the published checkpoints."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .config import UNetConfig
from .conv3d import Conv3d


def _block(c_in, c_out, n_conv, k):
    layers = []
    for i in range(n_conv):
        layers += [Conv3d(c_in if i == 0 else c_out, c_out, k, padding=k // 2), nn.ELU()]
    layers.append(nn.BatchNorm3d(c_out))  # once per block, after the convolutions (published layout)
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Plain 3D U-Net: max-pool down, trilinear up, skip features concatenated before the upsampled ones."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or UNetConfig()
        feats = [cfg.n_feat * cfg.feat_mult ** i for i in range(cfg.n_levels)]
        self.list_encoder_blocks = nn.ModuleList(
            _block(cfg.in_channels if i == 0 else feats[i - 1], feats[i], cfg.n_conv, cfg.kernel_size)
            for i in range(cfg.n_levels))
        self.list_decoder_blocks = nn.ModuleList(
            _block(feats[i] + feats[i + 1], feats[i], cfg.n_conv, cfg.kernel_size)
            for i in reversed(range(cfg.n_levels - 1)))  # index 0 = deepest
        self.last_conv = Conv3d(feats[0], cfg.out_channels, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.list_encoder_blocks):
            if i > 0:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.list_decoder_blocks, reversed(skips[:-1])):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.last_conv(x)  # logits
