"""MRML adapters under slicer-core: volumes, pose transform, segmentation, axes, edited flag, reorient."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")
pytestmark = pytest.mark.mrml

from conftest import MARKER, EYES, make_synthetic_head, rotation  # noqa: E402


def _world_of(arr_mask, g):
    ijk = np.argwhere(arr_mask).astype(float)
    return ijk @ g[:3, :3].T + g[:3, 3]


@pytest.mark.parametrize("mirror", [False, True])
def test_nifti_volume_geometry_matches_nibabel(tmp_path, scene, mirror):
    nib = pytest.importorskip("nibabel")
    from E3PoseLogic.mrml.nodes import array_from_volume, load_volume

    rng = np.random.default_rng(0)
    arr = rng.normal(size=(12, 10, 8)).astype(np.float32)
    aff = np.eye(4)
    aff[:3, :3] = rotation("z", 25) @ rotation("x", 40) @ np.diag([-1.0 if mirror else 1.0, 1.0, 1.0]) \
        @ np.diag([1.2, 0.8, 3.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(arr, aff), str(p))
    node = load_volume(scene, p)
    a, g = array_from_volume(node)
    assert node.GetName() == "v"
    ref = nib.load(str(p))
    ref_arr = np.asarray(ref.dataobj)
    # read by volume_io (the command line's reader): nibabel's matrix and array, mirrored storage included, so
    # voxel indices agree with `e3pose infer` (Slicer's own reader reverses one voxel axis of a left-handed grid)
    np.testing.assert_allclose(g, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(a, ref_arr)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij"), -1).reshape(-1, 3)
    world = np.c_[ijk, np.ones(len(ijk))] @ g.T
    ref_ijk = np.rint((world @ np.linalg.inv(ref.affine).T)[:, :3]).astype(int)
    np.testing.assert_allclose((world @ np.linalg.inv(ref.affine).T)[:, :3], ref_ijk, atol=1e-3)
    np.testing.assert_array_equal(a[tuple(ijk.T)], ref_arr[tuple(ref_ijk.T)])
    try:
        from E3PoseLogic.frames import kji_to_ijk
    except ImportError:
        return
    import slicer

    np.testing.assert_array_equal(kji_to_ijk(slicer.util.arrayFromVolume(node)), a)


def test_volume_from_array_roundtrip(scene, synthetic_head):
    from E3PoseLogic.mrml.nodes import array_from_volume, volume_from_array

    h = synthetic_head
    v = volume_from_array(scene, h["array"], h["affine"], "head")
    a, g = array_from_volume(v)
    np.testing.assert_array_equal(a, h["array"])
    np.testing.assert_allclose(g, h["affine"], atol=1e-12)


def _write(scene, h, **kw):
    from E3PoseLogic.mrml.nodes import volume_from_array, write_pose

    v = volume_from_array(scene, h["array"], h["affine"], "head")
    return write_pose(scene, v, h["result"], **kw)


def test_write_pose_transform_direction_and_display(scene, synthetic_head):
    from E3PoseLogic.mrml.nodes import to_parent

    nodes = _write(scene, synthetic_head, show_handles=True)
    t = nodes.transform
    assert t.GetName() == "head pose"
    np.testing.assert_allclose(to_parent(t), synthetic_head["pose"], atol=1e-12)
    # canonical landmark -> world: the marker centre maps onto the marker voxels
    w = to_parent(t) @ np.append(MARKER, 1.0)
    centroid = _world_of(synthetic_head["marker"], synthetic_head["affine"]).mean(0)
    assert np.linalg.norm(w[:3] - centroid) < 1.5
    dn = t.GetDisplayNode()
    assert dn.GetEditorVisibility() and dn.GetEditorRotationEnabled() and dn.GetEditorTranslationEnabled()
    assert not dn.GetEditorScalingEnabled()
    assert tuple(t.GetCenterOfTransformation()) == (0.0, 0.0, 0.0)
    # rerun reuses nodes
    from E3PoseLogic.mrml.nodes import write_pose

    n2 = write_pose(scene, nodes.volume, synthetic_head["result"])
    assert n2.transform is t and n2.segmentation is nodes.segmentation
    assert [a.GetID() for a in n2.axes] == [a.GetID() for a in nodes.axes]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_transform_files_roundtrip_and_simpleitk(tmp_path, scene, synthetic_head):
    from E3PoseLogic.mrml.export import load_transform, save_transform
    from E3PoseLogic.mrml.nodes import to_parent

    nodes = _write(scene, synthetic_head)
    pose = synthetic_head["pose"]
    for ext in (".h5", ".tfm"):
        p = save_transform(nodes.transform, tmp_path / f"pose{ext}")
        back = load_transform(scene, p)
        np.testing.assert_allclose(to_parent(back), pose, atol=1e-9)
    sitk = pytest.importorskip("SimpleITK")
    tx = sitk.ReadTransform(str(tmp_path / "pose.tfm"))
    tx = sitk.AffineTransform(tx) if tx.GetName() != "AffineTransform" else tx
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    t = np.array(tx.GetTranslation())
    f_lps = np.eye(4)
    f_lps[:3, :3] = a
    f_lps[:3, 3] = t + c - a @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(np.linalg.inv(flip @ f_lps @ flip), pose, atol=1e-9)


def test_segmentation_labels_colours_geometry_and_export(scene, synthetic_head):
    from E3PoseLogic.mrml.export import mask_from_segmentation
    from E3PoseLogic.mrml.nodes import SEGMENTS

    h = synthetic_head
    nodes = _write(scene, h)
    seg = nodes.segmentation
    S = seg.GetSegmentation()
    names = [S.GetNthSegment(i).GetName() for i in range(S.GetNumberOfSegments())]
    assert names == ["brain", "eyes"]
    colours = [tuple(S.GetNthSegment(i).GetColor()) for i in range(2)]
    np.testing.assert_allclose(colours, [c for _, _, c in SEGMENTS], atol=1e-6)
    assert colours[0] != colours[1]
    mask = mask_from_segmentation(seg, nodes.volume)
    expected = h["brain"].copy()
    expected[(h["eyes"] > 0) & (h["brain"] == 0)] = 2
    np.testing.assert_array_equal(mask, expected)


def test_axes_follow_transform_edits_and_edited_flag(scene, synthetic_head):
    from E3PoseLogic.mrml.nodes import (ATTR_EDITED, is_edited, observe, reset_to_estimate, set_axes_visible,
                                        set_to_parent, to_parent)

    nodes = _write(scene, synthetic_head)
    obs = observe(nodes)
    assert [a.GetName() for a in nodes.axes] == ["head axis x", "head axis y", "head axis z"]
    assert nodes.transform.GetAttribute(ATTR_EDITED) == "0" and not is_edited(nodes.transform)

    def tips():
        out = []
        for a in nodes.axes:
            p = np.zeros(3)
            a.GetNthControlPointPositionWorld(1, p)
            out.append(p)
        return np.array(out)

    pose = synthetic_head["pose"]
    np.testing.assert_allclose(tips(), (pose[:3, :3] * 40.0 + pose[:3, 3:4]).T, atol=1e-9)
    new = pose.copy()
    new[:3, :3] = rotation("y", 10) @ pose[:3, :3]
    new[:3, 3] += [2.0, 0.0, -1.0]
    set_to_parent(nodes.transform, new)
    np.testing.assert_allclose(tips(), (new[:3, :3] * 40.0 + new[:3, 3:4]).T, atol=1e-9)
    assert nodes.transform.GetAttribute(ATTR_EDITED) == "1" and is_edited(nodes.transform)
    reset_to_estimate(nodes.transform)
    np.testing.assert_allclose(to_parent(nodes.transform), pose, atol=1e-12)
    assert nodes.transform.GetAttribute(ATTR_EDITED) == "0"
    set_axes_visible(nodes, False)
    assert not any(a.GetDisplayNode().GetVisibility() for a in nodes.axes)
    obs.remove()


def test_reorient_and_harden_puts_head_in_canonical_frame(scene, synthetic_head):
    from E3PoseLogic.mrml.nodes import (array_from_volume, is_reoriented, observe, set_reoriented, set_to_parent,
                                        to_parent)

    h = synthetic_head
    nodes = _write(scene, h)
    obs = observe(nodes)
    r = set_reoriented(nodes, True)
    assert is_reoriented(nodes) and nodes.volume.GetTransformNodeID() == r.GetID()
    assert nodes.segmentation.GetTransformNodeID() == r.GetID()
    np.testing.assert_allclose(to_parent(r) @ h["pose"], np.eye(4), atol=1e-12)
    # a manual edit of the pose keeps the reorient transform its inverse
    new = h["pose"].copy()
    new[:3, 3] += [1.0, 2.0, 3.0]
    set_to_parent(nodes.transform, new)
    np.testing.assert_allclose(to_parent(r) @ new, np.eye(4), atol=1e-12)
    set_to_parent(nodes.transform, h["pose"])
    # switching off restores
    set_reoriented(nodes, False)
    assert nodes.volume.GetTransformNodeID() is None and not is_reoriented(nodes)
    assert scene.GetFirstNodeByName("head canonical") is None
    # harden: landmarks land at their canonical coordinates
    set_reoriented(nodes, True)
    nodes.volume.HardenTransform()
    a, g = array_from_volume(nodes.volume)
    marker = _world_of(a > 300, g).mean(0)
    np.testing.assert_allclose(marker, MARKER, atol=1.0)
    eyes = _world_of((a > 150) & (a < 300), g)
    left, right = eyes[eyes[:, 0] > 0].mean(0), eyes[eyes[:, 0] < 0].mean(0)
    np.testing.assert_allclose(left, EYES[1], atol=1.0)
    np.testing.assert_allclose(right, EYES[0], atol=1.0)
    brain = _world_of(a >= 100, g).mean(0)
    assert np.linalg.norm(brain) < 2.0
    obs.remove()


def test_scene_save_reload_mrml_and_mrb(tmp_path, headless_app, synthetic_head):
    from E3PoseLogic.mrml.export import save_scene_mrb
    from E3PoseLogic.mrml.nodes import ATTR_EDITED, find_pose_nodes, is_edited, set_to_parent, to_parent
    from E3PoseLogic.mrml.scene_app import create_headless_app

    scene = headless_app.scene
    h = synthetic_head
    nodes = _write(scene, h)
    edited = h["pose"].copy()
    edited[:3, 3] += 5.0
    set_to_parent(nodes.transform, edited)
    mrb = tmp_path / "s.mrb"
    save_scene_mrb(scene, mrb)
    assert mrb.stat().st_size > 1000
    # .mrml + data files
    d = tmp_path / "mrml"
    d.mkdir()
    for n in [nodes.volume, nodes.transform, nodes.segmentation] + nodes.axes:
        if n.GetStorageNode() is None:
            n.AddDefaultStorageNode()
    scene.SetRootDirectory(str(d))
    for n in [nodes.volume, nodes.transform, nodes.segmentation] + nodes.axes:
        sn = n.GetStorageNode()
        ext = {"vtkMRMLScalarVolumeNode": ".nrrd", "vtkMRMLLinearTransformNode": ".h5",
               "vtkMRMLSegmentationNode": ".seg.nrrd"}.get(n.GetClassName(), ".mrk.json")
        sn.SetFileName(str(d / (n.GetName().replace(" ", "_") + ext)))
        assert sn.WriteData(n)
    scene.SetURL(str(d / "scene.mrml"))
    assert scene.Commit()

    for how in ("mrb", "mrml"):
        app2 = create_headless_app()
        s2 = app2.scene
        if how == "mrb":
            (tmp_path / "unpack").mkdir()
            assert app2.app_logic.OpenSlicerDataBundle(str(mrb), str(tmp_path / "unpack"))
        else:
            s2.SetURL(str(d / "scene.mrml"))
            assert s2.Connect()
        v2 = s2.GetFirstNodeByName("head")
        n2 = find_pose_nodes(s2, v2)
        assert n2 is not None, how
        np.testing.assert_allclose(to_parent(n2.transform), edited, atol=1e-9)
        assert is_edited(n2.transform)
        assert n2.segmentation is not None and n2.segmentation.GetSegmentation().GetNumberOfSegments() == 2
        assert len(n2.axes) == 3
        p = np.zeros(3)
        n2.axes[0].GetNthControlPointPositionWorld(1, p)
        np.testing.assert_allclose(p, edited[:3, :3] @ [40.0, 0, 0] + edited[:3, 3], atol=1e-6)
        s2.Clear(1)


def test_bundled_sample_reoriented_eyes_anterior(scene):
    """On the bundled synthetic sample (known pose): after reorient + harden, the brain centre is at the origin
    and the eyes sit anterior (y > 0) and symmetric in x."""
    import json
    from pathlib import Path

    from E3PoseLogic.mrml.nodes import array_from_volume, load_volume, set_reoriented, write_pose
    from E3PoseLogic.result import PoseResult

    sample = Path(__file__).resolve().parents[1] / "E3PoseLogic" / "data" / "sample"
    if not (sample / "sample_head_pose.json").is_file():
        pytest.skip("no bundled sample")
    rec = json.loads((sample / "sample_head_pose.json").read_text())
    vol = load_volume(scene, sample / "sample_head.nii.gz")
    lab = load_volume(scene, sample / "sample_head_label.nii.gz", labelmap=True)
    labels, g = array_from_volume(lab)
    result = PoseResult(rotation=np.array(rec["rotation_ras"]), translation=np.array(rec["translation_ras"]),
                        brain_mask=(labels == 1).astype(np.uint8), eye_mask=(labels == 2).astype(np.uint8),
                        ijk_to_ras=g)
    nodes = write_pose(scene, vol, result)
    set_reoriented(nodes, True)
    lab.SetAndObserveTransformNodeID(scene.GetFirstNodeByName(f"{vol.GetName()} canonical").GetID())
    lab.HardenTransform()
    labels, g = array_from_volume(lab)
    brain = _world_of(labels == 1, g).mean(0)
    eyes = _world_of(labels == 2, g)
    assert np.linalg.norm(brain) < 3.0
    assert eyes[:, 1].mean() > 20.0  # anterior
    assert abs(eyes[:, 0].mean()) < 5.0 and (eyes[:, 0] > 0).any() and (eyes[:, 0] < 0).any()  # both sides
