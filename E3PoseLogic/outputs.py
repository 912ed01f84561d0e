"""Writing one pose result to disk: the published .npy, a JSON record, the mask and an ITK transform.

Every file is written atomically (``atomic``), so an interrupted batch never leaves a half-written result.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import frames
from .atomic import save_json, save_npy
from .volume_io import save_volume

NPY_MODES = ("voxel", "scanner")


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
        "mask_source": prov.get("mask_source"),
        "model": {"unet": prov.get("unet"), "e3cnn": prov.get("e3cnn"), "trained": prov.get("trained")},
        "device": prov.get("device"),
        "e3pose_version": prov.get("e3pose_version"),
        "conventions": {
            "world": "RAS mm",
            "canonical": "x left-right (pseudovector, right-handed), y posterior->anterior, z superior->inferior, "
                         "origin brain centre of mass",
            "tfm": "Slicer loads it as a transform whose ToParent maps canonical -> world RAS",
        },
    }


def write_outputs(outdir, name, result, input_path=None, scanner_space=False, input_to_canonical=False):
    """Write ``<name>.npy``, ``<name>.json``, ``<name>_mask.nii.gz``, ``<name>.tfm``; return the paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "npy": outdir / f"{name}.npy",
        "json": outdir / f"{name}.json",
        "mask": outdir / f"{name}_mask.nii.gz",
        "tfm": outdir / f"{name}.tfm",
    }
    # an earlier run's JSON would vouch for a set that is about to be replaced file by file: remove it first, so an
    # interruption below leaves no JSON (= incomplete set) rather than an old JSON beside new files
    paths["json"].unlink(missing_ok=True)
    save_volume(paths["mask"], label_map(result), result.ijk_to_ras, dtype=np.uint8)
    frames.write_itk_transform(paths["tfm"], result.canonical_to_world)
    save_npy(paths["npy"], published_matrix(result, scanner_space, input_to_canonical))
    record = result_record(result, input_path)
    record["npy"] = {"file": paths["npy"].name,
                     "maps": ("world RAS mm" if scanner_space else "input voxel indices") + " -> canonical"
                     if input_to_canonical else "canonical -> " + ("world RAS mm" if scanner_space
                                                                   else "input voxel indices (i, j, k)")}
    save_json(paths["json"], record)  # last: its presence says the set is complete
    return paths
