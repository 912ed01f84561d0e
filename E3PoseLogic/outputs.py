"""Writing one pose result to disk: the published .npy, a JSON record, the mask and an ITK transform.

The four files of one input are written as a set (``atomic.atomic_paths``): all go to temporaries first and replace
an earlier set only once every one is complete, so an interrupted or failed run never leaves a half-written file,
a mix of two runs, or an earlier result damaged. Before a batch: ``prepare_output_folder`` (can we write there at
all?) and ``name_clashes`` (would two inputs write the same files?).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import frames
from .atomic import atomic_paths, deferred_interrupts, save_json, save_npy
from .errors import E3PoseError
from .volume_io import save_volume, volume_name

NPY_MODES = ("voxel", "scanner")
SUFFIXES = {"mask": "_mask.nii.gz", "tfm": ".tfm", "npy": ".npy", "json": ".json"}  # write order: JSON last


def published_matrix(result, scanner_space=False, input_to_canonical=False):
    """The published ``.npy``: canonical -> input voxel indices (default) or canonical mm -> world RAS mm
    (``scanner_space``); ``input_to_canonical`` inverts it. Unlike upstream, the world form is always a proper
    rotation, mirrored voxel storage included."""
    m = result.canonical_to_world if scanner_space else result.canonical_to_voxel()
    return np.linalg.inv(m) if input_to_canonical else m


def label_map(result):
    """uint8 labels on the input grid: 1 brain, 2 eyes (where not brain)."""
    labels = np.asarray(result.brain_mask, dtype=np.uint8).copy()
    if result.eye_mask is not None:
        labels[(result.eye_mask > 0) & (labels == 0)] = 2
    return labels


def result_record(result, input_path=None):
    """The JSON record (schema in README "Outputs")."""
    prov = result.provenance
    return {
        "input": str(input_path) if input_path else None,
        "canonical_to_world_ras": result.canonical_to_world,
        "world_to_canonical_ras": result.world_to_canonical,
        "rotation_ras": result.rotation,
        "translation_ras": result.translation,
        "rotation_voxel": result.rotation_voxel,
        "canonical_to_voxel": result.canonical_to_voxel(),
        "ijk_to_ras": result.ijk_to_ras,
        "confidence": result.confidence,
        "timings_s": result.timings,
        "crop": result.crop_info,
        "network_axes_pab": result.network_axes,
        # the E3-CNN's pose before refinement (confidence.refinement says what the refinement did)
        "network_rotation_ras": result.network_rotation,
        "network_translation_ras": result.network_translation,
        "network_rotation_voxel": result.network_rotation_voxel,
        "mask_source": prov.get("mask_source"),
        "model": {"unet": prov.get("unet"), "e3cnn": prov.get("e3cnn"), "refiner": prov.get("refiner"),
                  "residual": prov.get("residual"),
                  "judge": prov.get("judge"),
                  "trained": prov.get("trained")},
        "device": prov.get("device"),
        "e3pose_version": prov.get("e3pose_version"),
        "conventions": {
            "world": "RAS mm",
            "canonical": "x left-right (pseudovector, right-handed), y posterior->anterior, z superior->inferior, "
                         "origin brain centre of mass",
            "tfm": "Slicer loads it as a transform whose ToParent maps canonical -> world RAS",
        },
    }


def output_paths(outdir, name):
    """{kind: path} of the files ``write_outputs`` writes for ``name``."""
    return {kind: Path(outdir) / f"{name}{suffix}" for kind, suffix in SUFFIXES.items()}


def write_outputs(outdir, name, result, input_path=None, scanner_space=False, input_to_canonical=False):
    """Write ``<name>.npy``, ``<name>.json``, ``<name>_mask.nii.gz``, ``<name>.tfm`` as one set; return the paths.

    Nothing replaces an earlier set until all four new files are complete; the JSON (whose presence says the set is
    complete) is renamed last, and SIGINT/SIGTERM wait until the four renames are done.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(outdir, name)
    record = result_record(result, input_path)
    record["npy"] = {"file": paths["npy"].name,
                     "maps": ("world RAS mm" if scanner_space else "input voxel indices") + " -> canonical"
                     if input_to_canonical else "canonical -> " + ("world RAS mm" if scanner_space
                                                                   else "input voxel indices (i, j, k)")}
    with atomic_paths(paths.values()) as temporaries:
        tmp = dict(zip(paths, temporaries))
        save_volume(tmp["mask"], label_map(result), result.ijk_to_ras, dtype=np.uint8, atomic=False)
        frames.write_itk_transform(tmp["tfm"], result.canonical_to_world, atomic=False)
        save_npy(tmp["npy"], published_matrix(result, scanner_space, input_to_canonical), atomic=False)
        save_json(tmp["json"], record, atomic=False)
    return paths


# ---------------------------------------------------------------------------------------------------------- batch checks
CASE_INSENSITIVE = sys.platform in ("darwin", "win32")  # default file systems there fold case


def name_clashes(inputs):
    """Inputs whose outputs would land on the same files: {output name: [inputs]} (only names with 2 or more).

    Outputs are named after the input file without ``.nii``/``.nii.gz``, so ``a/scan.nii.gz`` and ``b/scan.nii.gz``
    (or ``scan.nii`` beside ``scan.nii.gz``) would overwrite each other. The same file given twice is not a clash.
    """
    by_name = {}
    for path in inputs:
        name = volume_name(path)
        key = name.casefold() if CASE_INSENSITIVE else name
        group = by_name.setdefault(key, [])
        if not any(_same_file(path, other) for other in group):
            group.append(path)
    return {volume_name(group[0]): group for group in by_name.values() if len(group) > 1}


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def prepare_output_folder(outdir):
    """Create ``outdir`` if needed and make sure files can be written there; raise ``E3PoseError`` otherwise.

    Returns the folders it created (deepest last), so a run that writes nothing can remove them again.
    """
    outdir = Path(outdir)
    missing = []
    p = outdir
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if outdir.exists() and not outdir.is_dir():
        raise E3PoseError(f"{outdir}: the output folder is a file, not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise E3PoseError(f"{outdir}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        with deferred_interrupts():  # a Ctrl-C here must not leave the probe behind
            fd, probe = tempfile.mkstemp(prefix=".e3pose-probe-", dir=outdir)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        remove_empty_folders(list(reversed(missing)))
        raise E3PoseError(f"{outdir}: cannot write in the output folder ({exc.strerror or exc})") from None
    return list(reversed(missing))


def remove_empty_folders(folders):
    """Remove the given folders (deepest first) where they are empty."""
    for folder in reversed(list(folders)):
        try:
            Path(folder).rmdir()
        except OSError:
            pass
