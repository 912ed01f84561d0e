"""E3Pose results as MRML nodes (scene passed in; works in Slicer and under slicer-core).

Nodes written by :func:`write_pose` for a volume named ``V``:

- ``"V pose"`` (vtkMRMLLinearTransformNode): ToParent = canonical -> world RAS (``PoseResult.canonical_to_world``).
  Its display node shows interaction handles for rotation and translation only (no scaling), centred on the
  canonical origin (the brain centre of mass). Node attributes: ``E3Pose.EstimatedToParent`` (16 numbers, the
  matrix the network gave), ``E3Pose.Edited`` ("1" once the user changed the transform), ``E3Pose.Provenance``
  (JSON), ``E3Pose.Volume`` (the input volume node ID).
- ``"V mask"`` (vtkMRMLSegmentationNode): segments "brain" and "eyes" on the input grid (reference geometry =
  the input volume).
- ``"V axis x|y|z"`` (vtkMRMLMarkupsLineNode, locked): the canonical axes in canonical coordinates under the pose
  transform (x red, left-right; y green, posterior -> anterior; z blue, superior -> inferior), ``axis_length`` mm.
- ``"V canonical"`` (only while "reorient" is on): a transform node kept equal to the inverse of the pose; the
  volume (and the mask) sit under it, so in the views the head appears in canonical coordinates and hardening
  puts the voxels there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..frames import rigid_inverse
from . import require_slicer

ATTR_PREFIX = "E3Pose."
ATTR_ESTIMATED = ATTR_PREFIX + "EstimatedToParent"
ATTR_EDITED = ATTR_PREFIX + "Edited"
ATTR_PROVENANCE = ATTR_PREFIX + "Provenance"
ATTR_VOLUME = ATTR_PREFIX + "Volume"
ATTR_ROLE = ATTR_PREFIX + "Role"
ATTR_SEGMENTATION = ATTR_PREFIX + "Segmentation"
ATTR_AXES = ATTR_PREFIX + "Axes"
ATTR_REORIENT = ATTR_PREFIX + "ReorientTransform"
ATTR_CONFIDENCE = ATTR_PREFIX + "Confidence"

AXES = (
    # name, colour, label at the tip
    ("x", (0.95, 0.15, 0.15), "x (L-R)"),
    ("y", (0.15, 0.85, 0.15), "y (A)"),
    ("z", (0.2, 0.45, 1.0), "z (I)"),
)
SEGMENTS = (
    # name, label value in exported masks, colour
    ("brain", 1, (0.95, 0.72, 0.25)),
    ("eyes", 2, (0.2, 0.85, 0.95)),
)
EDIT_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------------- matrices
def vtk_matrix(a):
    import vtk

    m = vtk.vtkMatrix4x4()
    a = np.asarray(a, dtype=float)
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def np_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def to_parent(transform_node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToParent(m)
    return np_matrix(m)


def to_world(transform_node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(m)
    return np_matrix(m)


def set_to_parent(transform_node, a):
    transform_node.SetMatrixTransformToParent(vtk_matrix(a))


def _matrix_attr(a) -> str:
    return " ".join(repr(float(x)) for x in np.asarray(a, dtype=float).ravel())


def _parse_matrix_attr(text) -> Optional[np.ndarray]:
    if not text:
        return None
    v = np.array([float(x) for x in text.split()])
    return v.reshape(4, 4) if v.size == 16 else None


# --------------------------------------------------------------------------------------------------- volumes
def volume_from_array(scene, array_ijk, ijk_to_ras, name="volume", labelmap=False):
    """New scalar (or labelmap) volume node from an (i, j, k) array and its 4x4 IJK-to-RAS matrix."""
    require_slicer()
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    update_volume(node, array_ijk, ijk_to_ras)
    node.CreateDefaultDisplayNodes()
    return node


def update_volume(node, array_ijk, ijk_to_ras=None):
    slicer = require_slicer()
    from ..frames import ijk_to_kji

    arr = np.ascontiguousarray(ijk_to_kji(np.asarray(array_ijk)))  # Slicer's arrays are (k, j, i)
    slicer.util.updateVolumeFromArray(node, arr)
    if ijk_to_ras is not None:
        node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))


def array_from_volume(node):
    """(array_ijk copy, ijk_to_ras 4x4) of a volume node: what the pipeline takes. Ignores parent transforms."""
    import vtk

    slicer = require_slicer()
    from ..frames import kji_to_ijk

    arr = np.array(kji_to_ijk(slicer.util.arrayFromVolume(node)))  # a copy, not a view on VTK memory
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return arr, np_matrix(m)


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np_matrix(m)


def load_volume(scene, path, name=None, labelmap=False):
    """Read a NIfTI file into a new volume (or labelmap) node with ``volume_io.load_volume``: the checks, array and
    IJK-to-RAS of ``e3pose infer``, so voxel indices match the command line's (mirrored files included)."""
    require_slicer()
    from ..volume_io import load_volume as read_volume, volume_name

    array, affine = read_volume(path, labels=labelmap)
    return volume_from_array(scene, array, affine, name or volume_name(path), labelmap=labelmap)


# --------------------------------------------------------------------------------------------------- pose nodes
@dataclass
class PoseNodes:
    """The nodes that show one pose (IDs are what survives a scene save/reload; use :func:`find_pose_nodes`)."""

    volume: object
    transform: object
    segmentation: Optional[object]
    axes: List[object] = field(default_factory=list)

    @property
    def scene(self):
        return self.transform.GetScene()


def _get_or_add(scene, cls, name, existing_id=None):
    node = scene.GetNodeByID(existing_id) if existing_id else None
    if node is None or not node.IsA(cls):
        node = scene.AddNewNodeByClass(cls, name)
    return node


def write_pose(
    scene,
    volume_node,
    result,
    *,
    transform_node=None,
    segmentation_node=None,
    axis_length: float = 40.0,
    show_handles: bool = False,
    show_axes: bool = True,
    write_segmentation: bool = True,
):
    """Put a :class:`~E3PoseLogic.result.PoseResult` into the scene next to ``volume_node``; returns PoseNodes.

    Re-running on the same volume reuses (and updates) the nodes it made before (found through node attributes),
    or the ``transform_node``/``segmentation_node`` given. The edited flag is reset: this is a fresh estimate.
    """
    require_slicer()
    import vtk

    name = volume_node.GetName()
    vid = volume_node.GetID()
    previous = find_pose_nodes(scene, volume_node)
    if transform_node is None and previous is not None:
        transform_node = previous.transform
    if transform_node is None:
        transform_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{name} pose")
    pose = np.asarray(result.canonical_to_world, dtype=float)
    transform_node.SetAttribute(ATTR_ROLE, "pose")
    transform_node.SetAttribute(ATTR_VOLUME, vid)
    transform_node.SetAttribute(ATTR_ESTIMATED, _matrix_attr(pose))
    transform_node.SetAttribute(ATTR_EDITED, "0")
    transform_node.SetAttribute(ATTR_PROVENANCE, json.dumps(_jsonable(getattr(result, "provenance", {}) or {})))
    transform_node.SetAttribute(ATTR_CONFIDENCE, json.dumps(_jsonable(getattr(result, "confidence", {}) or {})))
    set_to_parent(transform_node, pose)
    transform_node.SetCenterOfTransformation(0.0, 0.0, 0.0)  # local (canonical) coordinates: the head centre
    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    dn = transform_node.GetDisplayNode()
    dn.SetEditorRotationEnabled(True)
    dn.SetEditorTranslationEnabled(True)
    dn.SetEditorScalingEnabled(False)
    if hasattr(dn, "SetEditorScalingSliceEnabled"):
        dn.SetEditorScalingSliceEnabled(False)
    set_handles_visible(transform_node, show_handles)

    # axes under the transform, in canonical coordinates
    axes = previous.axes if previous is not None and len(previous.axes) == 3 else []
    if not axes:
        for axis, colour, label in AXES:
            line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", f"{name} axis {axis}")
            line.SetAttribute(ATTR_ROLE, f"axis_{axis}")
            axes.append(line)
    for k, ((axis, colour, label), line) in enumerate(zip(AXES, axes)):
        line.RemoveAllControlPoints()
        tip = np.zeros(3)
        tip[k] = axis_length
        line.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), " ")  # an empty label would show "<name>-1"
        line.AddControlPoint(vtk.vtkVector3d(*tip), label)
        line.SetLocked(True)
        line.SetAndObserveTransformNodeID(transform_node.GetID())
        if line.GetDisplayNode() is None:
            line.CreateDefaultDisplayNodes()
        ld = line.GetDisplayNode()
        ld.SetSelectedColor(*colour)
        ld.SetColor(*colour)
        ld.SetPropertiesLabelVisibility(False)
        ld.SetPointLabelsVisibility(True)
        if hasattr(ld, "SetCurveLineSizeMode"):
            ld.SetCurveLineSizeMode(ld.UseLineDiameter)
            ld.SetLineDiameter(1.5)
        ld.SetGlyphScale(2.0)
        ld.SetTextScale(3.0)
        ld.SetVisibility(bool(show_axes))
    transform_node.SetAttribute(ATTR_AXES, " ".join(a.GetID() for a in axes))

    seg = None
    if write_segmentation and getattr(result, "brain_mask", None) is not None:
        if segmentation_node is None and previous is not None:
            segmentation_node = previous.segmentation
        seg = write_segmentation_node(scene, volume_node, result.brain_mask, getattr(result, "eye_mask", None),
                                      segmentation_node=segmentation_node, ijk_to_ras_=result.ijk_to_ras)
        transform_node.SetAttribute(ATTR_SEGMENTATION, seg.GetID())
    elif previous is not None:
        seg = previous.segmentation
    volume_node.SetAttribute(ATTR_PREFIX + "PoseTransform", transform_node.GetID())
    return PoseNodes(volume_node, transform_node, seg, list(axes))


def write_segmentation_node(scene, volume_node, brain_mask, eye_mask=None, *, segmentation_node=None,
                            ijk_to_ras_=None):
    """Segmentation node "<volume> mask" with "brain" (and "eyes") segments; reference geometry = the volume."""
    slicer = require_slicer()
    from .scene_app import register_segmentation_converters

    register_segmentation_converters()  # before the node exists (each segmentation copies the rules)
    name = volume_node.GetName()
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} mask")
    segmentation_node.SetAttribute(ATTR_ROLE, "mask")
    segmentation_node.GetSegmentation().RemoveAllSegments()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if hasattr(segmentation_node, "SetNodeReferenceID"):
        segmentation_node.SetNodeReferenceID(
            segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    geometry = ijk_to_ras(volume_node) if ijk_to_ras_ is None else np.asarray(ijk_to_ras_, float)
    tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__e3pose_tmp_label")
    try:
        S = segmentation_node.GetSegmentation()
        for (seg_name, _label, colour), mask in zip(SEGMENTS, (brain_mask, eye_mask)):
            if mask is None or not np.any(mask):
                continue
            update_volume(tmp, (np.asarray(mask) > 0).astype(np.uint8), geometry)
            before = {S.GetNthSegmentID(i) for i in range(S.GetNumberOfSegments())}
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tmp, segmentation_node)
            if not ok:
                raise RuntimeError(f"could not import the {seg_name} mask into {segmentation_node.GetName()}")
            new = [S.GetNthSegmentID(i) for i in range(S.GetNumberOfSegments())
                   if S.GetNthSegmentID(i) not in before]
            for sid in new:
                seg = S.GetSegment(sid)
                seg.SetName(seg_name)
                seg.SetColor(*colour)
    finally:
        scene.RemoveNode(tmp)
    dn = segmentation_node.GetDisplayNode()
    dn.SetOpacity2DFill(0.35)
    dn.SetOpacity3D(0.45)
    return segmentation_node


def find_pose_nodes(scene, volume_node) -> Optional[PoseNodes]:
    """The pose nodes written earlier for ``volume_node`` (also after a scene reload), or None."""
    tid = volume_node.GetAttribute(ATTR_PREFIX + "PoseTransform")
    tnode = scene.GetNodeByID(tid) if tid else None
    if tnode is None:  # search by attribute (IDs may have been renamed on import)
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")):
            n = scene.GetNthNodeByClass(i, "vtkMRMLTransformNode")
            if n.GetAttribute(ATTR_ROLE) == "pose" and n.GetAttribute(ATTR_VOLUME) == volume_node.GetID():
                tnode = n
                break
    if tnode is None:
        return None
    sid = tnode.GetAttribute(ATTR_SEGMENTATION)
    seg = scene.GetNodeByID(sid) if sid else None
    axes = [scene.GetNodeByID(a) for a in (tnode.GetAttribute(ATTR_AXES) or "").split()]
    axes = [a for a in axes if a is not None]
    return PoseNodes(volume_node, tnode, seg, axes)


# --------------------------------------------------------------------------------------------------- display
def set_handles_visible(transform_node, visible: bool):
    """Interaction handles (rotation + translation, never scaling) in 2D and 3D views."""
    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    dn = transform_node.GetDisplayNode()
    dn.SetEditorScalingEnabled(False)
    dn.SetEditorVisibility(bool(visible))
    if hasattr(dn, "SetEditorSliceIntersectionVisibility"):
        dn.SetEditorSliceIntersectionVisibility(bool(visible))


def set_axes_visible(nodes: PoseNodes, visible: bool):
    for line in nodes.axes:
        if line.GetDisplayNode() is not None:
            line.GetDisplayNode().SetVisibility(bool(visible))


# --------------------------------------------------------------------------------------------------- edits
def estimated_matrix(transform_node) -> Optional[np.ndarray]:
    return _parse_matrix_attr(transform_node.GetAttribute(ATTR_ESTIMATED))


def is_edited(transform_node, tol: float = EDIT_TOLERANCE) -> bool:
    """True when the pose now differs from the network estimate (or the edited flag was set)."""
    est = estimated_matrix(transform_node)
    if est is None:
        return transform_node.GetAttribute(ATTR_EDITED) == "1"
    return bool(np.max(np.abs(to_parent(transform_node) - est)) > tol)


def update_edited_flag(transform_node) -> bool:
    edited = is_edited(transform_node)
    value = "1" if edited else "0"
    if transform_node.GetAttribute(ATTR_EDITED) != value:
        transform_node.SetAttribute(ATTR_EDITED, value)
    return edited


def reset_to_estimate(transform_node):
    est = estimated_matrix(transform_node)
    if est is not None:
        set_to_parent(transform_node, est)
        transform_node.SetAttribute(ATTR_EDITED, "0")


class PoseObserver:
    """Keeps the "edited" flag (and the reorient transform, when on) in sync with the pose transform.

    Observers are not saved with the scene: after loading a scene call :func:`observe` again. ``on_change`` (a
    plain callable, optional) is called with the transform node after each change, e.g. to refresh the GUI.
    """

    def __init__(self, transform_node, on_change=None):
        self.node = transform_node
        self.on_change = on_change
        self._tag = transform_node.AddObserver(transform_node.TransformModifiedEvent, self._modified)

    def _modified(self, caller, event=None):
        update_edited_flag(self.node)
        sync_reorient(self.node)
        if self.on_change is not None:
            self.on_change(self.node)

    def remove(self):
        if self._tag is not None:
            self.node.RemoveObserver(self._tag)
            self._tag = None


def observe(nodes_or_transform, on_change=None) -> PoseObserver:
    node = nodes_or_transform.transform if isinstance(nodes_or_transform, PoseNodes) else nodes_or_transform
    return PoseObserver(node, on_change)


# --------------------------------------------------------------------------------------------------- reorient
def _reorient_node(transform_node):
    scene = transform_node.GetScene()
    rid = transform_node.GetAttribute(ATTR_REORIENT)
    return scene.GetNodeByID(rid) if rid and scene is not None else None


def sync_reorient(transform_node):
    """Set the reorient transform (if any) to the inverse of the pose: world -> canonical."""
    rnode = _reorient_node(transform_node)
    if rnode is not None:
        inv = rigid_inverse(to_world(transform_node))
        if np.max(np.abs(to_parent(rnode) - inv)) > 1e-12:
            set_to_parent(rnode, inv)


def set_reoriented(nodes: PoseNodes, on: bool):
    """Show the volume (and mask) in the canonical frame, or restore them.

    On: the volume and its segmentation are placed under ``"<volume> canonical"`` whose ToParent is kept equal
    to the inverse of the pose (world -> canonical, see :class:`PoseObserver`); hardening that transform moves
    the voxels into canonical coordinates (x = left-right, y = anterior, z = inferior, origin = brain centre).
    Off: both go back under their original parent and the helper transform is removed.
    """
    scene = nodes.transform.GetScene()
    t = nodes.transform
    rnode = _reorient_node(t)
    moved = [n for n in (nodes.volume, nodes.segmentation) if n is not None]
    if on:
        if rnode is None:
            rnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{nodes.volume.GetName()} canonical")
            rnode.SetAttribute(ATTR_ROLE, "reorient")
            rnode.SetAttribute(ATTR_VOLUME, nodes.volume.GetID())
            t.SetAttribute(ATTR_REORIENT, rnode.GetID())
        sync_reorient(t)
        for n in moved:
            if n.GetTransformNodeID() != rnode.GetID():
                n.SetAttribute(ATTR_PREFIX + "ParentBeforeReorient", n.GetTransformNodeID() or "")
                n.SetAndObserveTransformNodeID(rnode.GetID())
        return rnode
    for n in moved:
        if rnode is not None and n.GetTransformNodeID() == rnode.GetID():
            before = n.GetAttribute(ATTR_PREFIX + "ParentBeforeReorient") or None
            n.SetAndObserveTransformNodeID(before)
    if rnode is not None:
        t.RemoveAttribute(ATTR_REORIENT)
        scene.RemoveNode(rnode)
    return None


def is_reoriented(nodes: PoseNodes) -> bool:
    return _reorient_node(nodes.transform) is not None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def pose_summary(nodes: PoseNodes) -> Dict:
    """Plain dict of the current pose (for the GUI / logs)."""
    m = to_world(nodes.transform)
    return {
        "canonical_to_world_ras": m.tolist(),
        "edited": is_edited(nodes.transform),
        "centre_ras": m[:3, 3].tolist(),
    }
