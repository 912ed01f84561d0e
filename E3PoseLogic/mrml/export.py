"""Export the (possibly edited) pose from the scene to files; read transforms back.

Every file is written to a temporary name in the target folder and then renamed (``os.replace``), so a crash
never leaves a half-written file under the final name.

Files for a volume ``V`` (``export_pose``):
- ``V.h5`` and/or ``V.tfm``: the pose transform as Slicer writes it (ITK, LPS, resampling direction); loading it in
  Slicer gives the same node: ToParent = canonical -> world RAS.
- ``V.json``: ``canonical_to_world_ras``, ``world_to_canonical_ras``, ``rotation_ras``, ``translation_ras``,
  ``canonical_to_voxel``, ``ijk_to_ras``, ``edited``, ``estimated_canonical_to_world_ras``, ``provenance``, ...
- ``V.npy``: the published output, canonical -> voxel indices (i, j, k), from the *current* transform.
- ``V_mask.nii.gz`` (labels 1 = brain, 2 = eyes) and/or ``V_mask.seg.nrrd``.
- optional ``V.mrb``: the whole scene.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np

from ..atomic import atomic_path
from ..frames import canonical_to_voxel, rigid_inverse
from . import require_slicer
from .nodes import (
    ATTR_PROVENANCE, ATTR_CONFIDENCE, SEGMENTS, PoseNodes, _jsonable, estimated_matrix, ijk_to_ras, is_edited,
    to_world,
)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(_jsonable(obj), f, indent=2)
            f.write("\n")


def write_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))


# --------------------------------------------------------------------------------------------------- transforms
def _write_with_storage_node(node, storage_class, path, what):
    """Write ``node`` with a temporary Slicer storage node of ``storage_class``, atomically."""
    scene = node.GetScene()
    with atomic_path(path, keep_name=True) as tmp:
        sn = storage_class()
        if scene is not None:
            scene.AddNode(sn)
        try:
            sn.SetFileName(str(tmp))
            if not sn.WriteData(node):
                raise OSError(f"{path}: Slicer could not write the {what}")
        finally:
            if scene is not None:
                scene.RemoveNode(sn)
    return Path(path)


def save_transform(transform_node, path):
    """Write a transform node with Slicer's storage node (.h5, .tfm, .txt, .mat), atomically."""
    return _write_with_storage_node(transform_node, require_slicer().vtkMRMLTransformStorageNode, path, "transform")


def load_transform(scene, path, name=None):
    """Read a transform file into a new linear transform node (ToParent as Slicer defines it)."""
    slicer = require_slicer()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name or Path(path).name.split(".")[0])
    sn = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(sn)
    sn.SetFileName(str(path))
    ok = sn.ReadData(node)
    scene.RemoveNode(sn)
    if not ok:
        scene.RemoveNode(node)
        raise OSError(f"{path}: Slicer could not read this transform")
    return node


# --------------------------------------------------------------------------------------------------- masks
def mask_from_segmentation(segmentation_node, reference_volume) -> np.ndarray:
    """(i, j, k) uint8 label array on the reference volume's grid: 1 = brain, 2 = eyes (by segment name)."""
    slicer = require_slicer()
    import vtk

    from .nodes import array_from_volume

    scene = segmentation_node.GetScene()
    S = segmentation_node.GetSegmentation()
    by_name = {S.GetNthSegment(i).GetName(): S.GetNthSegmentID(i) for i in range(S.GetNumberOfSegments())}
    out = None
    tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__e3pose_export")
    try:
        for seg_name, label, _ in SEGMENTS:
            sid = by_name.get(seg_name)
            if sid is None:
                continue
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, ids, tmp, reference_volume):
                raise RuntimeError(f"could not export segment {seg_name}")
            arr, _ = array_from_volume(tmp)
            if out is None:
                out = np.zeros(arr.shape, np.uint8)
            out[(arr > 0) & (out == 0)] = label
    finally:
        scene.RemoveNode(tmp)
    if out is None:
        arr, _ = array_from_volume(reference_volume)
        out = np.zeros(arr.shape, np.uint8)
    return out


def save_mask_nifti(path, mask_ijk, ijk_to_ras_):
    """Labels (i, j, k) with the volume's affine as NIfTI, atomically (nibabel when present, else Slicer)."""
    try:
        import nibabel as nib
    except ImportError:  # inside Slicer nibabel may be missing: use Slicer's writer
        nib = None
    with atomic_path(path) as tmp:
        if nib is not None:
            img = nib.Nifti1Image(np.asarray(mask_ijk, np.uint8), np.asarray(ijk_to_ras_, float))
            img.set_qform(np.asarray(ijk_to_ras_, float), code=1)
            img.set_sform(np.asarray(ijk_to_ras_, float), code=1)
            nib.save(img, str(tmp))
        else:
            slicer = require_slicer()
            from .nodes import volume_from_array

            scene = slicer.vtkMRMLScene()
            node = volume_from_array(scene, np.asarray(mask_ijk, np.uint8), ijk_to_ras_, "mask", labelmap=True)
            sn = slicer.vtkMRMLVolumeArchetypeStorageNode()
            scene.AddNode(sn)
            sn.SetFileName(str(tmp))
            if not sn.WriteData(node):
                raise OSError(f"{path}: could not write the mask")


def save_segmentation(segmentation_node, path):
    """Write a segmentation (.seg.nrrd keeps segment names and colours), atomically."""
    return _write_with_storage_node(segmentation_node, require_slicer().vtkMRMLSegmentationStorageNode, path,
                                    "segmentation")


# --------------------------------------------------------------------------------------------------- scene
def save_scene_mrb(scene, path):
    """Whole scene as a Slicer data bundle (.mrb), atomically."""
    with atomic_path(path, keep_name=True) as tmp:
        if not scene.WriteToMRB(str(tmp)):
            raise OSError(f"{path}: could not write the scene bundle")


def pose_record(nodes: PoseNodes) -> Dict:
    """The JSON export of the current pose."""
    pose = to_world(nodes.transform)
    grid = ijk_to_ras(nodes.volume)
    est = estimated_matrix(nodes.transform)
    prov = json.loads(nodes.transform.GetAttribute(ATTR_PROVENANCE) or "{}")
    conf = json.loads(nodes.transform.GetAttribute(ATTR_CONFIDENCE) or "{}")
    edited = is_edited(nodes.transform)
    rec = {
        "input": nodes.volume.GetName(),
        "canonical_to_world_ras": pose.tolist(),
        "world_to_canonical_ras": rigid_inverse(pose).tolist(),
        "rotation_ras": pose[:3, :3].tolist(),
        "translation_ras": pose[:3, 3].tolist(),
        "canonical_to_voxel": canonical_to_voxel(pose, grid).tolist(),
        "ijk_to_ras": grid.tolist(),
        "edited": edited,
        "estimated_canonical_to_world_ras": est.tolist() if est is not None else None,
        "confidence": conf,
        "provenance": prov,
        "transform_convention": "ToParent = canonical -> world RAS (Slicer); ITK files store the inverse in LPS",
    }
    for key in ("model", "device", "e3pose_version"):
        if key in prov:
            rec[key] = prov[key]
    return rec


def export_pose(
    nodes: PoseNodes,
    outdir,
    name: Optional[str] = None,
    *,
    transform_formats: Iterable[str] = (".h5", ".tfm"),
    mask_formats: Iterable[str] = (".nii.gz",),
    write_npy_: bool = True,
    mrb: bool = False,
) -> Dict[str, Path]:
    """Write the current pose (edited or not) of one volume; returns {kind: path}."""
    outdir = Path(outdir)
    name = name or nodes.volume.GetName()
    written = {}
    for ext in transform_formats:
        written[f"transform{ext}"] = save_transform(nodes.transform, outdir / f"{name}{ext}")
    rec = pose_record(nodes)
    write_json(outdir / f"{name}.json", rec)
    written["json"] = outdir / f"{name}.json"
    if write_npy_:
        write_npy(outdir / f"{name}.npy", np.asarray(rec["canonical_to_voxel"]))
        written["npy"] = outdir / f"{name}.npy"
    if nodes.segmentation is not None:
        for ext in mask_formats:
            p = outdir / f"{name}_mask{ext}"
            if ext == ".seg.nrrd":
                save_segmentation(nodes.segmentation, p)
            else:
                save_mask_nifti(p, mask_from_segmentation(nodes.segmentation, nodes.volume), ijk_to_ras(nodes.volume))
            written[f"mask{ext}"] = p
    if mrb:
        save_scene_mrb(nodes.transform.GetScene(), outdir / f"{name}.mrb")
        written["mrb"] = outdir / f"{name}.mrb"
    return written
