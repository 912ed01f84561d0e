"""E3Pose: fetal head 6-DoF pose from a 3D MRI volume with the E(3)-Pose method.

Importing this package is cheap: torch, e3nn, vtk and slicer are imported only inside the functions that need
them, so the Slicer module loads fast and light tests stay light.

Conventions (one place, see also README "Conventions"):
- world frame: RAS, millimetres (NIfTI affine as nibabel returns it; Slicer's world);
- volumes cross into the pipeline as a numpy array in (i, j, k) order plus a 4x4 IJK-to-RAS matrix
  (Slicer's ``arrayFromVolume`` gives (k, j, i): transpose it first, see ``frames.kji_to_ijk``);
- ITK transform files are LPS and store the resampling (parent-to-child) direction, see ``frames``.
"""

__version__ = "0.1.0"

from .errors import InputError, E3PoseError  # noqa: F401  (light: no heavy imports)
