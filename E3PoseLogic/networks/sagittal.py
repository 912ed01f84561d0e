"""The refinement network: a small 2D CNN that reads the head's mid-sagittal plane.

Once the mirror-symmetry plane of the head is known (``refine.symmetry_plane``), the rotation left to find is the
angle of the head within that plane and which side faces us. The network sees three slabs parallel to the plane
(the plane itself and the means of the slabs at +-d on both sides, so left and right never matter) and predicts the
canonical e_y and e_z as two 2D vectors in the slab, and where the brain centre lies in the slab (the U-Net's centre
of mass is a few millimetres off). Like the E3-CNN's pseudovector rule, nothing asks it to tell
the two faces of the plane apart: if the predicted pair is left-handed in the slab, the head is seen from its other
side, and e_x = e_y x e_z settles the sign.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import _Serialisable


@dataclass
class SagittalConfig(_Serialisable):
    size: int = 48  # slab side in pixels (a multiple of 16)
    fov: float = 3.4  # slab side in units of the brain's equivalent-sphere radius
    offsets: tuple = (0.0, 0.3, 0.6)  # slab distances from the plane, same unit (channels)
    n_feat: int = 12
    cube_voxels_per_radius: float = 20.0  # local cube spacing = radius / this
    cube_side: float = 3.6  # local cube side in radii
    # a 7th output: the logit that the slabs are parallel to the mid-sagittal plane. The mirror score alone cannot
    # tell the mid-sagittal plane from a coronal one in a head that is nearly as symmetric front-to-back; the
    # anatomy seen in the slab can (one hemisphere's medial face, brainstem and vermis against two hemispheres)
    plane_logit: bool = False


def _block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class SagittalNet(nn.Module):
    """[B, C, S, S] slabs -> [B, 6 or 7]: e_y, e_z (2D vectors in slab coordinates, not normalised), the brain
    centre's offset from the slab centre (slab coordinates, in units of the equivalent radius) and, with
    ``plane_logit``, the logit that the slabs lie along the mid-sagittal plane."""

    def __init__(self, cfg: SagittalConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or SagittalConfig()
        f = cfg.n_feat
        self.features = nn.Sequential(_block(len(cfg.offsets), f), _block(f, 2 * f), _block(2 * f, 4 * f),
                                      _block(4 * f, 4 * f))
        side = cfg.size // 16
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * f * side * side, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, 7 if cfg.plane_logit else 6))

    def forward(self, x):
        return self.head(self.features(x))


def load_state(model: SagittalNet, state) -> SagittalNet:
    model.load_state_dict(state, strict=True)
    return model.eval()

