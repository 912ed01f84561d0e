"""A standard (not equivariant) 3D CNN rotation regressor: the baseline for the E3-CNN.

In the spirit of 3DPose-Net (Salehi et al., "Real-time deep pose estimation with geodesic loss for image-to-template
rigid registration", IEEE TMI 2019): ``n_downsample + 1`` levels of ``n_conv`` blocks (3^3 convolution + instance or
batch norm + ReLU), ``width * 2**level`` channels, the first convolution of every level after the first with stride 2;
average pooling to a small grid (``pool_size``^3), flattened; a small fully connected head regressing the 6D rotation
representation (Zhou et al., CVPR 2019): two vectors a, b, made orthonormal by Gram-Schmidt.

It plugs into everything that takes the E3-CNN: ``forward(x)`` returns ``[B, 9]`` laid out as the E3-CNN's pooled
output, (p, a, b) with a = e_y, b = e_z (unit, orthogonal) and p = a x b = e_x, components along the array axes, so
``rotation.axes_to_rotation`` and the geodesic training loss work unchanged (det [p|a|b] = +1: p is never flipped).
The config carries the same ``crop_size`` / ``crop_scale`` as ``E3CNNConfig``, which the pipeline reads.

Nothing here is rotation-equivariant: the network only knows the poses it was trained on (augmentation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..crop import check_crop_shape
from .config import _Serialisable
from .conv3d import Conv3d

NORMS = ("instance", "batch")


@dataclass
class StandardCNNConfig(_Serialisable):
    n_downsample: int = 2  # levels = n_downsample + 1, each after the first starts with a stride-2 convolution
    width: int = 6  # channels at level 0 (doubles per level); 6 with 2 down-samplings ~ the bundled E3-CNN's size
    n_conv: int = 2  # convolution blocks per level
    kernel_size: int = 3
    norm: str = "instance"  # "instance" (per sample, as the E3-CNN) or "batch"
    head_hidden: int = 32  # hidden units of the fully connected head (0: as many as the head's inputs)
    # the last feature map is average-pooled to pool_size^3 and flattened: where a feature is says how the head is
    # turned, so a global average (pool_size 0) throws the orientation away (it trained to chance level here)
    pool_size: int = 3
    crop_size: int = 64  # largest side of the input (same meaning and default as E3CNNConfig)
    crop_scale: float = 0.6  # brain bounding box fills this fraction of the crop (same as E3CNNConfig)
    crop_shape: str = "box"  # same meaning and default as E3CNNConfig

    def __post_init__(self):
        check_crop_shape(self.crop_shape)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {self.norm!r}")
        if self.n_downsample < 0 or self.width < 1 or self.n_conv < 1 or self.kernel_size < 1 or \
                self.kernel_size % 2 == 0:
            raise ValueError("n_downsample >= 0, width >= 1, n_conv >= 1 and an odd kernel_size are required")


def _block(c_in, c_out, k, stride, norm):
    norm_layer = torch.nn.InstanceNorm3d(c_out, affine=True) if norm == "instance" else torch.nn.BatchNorm3d(c_out)
    return torch.nn.Sequential(Conv3d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
                               norm_layer, torch.nn.ReLU(inplace=True))


def gram_schmidt_axes(six, eps=1e-8):
    """[B, 6] (a, b raw) -> [B, 9] (p, a, b): a, b orthonormal by Gram-Schmidt, p = a x b (right-handed)."""
    a = torch.nn.functional.normalize(six[:, 0:3], dim=1, eps=eps)
    b = six[:, 3:6]
    b = torch.nn.functional.normalize(b - (a * b).sum(1, keepdim=True) * a, dim=1, eps=eps)
    p = torch.cross(a, b, dim=1)
    return torch.cat([p, a, b], dim=1)


class StandardCNN(torch.nn.Module):
    """Input [B, 1, X, Y, Z] in [0, 1] (any shape: the crop need not be cubic) -> [B, 9] = (p, a, b) as the E3-CNN.

    ``forward(x, pool=False)`` raises: there is no per-voxel output map (pooling comes before the
    head), so the E3-CNN's per-voxel axes loss does not apply; train it with the geodesic loss.
    """

    checkpoint_kind = "standard_cnn"
    equivariant = False

    def __init__(self, cfg: StandardCNNConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or StandardCNNConfig()
        layers, c_in = [], 1
        for level in range(cfg.n_downsample + 1):
            c = cfg.width * 2 ** level
            for i in range(cfg.n_conv):
                stride = 2 if (level > 0 and i == 0) else 1
                layers.append(_block(c_in, c, cfg.kernel_size, stride, cfg.norm))
                c_in = c
        self.features = torch.nn.Sequential(*layers)
        n_in = c_in * cfg.pool_size ** 3 if cfg.pool_size else c_in
        hidden = cfg.head_hidden or n_in
        self.pool = torch.nn.AdaptiveAvgPool3d(cfg.pool_size) if cfg.pool_size else None
        self.head = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(inplace=True),
                                        torch.nn.Linear(hidden, 6))
        with torch.no_grad():  # start near a well-defined pair (a = e_y, b = e_z = identity) rather than at random
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))

    def forward(self, x, pool=True):
        if not pool:
            raise ValueError("StandardCNN has no unpooled output map (forward(x, pool=False)): it regresses one "
                             "rotation per input; use the geodesic loss")
        f = self.features(x)
        f = self.pool(f).flatten(1) if self.pool is not None else f.mean(dim=(2, 3, 4))
        return gram_schmidt_axes(self.head(f).float())

    def set_kernel_cache(self, enabled: bool):
        """No-op (the E3-CNN's interface: plain convolutions have no kernels built from a basis to cache)."""

    def learnable_state_dict(self):
        """Everything (weights and, with batch norm, its running statistics): all of it is learned."""
        return self.state_dict()
