"""A 3D convolution that takes oneDNN's path on the CPU for a single volume, in channels-last layout.

Why: PyTorch picks the CPU backend of a float32 convolution by a rule tuned for 2D images. With one volume in the
batch and a 3x3x3 kernel it goes to oneDNN only when batch x channels x depth x height exceeds 20,480, and otherwise
to a generic im2col loop. Most of the U-Net's layers fall below that (16 channels at 32^3: 1 x 16 x 32 x 32 =
16,384) and ran 7-15x slower than oneDNN does the same sum (2-core AMD EPYC: 44 ms against 3 ms for one 16 -> 16
convolution at 32^3). Channels-last is oneDNN's own layout, and trilinear upsampling of channels-last tensors is 3x
faster too; the U-Net's forward pass went from 0.30 to 0.10 s there (``e3pose benchmark``, README "Speed").

Only where it is the same computation: evaluation without autograd (training batches are larger, where PyTorch
already uses oneDNN), float32 on the CPU, zero padding, no autocast. The values differ from the generic loop's by
float32 rounding only (summation order).
"""
from __future__ import annotations

import torch
from torch import nn


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def onednn_applies(x, weight) -> bool:
    """Whether ``Conv3d`` sends this call to oneDNN directly (see the module's docstring)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 5
            and not torch.is_grad_enabled() and not x.is_mkldnn
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and not _autocast_on())


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) whose evaluation on the CPU runs in oneDNN, channels-last."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and onednn_applies(input, weight):
            # a channels-last weight makes oneDNN return channels-last, whatever the input's layout (a one-channel
            # input is both layouts at once; without it the whole network would run in the slower one)
            return torch.mkldnn_convolution(input, weight.contiguous(memory_format=torch.channels_last_3d), bias,
                                            list(self.padding), list(self.stride), list(self.dilation), self.groups)
        return super()._conv_forward(input, weight, bias)
