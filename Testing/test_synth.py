"""Synthetic data: determinism, the CSV pose convention end to end, anatomy (eyes anterior-inferior, symmetry, sizes)."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from E3PoseLogic.synth import AcquisitionConfig, SynthConfig, make_case, render_canonical, sample_phantom
from E3PoseLogic.synth.dataset import format_row, generate_dataset, pose_row


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.sum(a & b) / max(1, a.sum() + b.sum())


def _row_from_csv_text(case):
    """Through the CSV text, so formatting precision is part of the test."""
    line = format_row(pose_row(case, "training"))
    header = "frame_id,rot_x,rot_y,rot_z,com_r,com_a,com_s,ga_weeks,fold"
    return next(csv.DictReader([header, line]))


def _label_to_canonical(label, affine, row, can_affine, can_shape):
    """Independent re-statement of the contract: R_vc from Euler 'xyz'; rotation_voxel = R_vc^T;
    world rotation = D rotation_voxel diag(det D, 1, 1); canonical c -> world R c + com -> voxel index."""
    r_vc = Rotation.from_euler("xyz", [float(row[k]) for k in ("rot_x", "rot_y", "rot_z")], degrees=True).as_matrix()
    D = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    r_world = D @ r_vc.T @ np.diag([np.sign(np.linalg.det(D)), 1.0, 1.0])
    assert np.linalg.det(r_world) == pytest.approx(1.0, abs=1e-5)
    com = np.array([float(row[k]) for k in ("com_r", "com_a", "com_s")])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in can_shape], indexing="ij"), 0).reshape(3, -1)
    c = can_affine[:3, :3] @ idx + can_affine[:3, 3:4]
    w = r_world @ c + com[:, None]
    v = np.linalg.solve(affine, np.vstack([w, np.ones(w.shape[1])]))[:3]
    return ndimage.map_coordinates(label, v, order=0, mode="constant").reshape(can_shape)


CASES = {
    "oblique": AcquisitionConfig(voxel_mm=(1.6,), oblique_prob=1.0, mirror_prob=0.0, lowres_prob=0.0),
    "anisotropic": AcquisitionConfig(voxel_mm=(1.4, 1.4, 4.0), oblique_prob=1.0, mirror_prob=0.0),
    "mirrored": AcquisitionConfig(voxel_mm=(2.0,), oblique_prob=1.0, mirror_prob=1.0),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_csv_pose_moves_label_back_to_canonical(kind):
    cfg = SynthConfig(acquisition=CASES[kind], environment=False)
    case = make_case(11, 3, cfg)
    det = np.linalg.det(case.affine[:3, :3])
    assert (det < 0) == (kind == "mirrored")
    if kind == "anisotropic":
        assert np.allclose(sorted(np.linalg.norm(case.affine[:3, :3], axis=0)), [1.4, 1.4, 4.0], atol=1e-4)
    row = _row_from_csv_text(case)
    _, ref, can_affine, _ = render_canonical(case.params, spacing=1.5)
    moved = _label_to_canonical(case.label, case.affine, row, can_affine, ref.shape)
    # measured 0.976-0.985 (brain), 0.88-0.92 (eyes); a transposed rotation still gives ~0.86 for the ellipsoidal
    # brain, so the eyes (which would land elsewhere) carry most of the discrimination
    assert dice(moved == 1, ref == 1) > 0.93
    assert dice(moved == 2, ref == 2) > 0.7
    # pose JSON form: rotation_voxel is proper and D rotation_voxel diag(det, 1, 1) is the world rotation
    assert np.linalg.det(case.rotation_voxel) == pytest.approx(1.0, abs=1e-6)


def test_deterministic_per_seed(tmp_path):
    a, b = make_case(5, 2), make_case(5, 2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    assert not np.array_equal(make_case(5, 3).affine, a.affine)
    cfg = SynthConfig(acquisition=AcquisitionConfig(voxel_mm=(3.0,), size_mm=(200.0,)))
    generate_dataset(tmp_path / "one", 2, seed=7, cfg=cfg)
    generate_dataset(tmp_path / "two", 2, seed=7, cfg=cfg, workers=2)  # parallel: same bytes

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    d1, d2 = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert d1 == d2 and len(d1) == 6  # 2 images, 2 labels, poses.csv, synth_config.json
    rows = list(csv.DictReader(open(tmp_path / "one" / "poses.csv")))
    assert list(rows[0]) == ["frame_id", "rot_x", "rot_y", "rot_z", "com_r", "com_a", "com_s", "ga_weeks", "fold",
                            "protocol"]
    assert [r["fold"] for r in rows] == ["training", "validation"]


def test_files_and_com(tmp_path):
    import nibabel as nib

    cfg = SynthConfig(acquisition=AcquisitionConfig(voxel_mm=(3.0,), size_mm=(220.0,), mirror_prob=1.0))
    rows = generate_dataset(tmp_path, 1, seed=3, cfg=cfg)
    img = nib.load(tmp_path / "images" / f"{rows[0]['frame_id']}.nii.gz")
    lab = nib.load(tmp_path / "labels" / f"{rows[0]['frame_id']}.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    data = np.asarray(lab.dataobj)
    assert set(np.unique(data)) == {0, 1, 2}
    assert np.linalg.det(img.affine[:3, :3]) < 0
    com = img.affine[:3, :3] @ np.asarray(ndimage.center_of_mass(data == 1)) + img.affine[:3, 3]
    assert np.allclose(com, [rows[0]["com_r"], rows[0]["com_a"], rows[0]["com_s"]], atol=1e-4)
    # whole head inside the field of view: no label on the border
    assert not any(np.any(np.take(data, [0, -1], axis=a)) for a in range(3))


@pytest.fixture(scope="module")
def canonical():
    P = sample_phantom(np.random.default_rng(4), ga_weeks=30.0)
    img, lab, A, com = render_canonical(P, spacing=1.0)
    return P, img, lab, A


def test_eyes_anterior_inferior_and_symmetric(canonical):
    P, _, lab, A = canonical
    brain = np.asarray(ndimage.center_of_mass(lab == 1))
    comps, n = ndimage.label(lab == 2)
    assert n == 2
    eyes = [A[:3, :3] @ np.asarray(ndimage.center_of_mass(comps == i + 1)) + A[:3, 3] for i in range(2)]
    bc = A[:3, :3] @ brain + A[:3, 3]
    assert np.allclose(bc, 0.0, atol=1e-6)  # the returned affine puts the origin at the brain centre of mass
    for e in eyes:
        assert e[1] > 15.0 and e[2] > 5.0  # anterior (+y) and inferior (+z)
    assert eyes[0][0] * eyes[1][0] < 0  # one each side
    assert abs(eyes[0][0] + eyes[1][0]) < 1.5 and abs(eyes[0][1] - eyes[1][1]) < 1.0
    assert 30.0 <= abs(eyes[0][0] - eyes[1][0]) <= 50.0


def test_hemispheres_mirror_symmetric(canonical):
    _, img, lab, _ = canonical
    assert dice(lab == 1, lab[::-1] == 1) > 0.97
    assert np.mean(np.abs(img - img[::-1])) < 0.02


@pytest.mark.parametrize("ga", [20.0, 29.0, 38.0])
def test_sizes_follow_gestational_age(ga):
    P = sample_phantom(np.random.default_rng(int(ga)), ga_weeks=ga)
    t = (ga - 20.0) / 18.0
    assert 45.0 <= P.bpd_mm <= 95.0 and 55.0 <= P.ofd_mm <= 115.0
    assert abs(P.bpd_mm - (45.0 + 50.0 * t)) < 6.0 and abs(P.ofd_mm - (55.0 + 60.0 * t)) < 7.0
    assert abs(P.tcd_mm - ga) <= 0.1 * ga
    assert 8.0 <= 2 * P.eye_radius <= 15.0
    _, lab, A, _ = render_canonical(P, spacing=1.5)
    xs = np.nonzero(np.any(lab == 1, axis=(1, 2)))[0]
    ys = np.nonzero(np.any(lab == 1, axis=(0, 2)))[0]
    width, length = (np.ptp(xs) + 1) * 1.5, (np.ptp(ys) + 1) * 1.5
    assert 0.75 * P.bpd_mm < width < P.bpd_mm  # brain inside the skull
    assert 0.75 * P.ofd_mm < length < P.ofd_mm


@pytest.mark.parametrize("seed", [2, 3])
def test_navigator_grid(seed):
    """Navigator-like cases: about 6 mm isotropic voxels over 360-400 mm (so at most ~70 voxels a side: small
    volumes, cheap to make), and the whole brain inside."""
    case = make_case(seed, 0, SynthConfig(acquisition=AcquisitionConfig(navigator=True)))
    sp = np.linalg.norm(case.affine[:3, :3], axis=0)
    assert np.all((sp > 5.4) & (sp < 6.6)) and np.ptp(sp) < 1e-6
    fov = np.asarray(case.image.shape) * sp
    assert np.all((fov > 360.0 - 6.6) & (fov < 400.0 + 6.6)), fov
    assert max(case.image.shape) <= 70
    lab = case.label == 1
    assert np.any(lab) and not (lab[0].any() or lab[-1].any() or lab[:, 0].any() or lab[:, -1].any()
                                or lab[:, :, 0].any() or lab[:, :, -1].any())


def test_cli_synth(tmp_path):
    from E3PoseLogic.cli import main

    rc = main(["synth", str(tmp_path / "out"), "--n", "1", "--seed", "1", "--voxel-mm", "3", "--size-mm", "200"])
    assert rc == 0
    assert (tmp_path / "out" / "poses.csv").read_text().startswith("frame_id,rot_x,rot_y,rot_z,com_r")
    assert len(list((tmp_path / "out" / "images").glob("*.nii.gz"))) == 1
    assert main(["synth", str(tmp_path / "bad"), "--n", "0"]) == 2


def test_bundled_sample_is_consistent():
    """The demo volume's pose JSON agrees with its NIfTI files (and make_sample regenerates them)."""
    import json
    from pathlib import Path

    import nibabel as nib

    d = Path(__file__).resolve().parents[1] / "E3PoseLogic" / "data" / "sample"
    pose = json.loads((d / "sample_head_pose.json").read_text())
    img, lab = nib.load(d / "sample_head.nii.gz"), nib.load(d / "sample_head_label.nii.gz")
    assert pose["synthetic"] is True and (d / "sample_head.nii.gz").stat().st_size <= 3 * 2 ** 20
    A = img.affine
    D = A[:3, :3] / np.linalg.norm(A[:3, :3], axis=0)
    assert np.linalg.det(D) > 0 and np.max(np.abs(D - np.eye(3))) > 0.05  # oblique, not mirrored
    assert np.all(np.abs(np.linalg.norm(A[:3, :3], axis=0) - 1.75) < 1e-4)
    R, Rv = np.array(pose["rotation_ras"]), np.array(pose["rotation_voxel"])
    assert np.allclose(D @ Rv, R, atol=1e-5) and np.linalg.det(R) == pytest.approx(1.0)
    com = A[:3, :3] @ np.asarray(ndimage.center_of_mass(np.asarray(lab.dataobj) == 1)) + A[:3, 3]
    assert np.allclose(com, pose["translation_ras"], atol=1e-3)
    assert 29.0 <= pose["ga_weeks"] <= 31.0


# --------------------------------------------------------------------------- variation for transfer (issue 11)
def test_variation_off_keeps_every_seed_and_on_changes_only_appearance():
    from E3PoseLogic.synth import Variation

    plain = make_case(5, 2)
    assert np.array_equal(make_case(5, 2, SynthConfig(variation=Variation())).image, plain.image)
    contrast = SynthConfig(variation=Variation(random_contrast=1.0))
    a, b = make_case(5, 2, contrast), make_case(5, 2, contrast)
    assert np.array_equal(a.image, b.image)  # deterministic per (seed, index)
    # no deformation: same geometry, grid and pose (its draws come from a generator of its own), other intensities
    assert np.array_equal(a.affine, plain.affine) and np.array_equal(a.pose, plain.pose)
    assert dice(a.label == 1, plain.label == 1) > 0.99
    assert not np.allclose(a.image, plain.image)
    assert set(a.params.intensity) >= set(plain.params.intensity) | {"deepgrey"}
    assert all(0.0 <= v <= 1.0 for v in a.params.intensity.values())


def test_random_contrast_includes_inverted_contrasts():
    from E3PoseLogic.synth.phantom import Variation, vary_phantom

    P = sample_phantom(np.random.default_rng(1), ga_weeks=30.0)
    inverted = [vary_phantom(P, np.random.default_rng([9, i, 1]), Variation(random_contrast=1.0)).intensity
                for i in range(40)]
    # T2-like phantoms always have CSF brighter than white matter brighter than cortex; random contrast does not
    assert sum(t["csf"] < t["cortex"] for t in inverted) > 5
    assert sum(t["wm"] < t["cortex"] for t in inverted) > 5


def test_deformation_moves_the_anatomy_smoothly_and_keeps_it_whole():
    from E3PoseLogic.synth.phantom import Variation, vary_phantom

    P = sample_phantom(np.random.default_rng(2), ga_weeks=32.0)
    V = vary_phantom(P, np.random.default_rng([3, 3, 1]), Variation(deform_mm=5.0))
    assert 2.0 < V.deform_reach_mm <= 5.0 + 1e-9  # this draw: 3.9 mm
    assert V.head_radius_mm == pytest.approx(P.head_radius_mm + V.deform_reach_mm)
    _, lab0, _, _ = render_canonical(P, spacing=1.5, radius_mm=P.head_radius_mm + 6.0)
    _, lab1, _, _ = render_canonical(V, spacing=1.5, radius_mm=P.head_radius_mm + 6.0)
    brain0, brain1 = lab0 == 1, lab1 == 1
    # a few mm of displacement on a brain of ~80 mm: the same organ, not the same voxels, still one piece
    assert 0.8 < dice(brain0, brain1) < 0.995
    assert ndimage.label(brain1)[1] == 1
    assert abs(int(brain1.sum()) - int(brain0.sum())) < 0.1 * brain0.sum()
    # both hemispheres deform differently: no longer exactly mirror-symmetric
    assert dice(brain1, brain1[::-1]) < dice(brain0, brain0[::-1])


def test_anatomy_variation_adds_sulci_with_age():
    from E3PoseLogic.synth.phantom import Variation, vary_phantom

    rng = np.random.default_rng([4, 0, 1])
    young = vary_phantom(sample_phantom(np.random.default_rng(5), ga_weeks=20.0), rng, Variation(anatomy=True))
    old_p = sample_phantom(np.random.default_rng(5), ga_weeks=36.0)
    old = vary_phantom(old_p, rng, Variation(anatomy=True))
    assert young.sulcus_mm == pytest.approx(0.0) and old.sulcus_mm > 1.0
    img0, lab0, _, _ = render_canonical(old_p, spacing=1.0)
    img1, lab1, _, _ = render_canonical(old, spacing=1.0)
    assert np.array_equal(lab0 == 1, lab1 == 1)  # sulcal CSF and deep grey are brain: the mask is unchanged
    csf = old.intensity["csf"]
    inside = lab1 == 1
    # more voxels of the brain near CSF brightness than without sulci
    assert np.sum(np.abs(img1[inside] - csf) < 0.02) > 1.2 * np.sum(np.abs(img0[inside] - csf) < 0.02)


def test_cli_synth_variation(tmp_path):
    import json

    from E3PoseLogic.cli import main

    assert main(["synth", str(tmp_path / "v"), "--n", "1", "--seed", "3", "--voxel-mm", "3", "--size-mm", "200",
                 "--random-contrast", "1", "--deform", "4", "--anatomy-variation"]) == 0
    cfg = json.loads((tmp_path / "v" / "synth_config.json").read_text())
    assert cfg["variation"] == {"random_contrast": 1.0, "deform_mm": 4.0, "anatomy": True}
    assert main(["synth", str(tmp_path / "w"), "--deform", "30"]) == 2
