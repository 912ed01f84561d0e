"""The refinement stage: mirror-plane search, the 2D network's reading, its weights file, and the pipeline switch.

The geometric tests use a synthetic head (``e3pose synth``'s generator) of known pose and need no network; the
accuracy tests use the refinement network that ships with the bundled model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from _support import rotation, run_cli, true_brain_ml

pytest.importorskip("torch")

HEAD = (9301, 0)  # (seed, index) never used by a training, tuning or test set


@pytest.fixture(scope="module")
def head():
    from E3PoseLogic.synth.dataset import make_case

    case = make_case(*HEAD)
    return case, true_brain_ml(case)


def _x_error_deg(normal_world, truth):
    return float(np.degrees(np.arccos(min(1.0, abs(float(normal_world @ truth[:, 0]))))))


def test_mirror_plane_is_found_from_25_degrees_off(head):
    from E3PoseLogic.networks.sagittal import SagittalConfig
    from E3PoseLogic.refine import MirrorSearch, equivalent_radius, local_cube

    case, brain_ml = head
    start = case.rotation_ras @ rotation("y", 25.0) @ rotation("z", 10.0)
    radius = equivalent_radius(brain_ml)
    cube, sp = local_cube(case.image.astype(np.float32), case.affine, case.com_ras, start, radius, SagittalConfig())
    search = MirrorSearch(cube, sp, radius)
    planes = search.candidates(prior_normals=[np.array([1.0, 0.0, 0.0])])
    assert planes[0].source == "network" and all(p.source == "search" for p in planes[1:])
    assert _x_error_deg(start @ planes[0].normal, case.rotation_ras) < 4.0  # quick fit on the coarse grid
    fitted = search.polish(planes[0])
    assert fitted.score >= planes[0].score
    assert _x_error_deg(start @ fitted.normal, case.rotation_ras) < 1.5  # precise fit
    found = search.candidates()[0]  # the search alone, without the E3-CNN, finds the same plane
    assert _x_error_deg(start @ search.polish(found).normal, case.rotation_ras) < 1.5


def test_search_finds_the_plane_when_the_centre_is_off_it(heads):
    """The brain centre the search starts from (the U-Net's) can be millimetres off the mirror plane; the global
    search scores each direction at its best offset, so the plane is still among its hypotheses (which one wins is
    the 2D network's part), fitted through the true centre."""
    from E3PoseLogic.networks.sagittal import SagittalConfig
    from E3PoseLogic.refine import MirrorSearch, equivalent_radius, local_cube

    for case, brain_ml in heads:
        start = case.rotation_ras @ rotation("z", 40.0) @ rotation("x", 30.0)  # no help from the start's axes
        centre = case.com_ras + 7.0 * case.rotation_ras[:, 0]  # 7 mm along e_x: off the plane
        radius = equivalent_radius(brain_ml)
        cube, sp = local_cube(case.image.astype(np.float32), case.affine, centre, start, radius, SagittalConfig())
        search = MirrorSearch(cube, sp, radius)
        planes = [search.polish(p) for p in search.candidates()]
        plane = min(planes, key=lambda p: _x_error_deg(start @ p.normal, case.rotation_ras))
        normal = start @ plane.normal
        assert _x_error_deg(normal, case.rotation_ras) < 2.0
        # the fitted plane passes through the true centre: offset = signed distance from the cube centre
        assert plane.offset == pytest.approx(float(normal @ (case.com_ras - centre)), abs=1.5)


def test_mirror_scores_match_a_direct_computation():
    """The batched score (torch's grid_sample on points kept in (k, j, i) order and scaled to [-1, 1]) is the
    correlation of the cube with its reflection computed plainly (scipy's map_coordinates), near the faces too: the
    cube continues as zeros, interpolated within the voxel beyond its last one (scipy's 'grid-constant')."""
    from scipy import ndimage

    from E3PoseLogic.refine import MirrorScore

    rng = np.random.default_rng(5)
    cube = ndimage.gaussian_filter(rng.random((22, 22, 22)), 1.5).astype(np.float32)
    cube[:, :, :6] += 0.3  # not symmetric about the centre
    sp, radius = 1.5, 15.0  # the ball reaches past the cube's faces: reflected points fall outside (zeros)
    ms = MirrorScore(cube, sp, radius)
    normals = rng.normal(size=(6, 3))
    normals[0] = [1.0, 0.0, 0.0]
    offsets = rng.uniform(-4.0, 4.0, size=6)
    got = ms.scores(normals, offsets)
    c = (cube.shape[0] - 1) / 2.0
    for n, o, g in zip(normals, offsets, got):
        n = n / np.linalg.norm(n)
        q = ms.p - 2.0 * (ms.p @ n - o)[:, None] * n[None]
        w = ndimage.map_coordinates(cube.astype(np.float64), (q / sp + c).T, order=1, mode="grid-constant", cval=0.0)
        w = w - w.mean()
        want = float((ms.v * w).sum() / (ms.vn * np.sqrt((w ** 2).sum())))
        assert g == pytest.approx(want, abs=2e-5)
        assert ms(n, o) == pytest.approx(g, abs=1e-6)
    assert np.ptp(got) > 0.1  # the planes score differently: the check can fail


def test_coarse_voxels_fit_the_plane_over_a_wider_ball():
    """At navigator-like resolution (6 mm voxels) the brain is 4-8 voxels in radius, and the mirror fit over it
    alone drifts degrees from the true plane; the chosen plane's last fit there compares 1.2 brain radii.

    Ten navigator-like heads (seed 9302: no training, tuning or test set uses it), fitted from their true plane
    with the centre 3.5 mm off: measured 1.0 to 7.8 deg (median 3.2, mean 4.0) over 1.2 radii, against 1.1 to 9.9
    (median 4.6, mean 5.1) over the brain's ball."""
    from E3PoseLogic import frames
    from E3PoseLogic.networks.sagittal import SagittalConfig
    from E3PoseLogic.refine import (COARSE_PRECISE_RADIUS, COARSE_VOXEL_MM, MirrorSearch, Plane, equivalent_radius,
                                    local_cube)
    from E3PoseLogic.synth.acquisition import AcquisitionConfig
    from E3PoseLogic.synth.dataset import SynthConfig, make_case

    cfg = SynthConfig(acquisition=AcquisitionConfig(navigator=True))
    ball, wide = [], []
    for i in range(10):
        case = make_case(9302, i, cfg)
        assert np.prod(frames.voxel_sizes(case.affine)) ** (1 / 3) >= COARSE_VOXEL_MM
        brain_ml = true_brain_ml(case)
        radius = equivalent_radius(brain_ml)
        start = case.rotation_ras @ rotation("z", 10.0) @ rotation("y", 8.0)
        centre = case.com_ras + 2.0
        cube, sp = local_cube(case.image.astype(np.float32), case.affine, centre, start, radius, SagittalConfig())
        true_plane = Plane(start.T @ case.rotation_ras[:, 0], float(case.rotation_ras[:, 0] @ (case.com_ras - centre)),
                           0.0)
        for out, precise_radius in ((ball, 1.0), (wide, COARSE_PRECISE_RADIUS)):
            plane = MirrorSearch(cube, sp, radius, precise_radius).polish(true_plane, precise=True)
            out.append(_x_error_deg(start @ plane.normal, case.rotation_ras))
    assert np.median(wide) < 4.5 and max(wide) < 10.0, np.round(wide, 1)
    assert np.mean(wide) < np.mean(ball) - 0.5, (np.round(wide, 1), np.round(ball, 1))


@pytest.fixture(scope="module")
def refiner():
    from E3PoseLogic.checkpoints import load_refiner
    from E3PoseLogic.models import default_model

    spec = default_model()
    if spec.refiner is None:
        pytest.skip("the bundled model has no refinement network")
    return load_refiner(spec.refiner)[0]


def _refine_heads(heads, refiner, turn, centre_offset, volume_factor=1.0):
    """Each head refined from its true pose turned by ``turn`` (about its canonical axes) and a centre
    ``centre_offset`` mm off, told ``volume_factor`` times its brain volume -> [(refinement, start, case)]."""
    from E3PoseLogic.refine import refine_pose

    out = []
    for case, brain_ml in heads:
        r0 = case.rotation_ras @ turn
        ref = refine_pose(refiner, case.image.astype(np.float32), case.affine, case.com_ras + centre_offset, r0,
                          brain_ml * volume_factor)
        out.append((ref, r0, case))
    return out


TURN_25 = rotation("x", 15.0) @ rotation("y", -15.0) @ rotation("z", 12.0)


@pytest.mark.parametrize("start", ["25deg", "180x", "180y", "180z"])
def test_refinement_recovers_the_pose(heads, refiner, start):
    """25 deg off: back to a few degrees; 180 deg about a canonical axis: the right hypothesis (within 10 deg).

    Measured with the bundled refiner on these heads (two passes): 25 deg -> 0.4 to 4.1 deg (median 1.3; one pass:
    0.7 to 4.0, median 2.4); every 180 deg start -> 0.4 to 4.0 deg (median 0.8). The issue's goal for the 25 deg
    start is 2 deg: met on 4 heads of 6 and on the median.
    """
    from E3PoseLogic.refine import PASSES
    from E3PoseLogic.rotation import geodesic_deg

    turn = {"25deg": TURN_25, "180x": rotation("x", 180.0), "180y": rotation("y", 180.0),
            "180z": rotation("z", 180.0)}[start]  # a turn about a canonical axis of the head
    assert abs(geodesic_deg(np.eye(3), turn) - (180.0 if start != "25deg" else 25.0)) < 2.0
    errors, centre_errors = [], []
    for ref, r0, case in _refine_heads(heads, refiner, turn, np.array([2.0, -1.5, 1.0])):  # 2.7 mm off
        assert np.linalg.det(ref.rotation) == pytest.approx(1.0, abs=1e-9)
        assert ref.info["angle_moved_deg"] == pytest.approx(geodesic_deg(r0, ref.rotation), abs=1e-6)
        errors.append(geodesic_deg(ref.rotation, case.rotation_ras))
        centre_errors.append(np.linalg.norm(ref.translation - case.com_ras))
        assert [p["hypothesis"] for p in ref.info["passes"]] and len(ref.info["passes"]) == PASSES
    errors = np.round(errors, 1)
    assert max(errors) < (5.0 if start == "25deg" else 10.0), errors
    assert np.median(errors) < (2.5 if start == "25deg" else 3.5), errors
    assert np.median(centre_errors) < 2.0, np.round(centre_errors, 2)  # from 2.7 mm


def test_refinement_holds_when_the_brain_volume_is_a_third(heads, refiner):
    """On real anatomy the U-Net often finds only part of the brain (on the transfer set: 64 % of its volume in the
    median, under 60 % in 4 volumes of 10), so the slabs are scaled to a brain too small and centred off it.
    Started 25 deg and 5 mm off with a third of the true volume, the bundled refiner ends 3.9 to 9.8 deg off on
    these heads (median 5.3; 0.4 to 4.1 deg with the true volume), centre 1.4 to 3.3 mm (median 2.2). A guard
    against losing this, not a goal: a refiner trained with --scale-range 0.55 1.15 got 0.3 to 7.1 deg (median 2.2,
    one pass) here but was not shipped (docs/accuracy_history.md: it reads real anatomy worse)."""
    from E3PoseLogic.rotation import geodesic_deg

    runs = _refine_heads(heads, refiner, TURN_25, np.array([3.0, -3.0, 2.5]), volume_factor=1.0 / 3.0)  # 4.9 mm off
    errors = np.round([geodesic_deg(ref.rotation, case.rotation_ras) for ref, _, case in runs], 1)
    centre_errors = [np.linalg.norm(ref.translation - case.com_ras) for ref, _, case in runs]
    assert max(errors) < 15.0, errors
    assert np.median(errors) < 9.0, errors
    assert np.median(centre_errors) < 3.5, np.round(centre_errors, 2)


def test_voxel_rotation_inverts_world_rotation():
    from E3PoseLogic.rotation import voxel_rotation, world_rotation

    r = rotation("x", 30.0) @ rotation("z", -70.0)
    for d in (rotation("y", 20.0), rotation("y", 20.0) @ np.diag([-1.0, 1.0, 1.0])):
        rv = voxel_rotation(world_rotation(r, d), d)
        np.testing.assert_allclose(rv, r, atol=1e-12)
        assert np.linalg.det(world_rotation(rv, d)) == pytest.approx(1.0)


def test_training_samples_follow_the_handedness_rule(head):
    """Seen from the other side of the plane, the slab shows e_y, e_z as a left-handed pair (e_x = e_y x e_z)."""
    from E3PoseLogic.networks.sagittal import SagittalConfig
    from E3PoseLogic.refine import equivalent_radius, local_cube
    from E3PoseLogic.training.refiner_trainer import draw_sample

    case, brain_ml = head
    cfg = SagittalConfig()
    radius = equivalent_radius(brain_ml)
    cube, sp = local_cube(case.image.astype(np.float32), case.affine, case.com_ras, case.rotation_ras, radius, cfg)
    sides = set()
    for seed in range(8):
        slab, t = draw_sample(cube, sp, radius, np.zeros(3), cfg, np.random.default_rng(seed))
        assert slab.shape == (len(cfg.offsets), cfg.size, cfg.size) and np.isfinite(slab).all()
        np.testing.assert_allclose([np.hypot(*t[:2]), np.hypot(*t[2:4])], 1.0, atol=0.02)  # tilt: nearly in-plane
        assert abs(t[:2] @ t[2:4]) < 0.1  # e_y and e_z stay perpendicular in the slab
        sides.add(int(np.sign(t[0] * t[3] - t[1] * t[2])))
        a, b = draw_sample(cube, sp, radius, np.zeros(3), cfg, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, slab)  # deterministic per seed
        np.testing.assert_array_equal(b, t)
    assert sides == {-1, 1}  # both faces of the plane are drawn


def test_slab_scale_range_covers_a_wrong_brain_volume():
    """--scale-range: half the slabs anywhere in the range (log-uniform), the other half near the true size."""
    from E3PoseLogic.training.refiner_trainer import slab_radius

    rng = np.random.default_rng(0)
    r = np.array([slab_radius(30.0, rng, scale_range=(0.45, 0.6)) for _ in range(2000)]) / 30.0
    wide = (r >= 0.45) & (r <= 0.6)
    near = np.abs(np.log(r)) < 0.4
    assert wide.sum() + near.sum() == len(r) and 0.4 < wide.mean() < 0.6
    assert r[wide].min() < 0.47 and r[wide].max() > 0.58  # the range is used
    rng = np.random.default_rng(0)
    plain = np.array([slab_radius(30.0, rng) for _ in range(2000)]) / 30.0
    assert np.abs(np.log(plain)).max() < 0.4 and abs(np.std(np.log(plain)) - 0.08) < 0.01


def test_refiner_file_errors_name_the_file(tmp_path):
    from E3PoseLogic.checkpoints import load_refiner
    from E3PoseLogic.errors import CheckpointError
    from E3PoseLogic.models import default_model

    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="missing.pt.*not found"):
        load_refiner(missing)
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(CheckpointError, match="notes.pt.*text file"):
        load_refiner(text)
    spec = default_model()
    if spec.e3cnn is not None:
        with pytest.raises(CheckpointError, match="e3cnn.pt.*not a refinement-network checkpoint"):
            load_refiner(spec.e3cnn)


@pytest.fixture(scope="module")
def small_random_model(tmp_path_factory):
    """Native random-weight U-Net and E3-CNN files of the fast sizes: checkpoints without a refinement network."""
    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.models import random_networks
    from E3PoseLogic.networks.config import E3CNNConfig, UNetConfig

    d = tmp_path_factory.mktemp("model")
    unet, _, e3cnn, _ = random_networks(
        unet_config=UNetConfig(input_size=64, spacing_mm=6.0, n_feat=8),
        e3cnn_config=E3CNNConfig(mult=1, n_downsample=2, lmax=2, crop_size=16, parity_exact_pool=True))
    save_native(d / "u.pt", unet, "unet")
    save_native(d / "e.pt", e3cnn, "e3cnn")
    return d


def test_why_a_model_has_no_refinement_is_said(small_random_model):
    """A user's own E3-CNN is not paired with the bundled refinement unasked (it learned the bundled model's
    canonical frame), and the message says so and how to pair them, instead of blaming published checkpoints."""
    from _support import require_fixtures
    from E3PoseLogic import models
    from E3PoseLogic.errors import E3PoseError
    from E3PoseLogic.pipeline import Pipeline

    own = Pipeline.from_files(e3cnn_path=small_random_model / "e.pt", device="cpu")
    assert own.refiner is None
    if models.default_model().refiner is not None:
        assert "go with the bundled E3-CNN only" in own.no_refiner_why and "--judge" in own.no_refiner_why
        with pytest.raises(E3PoseError, match="go with the bundled E3-CNN only"):
            own.refine_mode("on")
    both = Pipeline.from_files(small_random_model / "u.pt", small_random_model / "e.pt", device="cpu")
    assert both.no_refiner_why == "none was given (--refiner)"
    published = Pipeline.from_files(small_random_model / "u.pt", require_fixtures("e3cnn_random.pth") /
                                    "e3cnn_random.pth", device="cpu")
    assert published.no_refiner_why == "published checkpoints have none"


def _infer(args, cwd):
    return run_cli("infer", *args, cwd=cwd)


def test_checkpoints_without_refiner_run_unrefined_and_say_so(small_random_model, tmp_path):
    from E3PoseLogic.cli.demo import SAMPLE_DIR

    common = [str(SAMPLE_DIR / "sample_head.nii.gz"), "--unet", str(small_random_model / "u.pt"), "--e3cnn",
              str(small_random_model / "e.pt"), "--mask-dir", str(tmp_path / "masks"), "--device", "cpu", "-q"]
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "sample_head.nii.gz").symlink_to(SAMPLE_DIR / "sample_head_label.nii.gz")
    auto = _infer(common + ["-o", str(tmp_path / "auto")], tmp_path)
    assert auto.returncode == 0, auto.stderr
    assert "no refinement network" in auto.stderr
    rec = json.loads((tmp_path / "auto" / "sample_head.json").read_text())
    assert rec["confidence"]["refinement"]["applied"] is False
    assert "no refinement network" in rec["confidence"]["refinement"]["reason"]
    assert rec["network_rotation_voxel"] == rec["rotation_voxel"]  # nothing refined: the two poses are one
    on = _infer(common + ["-o", str(tmp_path / "on"), "--refine", "on"], tmp_path)
    assert on.returncode != 0 and "--refine on" in on.stderr and "no refinement network" in on.stderr
    assert not (tmp_path / "on" / "sample_head.json").exists()


def test_refine_choice_is_checked():
    from E3PoseLogic.refine import check_refine

    assert check_refine(None) == "auto" and check_refine("ON") == "on"
    with pytest.raises(ValueError, match="auto, on, off"):
        check_refine("maybe")
    from E3PoseLogic.refine import refine_pose

    with pytest.raises(ValueError, match="passes must be at least 1, not 0"):
        refine_pose(None, np.zeros((4, 4, 4), np.float32), np.eye(4), np.zeros(3), np.eye(3), 100.0, passes=0)


def test_train_refiner_writes_a_loadable_network_and_resumes(tmp_path):
    """The command end to end on two synthetic volumes: a native checkpoint that load_refiner accepts."""
    from E3PoseLogic.checkpoints import load_refiner

    data, out = tmp_path / "data", tmp_path / "run"
    run = lambda *a: run_cli(*a, cwd=tmp_path)  # noqa: E731
    r = run("synth", data, "--n", 2, "--seed", 5, "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    args = ["train-refiner", data / "images", data / "labels", data / "poses.csv", out, "--batch-size", 2]
    r = run(*args, "--steps", 3)
    assert r.returncode == 0, r.stderr
    net, info = load_refiner(out / "refiner.pt")
    assert info["steps"] == 3 and info["n_volumes"] == 2
    r = run(*args, "--steps", 5, "--resume")
    assert r.returncode == 0, r.stderr
    _, info2 = load_refiner(out / "refiner.pt")
    assert info2["steps"] == 5
    first = [p.detach().clone() for p in net.parameters()]
    assert any(not np.array_equal(a.numpy(), b.detach().numpy())
               for a, b in zip(first, load_refiner(out / "refiner.pt")[0].parameters()))
    r = run(*args, "--steps", 2, "--scale-range", 0.6, 1.1, "--init", out / "refiner.pt")
    assert r.returncode == 0, r.stderr
    assert load_refiner(out / "refiner.pt")[1]["scale_range"] == [0.6, 1.1]
    bad = run(*args, "--steps", 2, "--scale-range", 1.2, 0.8)
    assert bad.returncode == 2 and "--scale-range" in bad.stderr
    bad = run("train-refiner", data / "images", data / "labels", tmp_path / "nothing.csv", out)
    assert bad.returncode == 2 and "nothing.csv: cannot read" in bad.stderr and "Traceback" not in bad.stderr


def test_pipeline_keeps_both_poses_and_a_given_masks_centre(refiner):
    """With the bundled model the sample is refined; the network pose is kept; a given mask's centre is kept."""
    from E3PoseLogic.cli.demo import SAMPLE_DIR
    from E3PoseLogic.outputs import result_record
    from E3PoseLogic.pipeline import Pipeline
    from E3PoseLogic.volume_io import load_mask, load_volume

    pipe = Pipeline.from_files(device="cpu")
    assert pipe.refiner is not None
    array, affine = load_volume(SAMPLE_DIR / "sample_head.nii.gz")
    mask = load_mask(SAMPLE_DIR / "sample_head_label.nii.gz", affine, array.shape)
    res = pipe.run(array, affine, mask=mask)
    ref = res.confidence["refinement"]
    assert ref["applied"] and ref["centre_moved_mm"] == 0.0
    np.testing.assert_allclose(res.translation, res.network_translation)
    assert "refine" in res.timings
    rec = json.loads(json.dumps(result_record(res), default=lambda a: np.asarray(a).tolist()))
    from E3PoseLogic.rotation import geodesic_deg

    moved = geodesic_deg(np.array(rec["network_rotation_ras"]), np.array(rec["rotation_ras"]))
    assert moved == pytest.approx(ref["angle_moved_deg"], abs=1e-6)
    off = pipe.run(array, affine, mask=mask, refine="off")
    assert off.confidence["refinement"]["applied"] is False
    # without the refinement the E3-CNN's pose is the answer, pooled from its turned readings (turned_reading);
    # with it, the refinement starts from the first reading
    turned = off.confidence["network_turned_readings"]
    assert res.confidence["network_turned_readings"] is None and turned["turned_readings"] == 6
    assert geodesic_deg(off.rotation, res.network_rotation) == pytest.approx(turned["moved_deg"], abs=1e-6)
    pipe.turned_readings = 0
    try:
        plain = pipe.run(array, affine, mask=mask, refine="off")
    finally:
        pipe.turned_readings = 6
    assert plain.confidence["network_turned_readings"] is None
    np.testing.assert_allclose(plain.rotation, res.network_rotation, atol=1e-9)


def test_plane_logit_training_from_a_refiner(tmp_path):
    """--plane-logit --init: a 7-output network that starts from the given refiner's weights (the old output rows
    copied, the new one fresh) and learns; a missing --init file is an error naming it."""
    import torch

    from E3PoseLogic.checkpoints import load_refiner, save_native
    from E3PoseLogic.networks.sagittal import SagittalConfig, SagittalNet

    torch.manual_seed(0)
    base = SagittalNet(SagittalConfig(n_feat=4))
    save_native(tmp_path / "base.pt", base, "refiner", {"trained_on": "test"})
    data, out = tmp_path / "data", tmp_path / "run"
    run = lambda *a: run_cli(*a, cwd=tmp_path)  # noqa: E731
    r = run("synth", data, "--n", 2, "--seed", 5, "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    args = ["train-refiner", data / "images", data / "labels", data / "poses.csv", out, "--batch-size", 4,
            "--plane-logit"]
    bad = run(*args, "--steps", 1, "--init", tmp_path / "missing.pt")
    assert bad.returncode == 2 and "missing.pt" in bad.stderr and "Traceback" not in bad.stderr
    # the CLI builds the default width; give it a checkpoint of that width
    base = SagittalNet(SagittalConfig())
    save_native(tmp_path / "base.pt", base, "refiner", {"trained_on": "test"})
    r = run(*args, "--steps", 1, "--init", tmp_path / "base.pt")
    assert r.returncode == 0, r.stderr
    net, info = load_refiner(out / "refiner.pt")
    assert net.config.plane_logit and info["init"].endswith("base.pt") and info["wrong_plane_fraction"] == 0.5
    assert net.head[-1].weight.shape[0] == 7
    # init_from itself: the six old output rows and every other weight copied, the seventh row left as it was
    from E3PoseLogic.training.refiner_trainer import init_from

    fresh = SagittalNet(SagittalConfig(plane_logit=True))
    row7 = fresh.head[-1].weight[6].detach().clone()
    init_from(fresh, tmp_path / "base.pt")
    assert torch.equal(fresh.head[-1].weight[:6], base.head[-1].weight)
    assert torch.equal(fresh.head[-1].weight[6], row7)
    assert torch.equal(fresh.features[0][0].weight, base.features[0][0].weight)


def test_plane_logit_prefers_the_mid_sagittal_plane(heads, refiner):
    """The bundled refiner's plane logit (when it has one) is higher on each head's mid-sagittal plane than on its
    coronal and axial planes: the cue that separates a head's left-right symmetry from its front-back one."""
    from E3PoseLogic.refine import Plane, equivalent_radius, local_cube, read_plane

    if not refiner.config.plane_logit:
        pytest.skip("the bundled refinement network has no plane logit")
    margins = []
    for case, brain_ml in heads:
        radius = equivalent_radius(brain_ml)
        cube, sp = local_cube(case.image.astype(np.float32), case.affine, case.com_ras, case.rotation_ras, radius,
                              refiner.config)
        logit = {name: read_plane(refiner, cube, sp, radius, Plane(np.eye(3)[i], 0.0, 0.0), n_turns=4).plane_logit
                 for i, name in enumerate(("sagittal", "coronal", "axial"))}
        margins.append(logit["sagittal"] - max(logit["coronal"], logit["axial"]))
    assert min(margins) > 0, np.round(margins, 2)
