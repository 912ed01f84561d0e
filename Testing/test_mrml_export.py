"""Export of the (edited) pose: transform files, JSON, published .npy, masks, scene bundle; atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_synthetic_head, rotation


def test_canonical_to_voxel_matches_pose_result():
    from E3PoseLogic.mrml.export import canonical_to_voxel

    for mirror in (False, True):
        h = make_synthetic_head(grid_rotation=rotation("y", 30), mirror=mirror)
        r = h["result"]
        np.testing.assert_allclose(canonical_to_voxel(r.canonical_to_world, r.ijk_to_ras), r.canonical_to_voxel(),
                                   atol=1e-12)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    from E3PoseLogic.mrml.export import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.mrml
def test_export_pose_files(tmp_path, scene, synthetic_head):
    pytest.importorskip("slicer")
    nib = pytest.importorskip("nibabel")
    from E3PoseLogic.mrml.export import export_pose, load_transform
    from E3PoseLogic.mrml.nodes import set_to_parent, to_parent, volume_from_array, write_pose

    h = synthetic_head
    v = volume_from_array(scene, h["array"], h["affine"], "head")
    nodes = write_pose(scene, v, h["result"])
    out = export_pose(nodes, tmp_path, mask_formats=(".nii.gz", ".seg.nrrd"), mrb=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["head.h5", "head.tfm", "head.json", "head.npy", "head_mask.nii.gz",
                            "head_mask.seg.nrrd", "head.mrb"])
    rec = json.loads((tmp_path / "head.json").read_text())
    np.testing.assert_allclose(rec["canonical_to_world_ras"], h["pose"], atol=1e-12)
    np.testing.assert_allclose(np.array(rec["world_to_canonical_ras"]) @ h["pose"], np.eye(4), atol=1e-12)
    assert rec["edited"] is False and rec["provenance"]["device"] == "cpu"
    assert rec["model"]["e3cnn"]["sha256"] == "0" * 64
    np.testing.assert_allclose(np.load(out["npy"]), h["result"].canonical_to_voxel(), atol=1e-12)
    m = nib.load(str(out["mask.nii.gz"]))
    np.testing.assert_allclose(m.affine, h["affine"], atol=1e-5)
    expected = h["brain"].copy()
    expected[(h["eyes"] > 0) & (h["brain"] == 0)] = 2
    np.testing.assert_array_equal(np.asarray(m.dataobj), expected)
    np.testing.assert_allclose(to_parent(load_transform(scene, out["transform.h5"])), h["pose"], atol=1e-9)

    # after a manual edit the export follows the current transform and says so
    edited = h["pose"].copy()
    edited[:3, :3] = rotation("z", 5) @ edited[:3, :3]
    edited[:3, 3] += [1.0, -2.0, 0.5]
    set_to_parent(nodes.transform, edited)
    export_pose(nodes, tmp_path, transform_formats=(".h5",), mask_formats=())
    rec = json.loads((tmp_path / "head.json").read_text())
    assert rec["edited"] is True
    np.testing.assert_allclose(rec["canonical_to_world_ras"], edited, atol=1e-12)
    np.testing.assert_allclose(rec["estimated_canonical_to_world_ras"], h["pose"], atol=1e-12)
    npy = np.load(tmp_path / "head.npy")
    np.testing.assert_allclose(npy[:3, 3], (np.linalg.inv(h["affine"]) @ np.append(edited[:3, 3], 1))[:3])
    np.testing.assert_allclose(to_parent(load_transform(scene, tmp_path / "head.h5")), edited, atol=1e-9)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
