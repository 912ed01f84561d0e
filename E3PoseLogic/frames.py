"""Frame conventions: the one place that knows about RAS vs LPS, (i, j, k) vs (k, j, i) and ITK transform files.

World = RAS millimetres (nibabel's affine = Slicer's IJKToRAS). ITK / SimpleITK images and transform files are LPS;
the two differ by ``LPS_FROM_RAS = diag(-1, -1, 1, 1)`` (its own inverse). Every other module converts through
the functions here, so a sign or transpose error can only live in one file.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .errors import InputError
from .rotation import nearest_rotation

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_FROM_RAS.setflags(write=False)
RAS_FROM_LPS = LPS_FROM_RAS  # the flip is its own inverse; the second name says which way a product reads

# |cos| between two voxel axes above which a grid counts as sheared. NIfTI stores the sform as float32, so a truly
# orthogonal grid shows |cos| ~ 1e-7; 1e-4 (0.006 degrees) leaves three decades of margin either way.
SHEAR_TOLERANCE = 1e-4

# Suffixes SimpleITK writes as ITK transform files (text, HDF5, MATLAB).
ITK_TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")


# ---------------------------------------------------------------------------------------------------------- arrays
def kji_to_ijk(a: np.ndarray) -> np.ndarray:
    """Slicer ``arrayFromVolume`` order (k, j, i[, c]) -> ours (i, j, k[, c]). A view: copy before editing."""
    a = np.asarray(a)
    if a.ndim not in (3, 4):
        raise ValueError(f"expected a 3D volume array (optionally with a trailing component axis), got {a.shape}")
    return a.transpose((2, 1, 0) + tuple(range(3, a.ndim)))


def ijk_to_kji(a: np.ndarray) -> np.ndarray:
    """Ours (i, j, k[, c]) -> Slicer (k, j, i[, c]), for ``updateVolumeFromArray``. A view."""
    return kji_to_ijk(a)  # the axis swap is an involution


# ---------------------------------------------------------------------------------------------------------- grids
def voxel_sizes(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel size per array axis in mm (column norms of the 3x3 block)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    return np.sqrt(np.sum(m[:3, :3] ** 2, axis=0))


def direction_cosines(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Unit world directions of the array axes (columns); det is -1 for mirrored storage.

    Not re-orthogonalised, exactly upstream ``get_rot_from_aff``, so poses agree with the published tool.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    return m[:3, :3] / voxel_sizes(m)


def shear_error(ijk_to_ras: np.ndarray) -> float:
    """Largest |cos(angle)| between two voxel axes: 0 for an orthogonal grid."""
    d = direction_cosines(ijk_to_ras)
    g = d.T @ d
    return float(np.max(np.abs(g[np.triu_indices(3, 1)])))


def check_grid(ijk_to_ras: np.ndarray, source=None) -> None:
    """Refuse grids the pipeline cannot represent: non-finite, zero-size voxels, or sheared axes.

    Slicer/ITK silently replace a sheared sform by the qform; we name the problem instead.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(source, f"the voxel-to-world matrix is not a finite 4x4 matrix: {m.tolist()}")
    sizes = voxel_sizes(m)
    if np.any(sizes <= 0):
        raise InputError(source, f"voxel size is zero along an axis (voxel sizes {np.round(sizes, 6).tolist()} mm)")
    check_not_sheared(m, source)


def check_not_sheared(ijk_to_ras: np.ndarray, source=None, tolerance: float = SHEAR_TOLERANCE) -> None:
    """Raise ``InputError`` when the voxel axes are not orthogonal (a sheared affine)."""
    err = shear_error(ijk_to_ras)
    if not err <= tolerance:
        angle = np.degrees(np.arcsin(min(1.0, err)))
        raise InputError(
            source,
            f"the voxel axes are not orthogonal (sheared affine: axes {angle:.3f} degrees off perpendicular, "
            f"|cos| {err:.2e} > {tolerance:g}); resample the image onto an orthogonal grid first "
            "(3D Slicer would silently use the NIfTI qform instead)",
        )


# ---------------------------------------------------------------------------------------------------------- matrices
def rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 [R | t] as [R^T | -R^T t] (exact orthogonality kept, unlike ``inv``)."""
    m = np.asarray(m, dtype=np.float64)
    r = m[:3, :3]
    if m.shape != (4, 4) or not np.allclose(r.T @ r, np.eye(3), atol=1e-6) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError("rigid_inverse needs a rigid 4x4 matrix [R | t] with R orthogonal")
    out = np.eye(4)
    out[:3, :3] = r.T
    out[:3, 3] = -r.T @ m[:3, 3]
    return out


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (..., 3)."""
    m = np.asarray(m, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:3, :3].T + m[:3, 3]


def canonical_to_voxel(canonical_to_world: np.ndarray, ijk_to_ras: np.ndarray, rotation_voxel=None) -> np.ndarray:
    """The published default output: canonical coordinates -> input voxel indices (i, j, k).

    As upstream: rotation = the rotation in the voxel-axis frame (``rot_img``, not scaled by the voxel size),
    translation = the canonical origin as a fractional voxel index; for anisotropic voxels the canonical unit is one
    voxel step, not a millimetre. ``rotation_voxel`` is used as given when known (the pipeline's, exactly as
    upstream); otherwise it is derived from the world rotation: with D the direction cosines of the grid,
    R_world = D @ R_vox @ diag(det D, 1, 1), so R_vox = D.T @ R_world @ diag(det D, 1, 1) (see CONTRACTS.md).
    """
    pose = np.asarray(canonical_to_world, dtype=np.float64)
    g = np.asarray(ijk_to_ras, dtype=np.float64)
    if rotation_voxel is None:
        d = direction_cosines(g)
        r = nearest_rotation(pose[:3, :3])  # an edited matrix may carry round-off
        rotation_voxel = d.T @ r @ np.diag([np.sign(np.linalg.det(d)), 1.0, 1.0])
    out = np.eye(4)
    out[:3, :3] = rotation_voxel
    out[:3, 3] = (np.linalg.inv(g) @ np.append(pose[:3, 3], 1.0))[:3]
    return out


# ---------------------------------------------------------------------------------------------------------- SimpleITK
def sitk_geometry(ijk_to_ras: np.ndarray):
    """(origin, spacing, direction) of a SimpleITK image on this grid, in ITK's LPS, as torchio derives them.

    The direction is the column-normalised 3x3 (not re-orthogonalised), so the arithmetic matches torchio's bit for bit.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = voxel_sizes(m)
    flip = LPS_FROM_RAS[:3, :3]
    direction = flip @ (m[:3, :3] / spacing)
    origin = flip @ m[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def ijk_to_ras_from_sitk(image) -> np.ndarray:
    """IJKToRAS of a SimpleITK image (SimpleITK index order is (i, j, k); its frame is LPS)."""
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(image.GetSpacing(), dtype=np.float64)
    m[:3, 3] = image.GetOrigin()
    return RAS_FROM_LPS @ m


# ---------------------------------------------------------------------------------------------------------- ITK files
def write_itk_transform(path, to_parent_ras: np.ndarray, atomic: bool = True) -> Path:
    """Write a linear transform file (.tfm/.txt/.h5/.mat) that 3D Slicer loads with ToParent == ``to_parent_ras``.

    ITK files hold the resampling direction (FromParent) in LPS, so the stored affine is F @ inv(T) @ F with
    F = LPS_FROM_RAS. Written atomically (a reader never sees half a file) unless ``atomic=False`` (for a
    temporary that ``atomic.atomic_paths`` renames). Any file name works, also one that is not valid UTF-8.
    """
    import SimpleITK as sitk

    from .atomic import atomic_path, native_path

    path = Path(path)
    t = np.asarray(to_parent_ras, dtype=np.float64)
    if t.shape != (4, 4) or not np.all(np.isfinite(t)) or not np.allclose(t[3], [0, 0, 0, 1]):
        raise ValueError(f"to_parent_ras must be a finite affine 4x4 matrix, got {t!r}")
    _check_transform_suffix(path)
    from_parent_lps = LPS_FROM_RAS @ np.linalg.inv(t) @ LPS_FROM_RAS
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(from_parent_lps[:3, :3].ravel().tolist())
    tx.SetTranslation(from_parent_lps[:3, 3].tolist())
    tx.SetCenter((0.0, 0.0, 0.0))
    with atomic_path(path) if atomic else contextlib.nullcontext(path) as tmp:
        with native_path(tmp) as native:
            sitk.WriteTransform(tx, native)
    return path


def read_itk_transform(path) -> np.ndarray:
    """Read a linear ITK transform file as Slicer would: returns its ToParent in RAS (inverse of write).

    Any linear ITK type (affine, Euler, versor, composite of linear ones) is accepted: the affine is recovered by
    mapping points, which also sidesteps per-type parameter layouts and the centre of rotation.
    """
    import SimpleITK as sitk

    from .atomic import native_path

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "transform file not found")
    try:
        with native_path(path, write=False) as native:
            tx = sitk.ReadTransform(native)
    except RuntimeError as e:
        raise InputError(path, f"not a readable ITK transform file ({_first_line(e)})") from None
    probe = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [17.0, -31.0, 53.0], [-211.0, 97.0, -13.0]])
    try:
        mapped = np.array([tx.TransformPoint(p.tolist()) for p in probe], dtype=np.float64)
    except RuntimeError as e:
        raise InputError(path, f"the transform cannot be evaluated ({_first_line(e)})") from None
    f_lps = np.eye(4)
    f_lps[:3, 3] = mapped[0]
    f_lps[:3, :3] = (mapped[1:4] - mapped[0]).T
    scale = 1.0 + np.abs(probe).max() * max(1.0, np.abs(f_lps[:3, :3]).max())
    if np.abs(apply(f_lps, probe[4:]) - mapped[4:]).max() > 1e-9 * scale:
        raise InputError(path, f"{tx.GetName()} is not a linear transform; only linear (affine) transforms are used")
    if abs(np.linalg.det(f_lps[:3, :3])) < 1e-12:
        raise InputError(path, "the transform is singular (determinant 0)")
    return np.linalg.inv(RAS_FROM_LPS @ f_lps @ RAS_FROM_LPS)


def _check_transform_suffix(path: Path) -> None:
    if path.suffix.lower() not in ITK_TRANSFORM_SUFFIXES:
        raise ValueError(f"{path}: unsupported transform file type; use one of {', '.join(ITK_TRANSFORM_SUFFIXES)}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
