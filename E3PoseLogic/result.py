"""The result of one pose estimation, and its matrix forms.

Everything here is numpy; it is what crosses from the pipeline to the command line, the QC renderer and Slicer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np


@dataclass
class PoseResult:
    """Fetal head pose in one volume.

    rotation:      3x3 proper rotation whose columns are the canonical axes e_x (left-right), e_y (posterior to
                   anterior) and e_z (superior to inferior) written in world RAS.
    translation:   brain centre of mass in world RAS mm (the canonical origin).
    brain_mask:    uint8 (i, j, k) array on the input grid (1 = brain).
    eye_mask:      uint8 (i, j, k) array on the input grid (1 = eyes) or None when the mask was given.
    ijk_to_ras:    4x4 of the input grid (the grid of the masks).
    crop:          the E3-CNN input (float32, (i, j, k)) and its placement, for QC.
    confidence:    scalars that flag doubtful results (see ``pipeline``): singular values of the stacked axes,
                   determinant, mask volume in ml, ...
    timings:       seconds per stage.
    rotation_voxel: the rotation in the voxel-axis frame of the input (upstream ``rot_img``), for the published
                   voxel-index output.
    """

    rotation: np.ndarray
    translation: np.ndarray
    brain_mask: Optional[np.ndarray]
    ijk_to_ras: np.ndarray
    eye_mask: Optional[np.ndarray] = None
    rotation_voxel: Optional[np.ndarray] = None
    crop: Optional[np.ndarray] = None
    crop_info: Dict = field(default_factory=dict)
    network_axes: Optional[np.ndarray] = None
    confidence: Dict[str, float] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    provenance: Dict = field(default_factory=dict)
    # the E3-CNN's own pose, before refinement (equal to rotation/translation when the refinement did not run)
    network_rotation: Optional[np.ndarray] = None
    network_translation: Optional[np.ndarray] = None
    network_rotation_voxel: Optional[np.ndarray] = None

    @property
    def canonical_to_world(self) -> np.ndarray:
        """4x4 mapping canonical mm (origin at the brain centre of mass) to world RAS mm."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m

    @property
    def world_to_canonical(self) -> np.ndarray:
        """4x4 mapping world RAS mm to canonical mm (rigid inverse)."""
        m = np.eye(4)
        m[:3, :3] = self.rotation.T
        m[:3, 3] = -self.rotation.T @ self.translation
        return m

    def canonical_to_voxel(self) -> np.ndarray:
        """Published default output: canonical coordinates -> input voxel indices (i, j, k).

        As upstream: rotation = ``rotation_voxel`` (not scaled by the voxel size), translation = the centre of mass as
        a fractional voxel index. For anisotropic voxels the canonical unit is one voxel step, not a millimetre.
        Without ``rotation_voxel`` it is derived from the world rotation (``frames.canonical_to_voxel``).
        """
        from .frames import canonical_to_voxel

        return canonical_to_voxel(self.canonical_to_world, self.ijk_to_ras, self.rotation_voxel)
