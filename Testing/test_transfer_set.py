"""The MNI transfer-set recipe (Resources/benchmarks/make_transfer_set.py) on one small volume.

Needs the nilearn 0.14.1 wheel (only read as a zip; nilearn is not installed): /tmp/nl/ or $E3POSE_NILEARN_WHEEL.
The wheel is not part of the repository, so CI skips these tests.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from _support import load_script

WHEEL_NAME = "nilearn-0.14.1-py3-none-any.whl"


def _wheel():
    env = os.environ.get("E3POSE_NILEARN_WHEEL")
    for p in ([Path(env)] if env else []) + [Path("/tmp/nl") / WHEEL_NAME]:
        if p.is_file():
            return p
    return None


WHEEL = _wheel()
pytestmark = pytest.mark.skipif(
    WHEEL is None, reason=f"{WHEEL_NAME} not found (put it in /tmp/nl/ or set $E3POSE_NILEARN_WHEEL; "
                          "it is not in the repository, so CI skips the transfer-set tests)")

ARGS = ["--n", "1", "--seed", "3", "--voxel", "3", "--max-dim", "72"]


@pytest.fixture(scope="module")
def script():
    return load_script("make_transfer_set")


@pytest.fixture(scope="module")
def made(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    assert script.main([str(out)] + ARGS + ["--nilearn-wheel", str(WHEEL)]) == 0
    return out


def test_files_and_csv(made):
    from E3PoseLogic.evaluate import read_ground_truth
    from E3PoseLogic.synth.dataset import CSV_COLUMNS

    fid = "mni3_00000"
    for p in (made / "images" / f"{fid}.nii.gz", made / "labels" / f"{fid}.nii.gz", made / "poses.csv",
              made / "transfer_config.json"):
        assert p.is_file(), p
    assert (made / "poses.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    gt = read_ground_truth(made / "poses.csv")
    assert list(gt) == [fid]
    row = gt[fid]
    assert row["fold"] == "test" and row["protocol"] == "standard" and 20.0 <= row["ga_weeks"] <= 38.0
    meta = json.loads((made / "transfer_config.json").read_text())
    assert set(meta["source"]["members"]) == {"t1", "gm", "wm"}
    assert all(len(m["sha256"]) == 64 for m in meta["source"]["members"].values())


def test_label_com_and_rotation(made):
    """com_r/a/s = centre of mass of label 1 (within a voxel); the CSV rotation, read back by the evaluation
    reader and mapped through the written affine, puts the eyes (label 2) anterior and inferior of the brain."""
    import nibabel as nib
    from scipy import ndimage

    from E3PoseLogic import frames
    from E3PoseLogic.evaluate import read_ground_truth

    fid = "mni3_00000"
    img = nib.load(made / "labels" / f"{fid}.nii.gz")
    lab = np.asarray(img.dataobj)
    A = img.affine
    assert set(np.unique(lab)) <= {0, 1, 2} and (lab == 1).any()
    row = read_ground_truth(made / "poses.csv")[fid]
    com = A[:3, :3] @ np.asarray(ndimage.center_of_mass(lab == 1)) + A[:3, 3]
    assert np.linalg.norm(com - row["com_ras"]) <= float(frames.voxel_sizes(A).max())
    D = frames.direction_cosines(A)
    R = D @ row["rotation_voxel"] @ np.diag([np.sign(np.linalg.det(D)), 1.0, 1.0])  # canonical -> world
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-4)
    meta = json.loads((made / "transfer_config.json").read_text())
    np.testing.assert_allclose(R, np.asarray(meta["cases"][0]["rotation_ras"]), atol=1e-4)
    if (lab == 2).any():
        eyes = A[:3, :3] @ np.asarray(ndimage.center_of_mass(lab == 2)) + A[:3, 3]
        q = R.T @ (eyes - row["com_ras"])  # canonical: x left, y anterior, z inferior
        assert q[1] > 10.0 and q[2] > 5.0, q


def test_deterministic(script, made, tmp_path):
    out = tmp_path / "again"
    assert script.main([str(out)] + ARGS + ["--nilearn-wheel", str(WHEEL)]) == 0
    for rel in ("images/mni3_00000.nii.gz", "labels/mni3_00000.nii.gz", "poses.csv"):
        assert (out / rel).read_bytes() == (made / rel).read_bytes(), rel
