"""The standard (non-equivariant) 3D CNN baseline: output layout, checkpoints through the E3-CNN loader and the
pipeline, training via ``e3pose train-e3cnn --arch standard``, and the ``--pose-range`` training poses.

Tiny networks and 4 tiny synthetic volumes: the whole file stays well under half a minute on 2 CPU cores.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TINY = ["--arch", "standard", "--n-downsample", "2", "--width", "4", "--crop-size", "16", "--unet-size", "32",
        "--unet-spacing", "12"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """4 tiny volumes written by the ``e3pose synth`` command (images, labels, poses.csv)."""
    from E3PoseLogic.cli import main

    out = tmp_path_factory.mktemp("synth_std")
    assert main(["synth", str(out), "--n", "4", "--seed", "7", "--size-mm", "220", "--voxel-mm", "4",
                 "--max-dim", "64", "--val-fraction", "0"]) == 0
    assert len(list((out / "images").glob("*.nii*"))) == 4
    return out


def _net(seed=0, **cfg):
    from E3PoseLogic.networks.standard_cnn import StandardCNN, StandardCNNConfig

    torch.manual_seed(seed)
    return StandardCNN(StandardCNNConfig(**{"crop_size": 16, **cfg})).eval()


def _randomise(net, seed=1):
    """Weights far from the near-identity start, so the outputs depend on the input and on every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


# ------------------------------------------------------------------------------------------------- network
def test_forward_layout_is_a_proper_rotation():
    from E3PoseLogic.rotation import axes_to_rotation

    net = _randomise(_net())
    x = torch.rand(3, 1, 16, 14, 12)  # crops need not be cubic
    with torch.no_grad():
        y = net(x)
    assert y.shape == (3, 9) and y.dtype == torch.float32
    assert not torch.allclose(y[0], y[1], atol=1e-4)  # depends on the input
    for row in y.numpy().astype(np.float64):
        p, a, b = row.reshape(3, 3)
        m = np.stack([p, a, b], axis=1)
        np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-5)  # orthonormal (Gram-Schmidt)
        np.testing.assert_allclose(p, np.cross(a, b), atol=1e-5)  # p = a x b
        r, info = axes_to_rotation(p, a, b)
        assert not info["flipped"] and abs(np.linalg.det(r) - 1.0) < 1e-9
        np.testing.assert_allclose(r, m, atol=1e-5)  # the pipeline's rotation is the network's frame itself
    with pytest.raises(ValueError, match="unpooled"):
        net(x, pool=False)
    # size within twice the bundled E3-CNN's (29,325 parameters) at the default width (51,428: the 3^3-pooled head)
    n = sum(p.numel() for p in _net().parameters())
    assert 20_000 < n < 60_000, n


def test_gram_schmidt_recovers_a_rotation_from_perturbed_columns():
    from scipy.spatial.transform import Rotation

    from E3PoseLogic.networks.standard_cnn import gram_schmidt_axes

    r = Rotation.from_euler("xyz", [40, -70, 130], degrees=True).as_matrix()  # columns e_x, e_y, e_z
    six = torch.tensor(np.concatenate([2.0 * r[:, 1], 0.5 * r[:, 2] + 0.3 * r[:, 1]]), dtype=torch.float64)[None]
    out = gram_schmidt_axes(six)[0].numpy().reshape(3, 3)
    np.testing.assert_allclose(out, r.T, atol=1e-12)  # rows p, a, b = e_x, e_y, e_z


def test_training_loss_has_finite_gradients_and_matches_the_geodesic_loss():
    """The Gram-Schmidt frame is orthonormal: the SVD route has no finite gradient there; the frame loss does and
    gives the same value (the SVD of an orthonormal proper frame is the frame itself)."""
    from scipy.spatial.transform import Rotation

    from E3PoseLogic.training.losses import frame_geodesic_loss, geodesic_loss

    net = _net(width=4)
    net.train()
    x = torch.rand(2, 1, 16, 16, 16)
    r = torch.tensor(Rotation.from_euler("xyz", [[20, 70, -40], [100, -30, 10]], degrees=True).as_matrix(),
                     dtype=torch.float32)
    out = net(x)
    loss = frame_geodesic_loss(out, r)
    assert float(loss.detach()) == pytest.approx(float(geodesic_loss(out.detach(), r)), abs=1e-4)
    assert float(loss.detach()) > 0.3  # a far-off target: a clearly positive angle
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_pipeline(tmp_path):
    from E3PoseLogic.checkpoints import load_e3cnn, load_refiner, load_unet, save_native
    from E3PoseLogic.errors import CheckpointError
    from E3PoseLogic.networks.standard_cnn import StandardCNN
    from E3PoseLogic.pipeline import Pipeline
    from E3PoseLogic.synth import AcquisitionConfig, SynthConfig
    from E3PoseLogic.synth.dataset import make_case

    net = _randomise(_net(width=4))
    path = tmp_path / "std.pt"
    save_native(path, net, "standard_cnn", {"trained_on": "test"})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["kind"] == "standard_cnn"
    loaded, info = load_e3cnn(path)
    assert isinstance(loaded, StandardCNN) and not loaded.training
    assert info["architecture"] == "standard-cnn" and info["equivariant"] is False
    assert info["format"] == "native" and info["config"]["width"] == 4 and info["trained_on"] == "test"
    x = torch.rand(1, 1, 16, 16, 15)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert not torch.allclose(loaded(x), _net(width=4)(x))  # a fresh network is not what was saved
    # the kind is checked both ways, and a wrong-kind file is named in the error
    with pytest.raises(ValueError, match="standard_cnn"):
        save_native(tmp_path / "wrong.pt", net, "e3cnn")
    for loader in (load_unet, load_refiner):
        with pytest.raises(CheckpointError, match=r"std\.pt.*standard_cnn"):
            loader(path)

    # drop-in for the E3-CNN: the bundled U-Net, then the standard CNN's rotation
    acq = AcquisitionConfig(size_mm=(220.0,), voxel_mm=(4.0,), max_dim=64)
    case = make_case(5, 0, SynthConfig(acquisition=acq))
    pipe = Pipeline.from_files(unet_path=None, e3cnn_path=path, device="cpu")
    assert isinstance(pipe.e3cnn, StandardCNN)
    res = pipe.run(case.image.astype(np.float32), case.affine)
    assert max(res.crop.shape) == 16
    assert res.provenance["e3cnn"]["architecture"] == "standard-cnn"
    assert res.provenance["e3cnn"]["equivariant"] is False
    with torch.no_grad():
        expected = net(torch.from_numpy(np.ascontiguousarray(res.crop, np.float32))[None, None])[0].numpy()
    np.testing.assert_allclose(res.network_axes, expected.reshape(3, 3), atol=1e-5)
    assert abs(np.linalg.det(res.rotation) - 1.0) < 1e-6


def test_e3cnn_checkpoint_info_says_equivariant(tmp_path):
    from _support import small_e3cnn

    from E3PoseLogic.checkpoints import load_e3cnn, save_native

    save_native(tmp_path / "e3.pt", small_e3cnn(n_downsample=1, crop_size=8), "e3cnn", {})
    _, info = load_e3cnn(tmp_path / "e3.pt")
    assert info["architecture"] == "e3cnn" and info["equivariant"] is True


# ------------------------------------------------------------------------------------------------- training
def test_train_standard_via_cli_then_infer_and_resume(synth_dir, tmp_path):
    from E3PoseLogic.checkpoints import load_e3cnn
    from E3PoseLogic.cli import main
    from E3PoseLogic.networks.standard_cnn import StandardCNN
    from E3PoseLogic.training.common import make_optimizer, read_metrics, resume_state

    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2 + [str(synth_dir / "poses.csv")]
    out = tmp_path / "std"
    common = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--quiet",
              "--device", "cpu", "--optimizer", "adam", "--lr", "0.01", "--seed", "2"]
    proc = subprocess.run([sys.executable, "-m", "E3PoseLogic", "train-e3cnn", *pos, str(out), *TINY, *common],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    prov = raw["provenance"]
    assert raw["kind"] == prov["kind"] == "standard_cnn"
    assert prov["arch"] == "standard" and prov["equivariant"] is False
    assert prov["loss"].startswith("geodesic") and prov["pose_range_deg"] is None
    assert prov["n_train"] == 4 and "synthetic" in prov["trained_on"]
    row = read_metrics(out / "metrics.csv")[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_median_rot_deg"])
    assert "val_any_pose_median_rot_deg" not in row
    assert json.loads((out / "train_config.json").read_text())["options"]["loss"] == "geodesic"
    model, info = load_e3cnn(out / "best.pt")
    assert isinstance(model, StandardCNN) and info["arch"] == "standard"
    # e3pose infer --e3cnn takes it (bundled U-Net), and the output record says what ran
    img = sorted((synth_dir / "images").glob("*.nii*"))[0]
    assert main(["infer", str(img), "-o", str(tmp_path / "inf"), "--e3cnn", str(out / "best.pt"), "--device", "cpu",
                 "-q"]) == 0
    rec = json.loads(next((tmp_path / "inf").glob("*.json")).read_text())
    assert rec["model"]["e3cnn"]["architecture"] == "standard-cnn" and rec["model"]["e3cnn"]["equivariant"] is False
    # the two steps moved the weights away from the seeded start
    torch.manual_seed(2)
    start = StandardCNN(model.config).state_dict()
    assert max(float((raw["state_dict"][k] - start[k]).abs().max()) for k in start
               if start[k].is_floating_point()) > 1e-4

    # --resume continues; resuming it as another kind (an E3-CNN run on this folder) is refused
    assert main(["train-e3cnn", *pos, str(out), *TINY, *common, "--epochs", "2", "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1, 2]
    fresh = StandardCNN(model.config)
    with pytest.raises(RuntimeError, match="'standard_cnn' checkpoint but this run trains a 'e3cnn'"):
        resume_state(out / "last.pt", fresh, make_optimizer(fresh, "adam", 1e-3, 0.0), kind="e3cnn")
    # the per-voxel loss needs an unpooled map: refused for the standard CNN
    assert main(["train-e3cnn", *pos, str(tmp_path / "x"), *TINY, *common, "--loss", "axes"]) == 2
    assert main(["train-e3cnn", *pos, str(tmp_path / "x"), *TINY, *common, "--pose-range", "30",
                 "--no-augment"]) == 2


def test_pose_range_training_records_and_validates_in_range(synth_dir, tmp_path):
    from E3PoseLogic.cli import main
    from E3PoseLogic.training.common import read_metrics

    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2 + [str(synth_dir / "poses.csv")]
    out = tmp_path / "pr"
    assert main(["train-e3cnn", *pos, str(out), *TINY, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size",
                 "1", "--threads", "1", "--quiet", "--device", "cpu", "--pose-range", "30"]) == 0
    prov = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["provenance"]
    assert prov["pose_range_deg"] == 30.0 and "+-30 deg" in prov["rotation_sampling"]
    row = read_metrics(out / "metrics.csv")[0]
    # in-range and own-pose validation are different case sets, hence different errors
    assert math.isfinite(row["val_any_pose_median_rot_deg"]) and math.isfinite(row["val_median_rot_deg"])
    assert row["val_any_pose_loss"] != row["val_loss"]

    # --no-intensity-augment keeps the pose range and drops the intensity chain (--no-augment would drop both)
    out2 = tmp_path / "pr_rot_only"
    assert main(["train-e3cnn", *pos, str(out2), *TINY, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size",
                 "1", "--threads", "1", "--quiet", "--device", "cpu", "--pose-range", "30",
                 "--no-intensity-augment"]) == 0
    prov2 = torch.load(out2 / "best.pt", map_location="cpu", weights_only=True)["provenance"]
    assert prov2["augmentation"] == "rotations only (--no-intensity-augment)"
    assert isinstance(prov["augmentation"], dict) and prov2["pose_range_deg"] == 30.0


def test_rotation_only_draw_is_the_turned_crop():
    """Without the intensity chain a pose-range draw is exactly the crop turned into the range."""
    from E3PoseLogic.training import data

    rng = np.random.default_rng(0)
    x = rng.random((12, 12, 12)).astype(np.float32)
    m = (x > 0.5).astype(np.uint8)
    case = data.CropCase("c", x, m, 4.0, np.eye(3))
    got, target = data.augment_crop(case, np.random.default_rng(7), 180.0, intensity=False, pose_range=30)
    turned = data.pose_in_range(case, np.random.default_rng(7), 30)
    np.testing.assert_array_equal(got, turned.x)
    np.testing.assert_allclose(target, turned.r_vc)
    with_chain, _ = data.augment_crop(case, np.random.default_rng(7), 180.0, intensity=True, pose_range=30)
    assert not np.allclose(with_chain, got)


# ------------------------------------------------------------------------------------------------- pose range
def _blob_case(r_vc, n=24):
    """A crop with one small bright blob at canonical offset c from the centre: it sits at array offset R_vc^T c."""
    from E3PoseLogic.training.data import CropCase

    c_can = np.array([6.0, 0.0, 0.0]) + np.array([0.0, 3.0, 0.0])  # not on any axis
    centre = (n - 1) / 2.0
    pos = centre + r_vc.T @ c_can
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    x = np.exp(-((ijk - pos) ** 2).sum(-1) / (2 * 1.5 ** 2)).astype(np.float32)
    return CropCase("blob", x, (x > 0.1).astype(np.uint8), 2.0, r_vc), c_can, centre


def test_pose_range_targets_stay_in_range_and_move_the_content():
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    from E3PoseLogic.training.data import augment_crop, draw_rng

    r_vc = Rotation.from_euler("xyz", [150, -60, 100], degrees=True).as_matrix()  # far from the identity
    case, c_can, centre = _blob_case(r_vc)
    in_range, free = [], []
    for i in range(40):
        x, target = augment_crop(case, draw_rng(0, 0, i), 180.0, intensity=False, pose_range=90.0)
        in_range.append(Rotation.from_matrix(target).as_euler("XYZ", degrees=True))  # target = Rx Ry Rz
        if i < 6:  # the content moved with the target: the blob is where the target pose puts it
            com = np.array(ndimage.center_of_mass(x))
            np.testing.assert_allclose(com, centre + target.T @ c_can, atol=0.5)
        _, t_free = augment_crop(case, draw_rng(0, 0, i), 180.0, intensity=False)
        free.append(Rotation.from_matrix(t_free).as_euler("XYZ", degrees=True))
    in_range, free = np.abs(in_range), np.abs(free)
    assert in_range.max() <= 90.0 + 1e-6, in_range.max(axis=0)
    assert in_range.max() > 60.0  # the range is used, not just the identity
    assert free.max() > 100.0  # without --pose-range the targets go anywhere (the check above can fail)
    # deterministic: the same draw gives the same crop and target
    a = augment_crop(case, draw_rng(3, 1, 5), 180.0, intensity=False, pose_range=90.0)
    b = augment_crop(case, draw_rng(3, 1, 5), 180.0, intensity=False, pose_range=90.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # 0 degrees: every head turned exactly to the reference orientation
    _, t0 = augment_crop(case, draw_rng(0, 0, 0), 180.0, intensity=False, pose_range=0.0)
    np.testing.assert_allclose(t0, np.eye(3), atol=1e-12)
