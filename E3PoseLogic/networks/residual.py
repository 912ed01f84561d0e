"""The residual network: a small 3D CNN that reads the head in the frame the refinement found and says how far
that frame is off (3DPose-Net's correction idea).

Why a third network: the mirror plane and the 2D reading fix a pose to a few degrees on standard volumes, but on
navigator-like volumes (6 mm voxels, low SNR) the image is not most symmetric about its true mid-sagittal plane,
and the plane fit drifts 5-30 degrees. A residual rotation of tens of degrees is a much easier thing to learn than
all of SO(3), needs no equivariance, and can use the whole head (skull, face, eyes, cerebellum) at once.

Input: a cube of ``size`` voxels, ``fov`` brain radii wide, aligned with the estimated canonical axes and centred on
the estimated brain centre, outside a ball of ``fov / 2`` radii set to 0 (so a turned cube looks like an unturned
one). Output: the rotation vector of the residual and the step to the brain centre (estimated frame), in the units
of ``residual.ROTVEC_UNIT`` and ``residual.CENTRE_UNIT``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import _Serialisable
from .conv3d import Conv3d

@dataclass
class ResidualConfig(_Serialisable):
    size: int = 32  # input cube side in voxels (a multiple of 16)
    fov: float = 3.2  # input cube side in units of the brain's equivalent-sphere radius
    n_feat: int = 8
    # a 7th output: the logit that the frame is near the head's (within tens of degrees), against turned-over ones
    # (a half turn about a canonical axis, or any turn beyond 60 degrees): it ranks the refinement's hypotheses
    pose_logit: bool = False

    # what refine.local_cube reads: the input cube itself
    @property
    def cube_voxels_per_radius(self) -> float:
        return self.size / self.fov

    @property
    def cube_side(self) -> float:
        return self.fov


def _block(c_in, c_out, n_conv=2):
    layers = []
    for k in range(n_conv):
        layers += [Conv3d(c_in if k == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool3d(2))


class ResidualNet(nn.Module):
    """[B, 1, S, S, S] -> [B, 6 or 7]: residual rotation vector and centre step (see ``residual.ROTVEC_UNIT``)
    and, with ``pose_logit``, the logit that the frame is near the head's."""

    def __init__(self, cfg: ResidualConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or ResidualConfig()
        f = cfg.n_feat
        self.features = nn.Sequential(_block(1, f, n_conv=1), _block(f, 2 * f), _block(2 * f, 4 * f),
                                      _block(4 * f, 6 * f))
        side = cfg.size // 16
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * f * side ** 3, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, 7 if cfg.pose_logit else 6))

    def forward(self, x):
        return self.head(self.features(x))

    def for_inference(self) -> "ResidualNet":
        """An evaluation copy with each batch norm folded into the convolution before it (the same outputs to
        float32 rounding): the frame judge's search reads 1,024 cubes, and the norms were a seventh of that time
        (``fold_batchnorm``). The copy cannot be trained; this network is unchanged."""
        import copy

        net = copy.deepcopy(self).eval()
        net.features = fold_batchnorm(net.features)
        return net


def fold_batchnorm(seq: nn.Sequential) -> nn.Sequential:
    """``seq`` (nested Sequentials) with each eval-mode ``BatchNorm3d`` that follows a ``Conv3d`` merged into it:
    w' = w s, b' = (b - mean) s + beta, s = gamma / sqrt(var + eps)."""
    import torch

    mods, out, i = list(seq), [], 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv3d) and isinstance(nxt, nn.BatchNorm3d) and nxt.track_running_stats:
            with torch.no_grad():
                s = nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)
                bias = m.bias if m.bias is not None else torch.zeros_like(nxt.running_mean)
                conv = Conv3d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                              dilation=m.dilation, groups=m.groups, bias=True)
                conv.weight.copy_(m.weight * s.reshape(-1, 1, 1, 1, 1))
                conv.bias.copy_((bias - nxt.running_mean) * s + nxt.bias)
            out.append(conv.eval())
            i += 2
        else:
            out.append(fold_batchnorm(m) if isinstance(m, nn.Sequential) else m)
            i += 1
    return nn.Sequential(*out)
