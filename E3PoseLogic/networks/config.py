"""Architecture configuration: sizes are data, so smaller and faster variants are the same code."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class _Serialisable:
    """Round trip through plain dicts (stored in native checkpoints); unknown keys from newer files are ignored."""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class UNetConfig(_Serialisable):
    in_channels: int = 1
    out_channels: int = 3  # background, brain, eyes
    n_levels: int = 4
    n_feat: int = 16
    feat_mult: int = 2
    n_conv: int = 2
    kernel_size: int = 3
    input_size: int = 128  # U-Net grid side (voxels) ...
    spacing_mm: float = 3.0  # ... at this isotropic spacing


@dataclass
class E3CNNConfig(_Serialisable):
    n_downsample: int = 4  # levels = n_downsample + 1
    mult: int = 2  # irreps multiplicity at level 0 (doubles per level)
    lmax: int = 4  # spherical-harmonics order of the filter basis
    diameter: float = 5.0  # kernel diameter in voxels at level 0 (lattice of 5^3)
    num_radial_basis: int = 5
    input_irreps: str = "1x0e"
    output_irreps: str = "1x1e + 2x1o"  # pseudovector, vector, vector
    normalization: str = "instance"
    crop_size: int = 64  # largest side of the E3-CNN input
    crop_scale: float = 0.6  # brain bounding box fills this fraction of the crop
    # "box": the published crop (brain bounding box, aspect kept); "cube": crop_size^3 about the brain's centre of
    # mass, which turns and mirrors with the head (crop.py). Older checkpoints carry no key and read as "box".
    crop_shape: str = "box"
    # Published pooling max-pools scalar channels by value, which is not mirror-equivariant for 0o scalars.
    # True pools them by absolute value (keeping the sign): exactly O(3)-equivariant. Only for new models.
    parity_exact_pool: bool = False

    def __post_init__(self):
        from ..crop import check_crop_shape

        check_crop_shape(self.crop_shape)
