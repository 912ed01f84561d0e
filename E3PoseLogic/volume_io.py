"""NIfTI in and out, with the checks that turn bad inputs into messages a user can act on.

Volumes cross into the pipeline as ``(array_ijk float32, ijk_to_ras float64 4x4)``: nibabel's array order and
affine (RAS mm), i.e. exactly what Slicer shows for the same file. Every refusal is an ``InputError`` that names
the file and the problem, because upstream either crashes deep inside torchio or silently does something else.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import numpy as np

from . import frames
from .atomic import atomic_path
from .errors import InputError

MIN_DIM = 8  # the U-Net sees the volume at 3 mm; fewer than 8 voxels along an axis is not an image of a head
NIFTI_SUFFIXES = (".nii.gz", ".nii")

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------------- names
def volume_name(path: PathLike) -> str:
    """Basename without ``.nii``/``.nii.gz``; other dots are kept (``sub-01_run.2.nii.gz`` -> ``sub-01_run.2``)."""
    name = Path(path).name
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if "." in name[1:] else name


def is_nifti(path: PathLike) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def find_nifti(folder: PathLike, name: str) -> Optional[Path]:
    """``folder/<name>.nii.gz`` or ``folder/<name>.nii`` (in that order), or None: a mask, label map or image
    paired with a volume by its name."""
    for suffix in NIFTI_SUFFIXES:
        p = Path(folder) / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def iter_inputs(paths: Union[PathLike, Iterable[PathLike]]) -> Iterator[Path]:
    """Files as given; folders expanded to their ``*.nii``/``*.nii.gz`` files (sorted, not recursive, no hidden).

    Hidden files are skipped because they are editor/OS debris and our own in-progress temporary outputs.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.iterdir(), key=lambda q: q.name):
                if f.name.startswith(".") or not f.is_file() or not is_nifti(f):
                    continue
                yield f
        elif p.is_file():
            yield p
        else:
            raise InputError(p, "no such file or folder")


# ---------------------------------------------------------------------------------------------------------- reading
def _open(path: Path):
    """nibabel image with a readable header and its 3D shape; data not read yet."""
    import nibabel as nib

    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InputError(path, f"not a readable NIfTI file ({_reason(e)})") from None
    if not hasattr(img, "affine") or img.affine is None:
        raise InputError(path, "the file has no voxel-to-world matrix")
    shape = tuple(int(s) for s in img.shape)
    _check_scalar(path, img, shape)
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): a 3D volume stored as a one-frame series
        shape = shape[:-1]
    return img, shape


SCALAR_NEEDED = ("E3Pose needs a scalar 3D volume (one intensity per voxel): convert it to a single-channel "
                 "(greyscale) image first")


def _check_scalar(path: Path, img, shape) -> None:
    """Refuse colour (RGB/RGBA) and vector images by name, before their data is read."""
    try:
        dtype = img.get_data_dtype()
    except Exception:
        return
    if dtype.fields:  # NIfTI RGB24 / RGBA32: one record of channels per voxel
        channels = "".join(dtype.names)
        kind = "an RGB colour image" if channels.upper() in ("RGB", "RGBA") else "a multi-channel image"
        raise InputError(path, f"{kind} ({len(dtype.names)} channels {', '.join(dtype.names)} per voxel, shape "
                               f"{shape}); {SCALAR_NEEDED}")
    # NIfTI vectors: dimension 5 holds the components, dimension 4 (time) is 1
    if len(shape) == 5 and shape[3] == 1 and shape[4] > 1:
        raise InputError(path, f"a vector image ({shape[4]} components per voxel, shape {shape}); {SCALAR_NEEDED}")


def _check_shape(path: Path, shape, what: str = "volume") -> None:
    if len(shape) == 4:
        raise InputError(
            path,
            f"a 4D series of {shape[3]} volumes (shape {shape}); E3Pose takes one 3D {what}: "
            "extract the volume you want first (e.g. in 3D Slicer, or nibabel: img.slicer[..., t])",
        )
    if len(shape) != 3:
        raise InputError(path, f"not a 3D {what} (shape {shape})")


def _check_header_voxel_sizes(path: Path, img) -> None:
    """nibabel silently takes abs() of negative / replaces zero pixdim; refuse when those define the geometry."""
    hdr = img.header
    try:
        sform_code = int(hdr["sform_code"])
    except (KeyError, TypeError, ValueError):
        return  # not NIfTI-like: nothing more to check
    if sform_code > 0:
        return  # the sform defines the grid; pixdim is not used
    try:
        from nibabel.openers import ImageOpener

        with ImageOpener(str(path)) as f:
            raw = type(hdr).from_fileobj(f, check=False)
        pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:
        return
    if np.any(pixdim <= 0):
        raise InputError(path, f"voxel size is zero or negative in the header (pixdim {pixdim.tolist()})")


def load_volume(path: PathLike, labels: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as (array (i, j, k) float32, IJK-to-RAS 4x4 float64), refusing inputs we cannot trust.

    The one NIfTI reader of the package (the command line, training, QC and the MRML adapters use it).
    ``labels=True`` reads a label map instead: integer values (int16, or int32 when they do not fit), finite, any
    size, constant allowed (an empty label map is a label map).
    """
    path = Path(path)
    img, shape = _open(path)
    _check_shape(path, shape, what="label map" if labels else "volume")
    if not labels and min(shape) < MIN_DIM:
        raise InputError(path, f"too small: shape {shape}, every dimension needs at least {MIN_DIM} voxels")
    _check_header_voxel_sizes(path, img)
    affine = np.array(img.affine, dtype=np.float64)
    frames.check_grid(affine, path)
    data = _read_data(path, img).reshape(shape)
    if labels:
        if not np.isfinite(data).all():
            raise InputError(path, "the label map holds values that are not finite (NaN or infinity)")
        data = np.rint(data)
        fits = data.size == 0 or (data.min() >= np.iinfo(np.int16).min and data.max() <= np.iinfo(np.int16).max)
        return data.astype(np.int16 if fits else np.int32), affine
    check_values(data, path)
    return data, affine


def check_values(data: np.ndarray, source) -> None:
    """Refuse voxel values the pipeline cannot use: NaN/infinity, or a constant (empty) image."""
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        raise InputError(source, f"{n_bad} of {data.size} voxels are not finite (NaN or infinity)")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError(source, f"the image is empty: every voxel has the value {lo:g}")


def _read_data(path: Path, img) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except MemoryError:
        raise InputError(path, f"not enough memory to read a volume of shape {img.shape}") from None
    except Exception as e:  # truncated gzip (EOFError), short file (OSError), zlib errors, ...
        raise InputError(path, f"the file is truncated or corrupt ({_reason(e)})") from None


def load_mask(path: PathLike, ijk_to_ras_target: np.ndarray, shape_target) -> np.ndarray:
    """Brain mask (uint8 0/1) on the target grid, read from a NIfTI that may lie on another grid.

    Brain = label 1: values > 0.5 when the file holds {0, 1} (or probabilities), == 1 when it holds more labels
    (e.g. upstream's 0 background / 1 brain / 2 eyes). Other grids are mapped nearest-neighbour through world
    coordinates, so a mask drawn on any resampling of the volume lands where it was drawn.
    """
    path = Path(path)
    img, shape = _open(path)
    _check_shape(path, shape, what="mask")
    _check_header_voxel_sizes(path, img)
    affine = np.array(img.affine, dtype=np.float64)
    frames.check_grid(affine, path)
    data = _read_data(path, img).reshape(shape)
    data = np.where(np.isfinite(data), data, 0)
    if data.max(initial=0) > 1.0:
        brain = np.rint(data) == 1
    else:
        brain = data > 0.5
    if not brain.any():
        raise InputError(path, "the mask is empty (no voxel with label 1 = brain)")
    brain = brain.astype(np.uint8)
    shape_target = tuple(int(s) for s in shape_target)
    target = np.asarray(ijk_to_ras_target, dtype=np.float64)
    if shape == shape_target and np.allclose(affine, target, atol=1e-4):
        out = brain
    else:
        from .preprocess import resample_to_grid

        out = resample_to_grid(brain, affine, target, shape_target, order=0).astype(np.uint8)
        if not out.any():
            raise InputError(path, "the mask does not overlap the image (empty after mapping it onto the image grid)")
    return out


# ---------------------------------------------------------------------------------------------------------- writing
def save_volume(path: PathLike, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, dtype=np.float32,
                atomic: bool = True) -> Path:
    """Write a NIfTI (sform and qform both set, scanner frame) atomically (``atomic=False``: in place, for a
    temporary that ``atomic.atomic_paths`` renames; the format then comes from the temporary's suffix)."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: output volumes are written as .nii or .nii.gz")
    affine = np.asarray(ijk_to_ras, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array_ijk).astype(dtype, copy=False), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if not atomic:
        img.to_filename(str(path))
        return path
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return path


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
