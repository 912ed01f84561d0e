"""Training: losses on hand-made cases, a few optimiser steps lower the loss, checkpoints round-trip, resume.

Tiny networks on 4 tiny synthetic cases so the whole file stays well under a minute and a half on 2 CPU cores.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("e3nn")

UNET_TINY = ["--n-feat", "4", "--levels", "3", "--unet-size", "32", "--unet-spacing", "12"]
E3_TINY = ["--mult", "1", "--n-downsample", "2", "--lmax", "2", "--crop-size", "16", "--unet-size", "32",
           "--unet-spacing", "12"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from E3PoseLogic.synth import AcquisitionConfig, SynthConfig
    from E3PoseLogic.synth.dataset import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    acq = AcquisitionConfig(size_mm=(220.0,), voxel_mm=(4.0,), max_dim=64)
    generate_dataset(out, 4, seed=7, cfg=SynthConfig(acquisition=acq, val_fraction=0.0))
    return out


def _args(kind, d, outdir, extra):
    from E3PoseLogic.cli import build_parser

    pos = [str(d / "images"), str(d / "labels"), str(d / "images"), str(d / "labels")]
    if kind == "e3cnn":
        pos.append(str(d / "poses.csv"))
    argv = [f"train-{kind}", *pos, str(outdir), "--threads", "1", "--quiet", *extra]
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------- losses
def _rot(axis, deg):
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler(axis, deg, degrees=True).as_matrix()


def test_voxel_axes_loss_perfect_and_sign_free():
    from E3PoseLogic.training.losses import voxel_axes_loss

    r = torch.tensor(_rot("xyz", [30, -50, 110]), dtype=torch.float32)[None]  # rows e_x, e_y, e_z
    out = torch.cat([r[0, 0], r[0, 1], r[0, 2]]).reshape(1, 9, 1, 1, 1).expand(1, 9, 2, 2, 2) * 3.0
    assert float(voxel_axes_loss(out, r)) < 1e-5
    flipped = out.clone()
    flipped[:, :3] = -flipped[:, :3]  # -e_x: the pseudovector's sign is free
    assert float(voxel_axes_loss(flipped, r)) == pytest.approx(float(voxel_axes_loss(out, r)), abs=1e-6)
    wrong = out.clone()
    wrong[:, 3:6] = -wrong[:, 3:6]  # e_y reversed: L1 = mean |2 e_y| = 2/3 * sum|e_y|
    expected = 2.0 / 3.0 * float(r[0, 1].abs().sum())
    assert float(voxel_axes_loss(wrong, r)) == pytest.approx(expected, rel=1e-4)
    # p orthogonal to e_x: |p x e_x| = 1, weighted 0.5
    perp = out.clone()
    perp[:, :3] = out[:, 3:6]
    assert float(voxel_axes_loss(perp, r)) == pytest.approx(0.5, abs=1e-5)


def test_geodesic_loss():
    from E3PoseLogic.training.losses import geodesic_angle, geodesic_loss

    r = torch.tensor(_rot("xyz", [10, 20, 30]), dtype=torch.float32)[None]
    pooled = torch.cat([r[0, 0], r[0, 1], r[0, 2]])[None]
    assert float(geodesic_loss(pooled, r)) < 1e-4
    assert float(geodesic_loss(torch.cat([-r[0, 0], r[0, 1], r[0, 2]])[None], r)) < 1e-4  # sign of p fixed by det
    q = torch.tensor(_rot("z", 90), dtype=torch.float32)[None]
    assert float(geodesic_angle(torch.eye(3)[None], q)) == pytest.approx(math.pi / 2, abs=1e-5)
    r90 = r @ q.transpose(1, 2)  # the target rotated by 90 degrees
    pooled90 = torch.cat([r90[0, 0], r90[0, 1], r90[0, 2]])[None]
    assert float(geodesic_loss(pooled90, r)) == pytest.approx(math.pi / 2, abs=1e-4)
    pooled.requires_grad_(True)
    geodesic_loss(pooled + 0.1 * torch.randn_like(pooled), r).backward()
    assert torch.isfinite(pooled.grad).all()


def test_unet_loss_and_dice():
    from E3PoseLogic.training.losses import hard_dice, unet_loss

    y = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    y[0, 2:6, 2:6, 2:6] = 1
    y[0, 6:, 6:, 6:] = 2
    perfect = torch.nn.functional.one_hot(y, 3).permute(0, 4, 1, 2, 3).float() * 50.0
    assert float(unet_loss(perfect, y)) < 1e-3
    assert float(unet_loss(torch.zeros(1, 3, 8, 8, 8), y)) > 0.5
    assert hard_dice(y.numpy(), y.numpy(), 1) == 1.0
    assert hard_dice(np.zeros((4, 4)), np.ones((4, 4)), 1) == 0.0


# ------------------------------------------------------------------------------------------------- training
def _fixed_batch_loss(task, batch, device="cpu"):
    task.model.train()  # batch statistics: comparable before and after
    with torch.no_grad():
        return float(task.train_loss(task.model, batch, torch.device(device)))


def test_unet_steps_lower_loss(synth_dir, tmp_path):
    from E3PoseLogic.training import data
    from E3PoseLogic.training.common import Dist, fit
    from E3PoseLogic.training.unet_trainer import UNetTask

    args = _args("unet", synth_dir, tmp_path / "u", UNET_TINY + ["--epochs", "1", "--steps-per-epoch", "30",
                                                                 "--batch-size", "2", "--lr", "1e-2",
                                                                 "--rotation-deg", "0"])
    cache = data.cache_unet(data.list_cases(args.train_img, args.train_lab), 12.0, 32)
    torch.manual_seed(0)
    task = UNetTask(args, cache, cache[:2], "synthetic test")
    batch = task.collate(cache[:2])
    before = _fixed_batch_loss(task, batch)
    rows = fit(task, args, Dist("cpu"))
    after = _fixed_batch_loss(task, batch)
    assert after < 0.8 * before, (before, after)
    assert rows[0]["epoch"] == 1 and np.isfinite(rows[0]["val_dice_brain"])
    assert (tmp_path / "u" / "learning_curve.png").stat().st_size > 1000


def test_e3cnn_steps_lower_loss(synth_dir, tmp_path):
    from E3PoseLogic.training import data
    from E3PoseLogic.training.common import Dist, fit
    from E3PoseLogic.training.e3cnn_trainer import E3CNNTask

    # overfit one case without augmentation: the equivariant net learns slowly, augmented draws need far more steps
    args = _args("e3cnn", synth_dir, tmp_path / "e", E3_TINY + [
        "--epochs", "1", "--steps-per-epoch", "25", "--batch-size", "1", "--optimizer", "adam", "--lr", "1e-2",
        "--no-augment"])
    ann = data.read_annotations(args.annotations)
    cache = data.cache_e3cnn(data.list_cases(args.train_img, args.train_lab), ann, 12.0, 32, 0.6, 16)
    torch.manual_seed(0)
    task = E3CNNTask(args, cache[:1], cache[:1], "synthetic test")
    assert task.cfg.parity_exact_pool
    batch = task.collate([(c.x, c.r_vc) for c in cache[:1]])
    before = _fixed_batch_loss(task, batch)
    rows = fit(task, args, Dist("cpu"))
    after = _fixed_batch_loss(task, batch)
    assert after < 0.8 * before, (before, after)
    assert np.isfinite(rows[0]["val_median_rot_deg"])


def test_e3cnn_trains_on_the_cube_crop(synth_dir, tmp_path):
    """--crop-shape cube: the training crops are the inference crops (crop_size^3 about the brain's centre of
    mass, the brain mask on the same voxels) and the checkpoint tells the pipeline to crop that way."""
    from scipy import ndimage

    from E3PoseLogic.checkpoints import load_e3cnn
    from E3PoseLogic.cli import main
    from E3PoseLogic.training import data

    ann = data.read_annotations(synth_dir / "poses.csv")
    cases = data.list_cases(synth_dir / "images", synth_dir / "labels")
    cache = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "cube")
    assert len(cache) == len(cases)
    published = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16)
    for c, b in zip(cache, published):
        assert c.x.shape == c.mask.shape == (16, 16, 16) and c.x.min() == 0.0 and c.x.max() == 1.0
        np.testing.assert_allclose(ndimage.center_of_mass(c.mask), 7.5, atol=0.6)
        assert c.spacing_mm == pytest.approx(b.spacing_mm, rel=0.15)  # the same side rule as the published crop
    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    assert main(["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(tmp_path / "e"), *E3_TINY, "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--quiet", "--crop-shape",
                 "cube"]) == 0
    assert load_e3cnn(tmp_path / "e" / "best.pt")[0].config.crop_shape == "cube"


def test_crop_jitter_places_the_crop_as_an_imperfect_mask_would(synth_dir, tmp_path):
    """--centre-jitter / --scale-jitter: the cached grid reproduces the exact crop bitwise, a draw is the crop the
    pipeline's own sampler gives about the moved centre and scaled side, the run validates on both and records it."""
    from dataclasses import replace

    import torch as _torch

    from E3PoseLogic.crop import crop_input, cube_box
    from E3PoseLogic.cli import main
    from E3PoseLogic.training import data

    ann = data.read_annotations(synth_dir / "poses.csv")
    cases = data.list_cases(synth_dir / "images", synth_dir / "labels")
    exact = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "cube")
    jitter = data.CropJitter(centre_sd_mm=6.0, scale_sd=0.1)
    grid = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "cube", jitter=jitter)
    assert all(isinstance(g, data.GridCase) for g in grid) and len(grid) == len(exact)
    for g, c in zip(grid, exact):
        e = data.jittered_crop(g)
        np.testing.assert_array_equal(e.x, c.x)
        np.testing.assert_array_equal(e.mask, c.mask)
        assert e.spacing_mm == c.spacing_mm
    # one draw against the pipeline's sampler on the whole U-Net grid, about the same moved centre and side
    fid, img, lab = cases[0]
    x_unet, y = data.unet_case(img, lab, 12.0, 32)
    box = cube_box(x_unet, (y == 1).astype(np.uint8), 0.6, 16)
    g = next(g for g in grid if g.frame_id == fid)
    d, z = jitter.draw(np.random.default_rng(3), 12.0)
    drawn = data.jittered_crop(g, np.random.default_rng(3), jitter)
    want = crop_input(x_unet, replace(box, centre=box.centre + d, side=box.side * z))
    assert np.abs(d).max() > 0.1 and z != 1.0
    np.testing.assert_allclose(drawn.x, want, atol=1e-5)
    assert not np.allclose(drawn.x, data.jittered_crop(g).x)
    with pytest.raises(ValueError, match="cube"):
        data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "box", jitter=jitter)
    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    out = tmp_path / "e"
    assert main(["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(out), *E3_TINY, "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "1", "--threads", "1", "--quiet", "--crop-shape",
                 "cube", "--no-augment", "--centre-jitter", "6", "--scale-jitter", "0.1"]) == 0
    prov = _torch.load(out / "best.pt", weights_only=True)["provenance"]
    assert prov["crop_jitter"] == {"centre_sd_mm": 6.0, "scale_sd": 0.1}
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_median_rot_deg", "val_exact_median_rot_deg"} <= set(header)
    assert main(["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(tmp_path / "b"), *E3_TINY,
                 "--centre-jitter", "6", "--quiet"]) == 2


def _constant_unet(path, label):
    """A real U-Net (the tiny test grid) whose last layer answers ``label`` everywhere: its mask is known exactly."""
    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.networks.config import UNetConfig
    from E3PoseLogic.networks.unet import UNet

    net = UNet(UNetConfig(n_feat=4, n_levels=3, input_size=32, spacing_mm=12.0))
    with torch.no_grad():
        net.last_conv.weight.zero_()
        net.last_conv.bias.copy_(torch.tensor([10.0 if c == label else 0.0 for c in range(3)]))
    save_native(path, net, "unet", {"trained_on": "test: constant output"})
    return path


def test_unet_crops_place_training_crops_as_inference_does(synth_dir, tmp_path, capsys):
    """--unet-crops: a draw takes, with the given probability, the cube the pipeline's crop rule places from that
    U-Net's mask on the same grid; a U-Net that finds no brain leaves the true crop; the run records it; a U-Net on
    another grid is refused, naming the file."""
    from E3PoseLogic.cli import main
    from E3PoseLogic.crop import crop_input, cube_box
    from E3PoseLogic.training import data

    ann = data.read_annotations(synth_dir / "poses.csv")
    cases = data.list_cases(synth_dir / "images", synth_dir / "labels")
    everywhere = _constant_unet(tmp_path / "all.pt", 1)  # brain everywhere: the mask is the whole grid
    nowhere = _constant_unet(tmp_path / "none.pt", 0)  # background everywhere: no brain
    jit = data.CropJitter(unet_fraction=1.0, unet_path=str(everywhere))
    grid = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "cube", jitter=jit)
    exact = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "cube")
    fid, img, lab = cases[0]
    x_unet, _ = data.unet_case(img, lab, 12.0, 32)
    ubox = cube_box(x_unet, np.ones_like(x_unet, dtype=np.uint8), 0.6, 16)
    g, c = grid[0], exact[0]
    assert g.frame_id == c.frame_id == fid and g.unet_box is not None
    np.testing.assert_array_equal(data.jittered_crop(g).x, c.x)  # no draw: still the true mask's crop
    drawn = data.jittered_crop(g, np.random.default_rng(0), jit)
    np.testing.assert_allclose(drawn.x, crop_input(x_unet, ubox), atol=1e-5)
    assert not np.allclose(drawn.x, c.x)
    half = data.CropJitter(unet_fraction=0.5, unet_path=str(everywhere))
    picks = [np.allclose(data.jittered_crop(g, np.random.default_rng(i), half).x, c.x) for i in range(40)]
    assert 5 < sum(picks) < 35  # both kinds of crop are drawn
    none = data.cache_e3cnn(cases, ann, 12.0, 32, 0.6, 16, "cube",
                            jitter=data.CropJitter(unet_fraction=1.0, unet_path=str(nowhere)))
    assert none[0].unet_box is None
    np.testing.assert_array_equal(data.jittered_crop(none[0], np.random.default_rng(0), jit).x, c.x)

    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    run = ["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(tmp_path / "e"), *E3_TINY, "--epochs", "1",
           "--steps-per-epoch", "2", "--batch-size", "1", "--threads", "1", "--quiet", "--crop-shape", "cube",
           "--no-augment", "--unet-crops", str(everywhere), "--unet-crop-fraction", "0.25"]
    assert main(run) == 0
    prov = torch.load(tmp_path / "e" / "best.pt", weights_only=True)["provenance"]
    assert prov["crop_jitter"] == {"centre_sd_mm": 0.0, "scale_sd": 0.0, "unet_fraction": 0.25,
                                   "unet": str(everywhere)}
    capsys.readouterr()
    other = [a if a != "32" else "40" for a in run]  # --unet-size 40: not the U-Net's grid
    assert main(other) == 2
    err = capsys.readouterr().err
    assert str(everywhere) in err and "32^3 grid at 12.0 mm" in err


def test_cli_checkpoint_round_trip_and_resume(synth_dir, tmp_path):
    from E3PoseLogic.checkpoints import load_e3cnn, load_unet
    from E3PoseLogic.cli import main
    from E3PoseLogic.training.common import read_metrics

    out_u, out_e = tmp_path / "u", tmp_path / "e"
    common = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--quiet"]
    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    assert main(["train-unet", *pos, str(out_u), *UNET_TINY, *common]) == 0
    assert main(["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(out_e), *E3_TINY, *common,
                 "--loss", "geodesic"]) == 0

    # round trip: plain weights_only load, and the loaders rebuild the network the file holds: every stored
    # weight in place, and the same outputs as that network built by hand from the file's config and weights
    from E3PoseLogic.networks.config import E3CNNConfig, UNetConfig
    from E3PoseLogic.networks.e3cnn import E3CNN
    from E3PoseLogic.networks.unet import UNet

    for kind, out, loader, build, shape in (
            ("unet", out_u, load_unet, lambda c: UNet(UNetConfig.from_dict(c)), (1, 1, 32, 32, 32)),
            ("e3cnn", out_e, load_e3cnn, lambda c: E3CNN(E3CNNConfig.from_dict(c)), (1, 1, 16, 16, 16))):
        obj = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
        assert obj["kind"] == kind and "synthetic" in obj["provenance"]["trained_on"]
        assert obj["provenance"]["epochs"] == 1 and obj["provenance"]["n_train"] == 4
        for name in ("best.pt", "last.pt"):
            raw = torch.load(out / name, map_location="cpu", weights_only=True)
            loaded, info = loader(out / name)
            assert info["format"] == "native" and info["config"] == raw["config"]
            own = loaded.state_dict()
            params = dict(loaded.named_parameters())
            assert set(params) <= set(raw["state_dict"])  # every learnable weight comes from the file
            for k, v in raw["state_dict"].items():
                assert torch.equal(own[k], v), (kind, name, k)
            by_hand = build(raw["config"]).eval()
            by_hand.load_state_dict(raw["state_dict"], strict=(kind == "unet"))
            fresh = build(raw["config"]).eval()
            x = torch.rand(shape)
            with torch.no_grad():
                y = loaded(x)
                assert torch.equal(y, by_hand(x))
                assert not torch.allclose(y, fresh(x))  # a freshly initialised network is not what was saved

    # an independently saved and reloaded model gives identical outputs
    from E3PoseLogic.checkpoints import save_native
    m, _ = load_e3cnn(out_e / "best.pt")
    save_native(tmp_path / "copy.pt", m, "e3cnn", {"trained_on": "test"})
    m_copy, _ = load_e3cnn(tmp_path / "copy.pt")
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), m_copy(x), atol=0, rtol=0)

    # resume continues from the saved epoch, with the saved weights
    state = torch.load(out_e / "last.pt", map_location="cpu", weights_only=True)
    assert state["training_state"]["epoch"] == 1
    assert main(["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(out_e), *E3_TINY, *common,
                 "--loss", "geodesic", "--epochs", "2", "--resume"]) == 0
    rows = read_metrics(out_e / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert torch.load(out_e / "last.pt", weights_only=True)["training_state"]["epoch"] == 2


def test_unet_best_checkpoint_chosen_on_dice(synth_dir, tmp_path, capsys):
    """--select dice: best.pt is the epoch with the highest validation brain Dice (not the lowest loss), the choice is
    recorded, and a resume with another --select is refused, naming the file."""
    from E3PoseLogic.cli import main
    from E3PoseLogic.training.common import read_metrics

    out = tmp_path / "u"
    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    common = [*UNET_TINY, "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--quiet", "--lr", "3e-3",
              "--bn-recalibrate", "2"]
    assert main(["train-unet", *pos, str(out), *common, "--epochs", "4", "--select", "dice"]) == 0
    rows = read_metrics(out / "metrics.csv")
    dice = [float(r["val_dice_brain"]) for r in rows]
    want = 1 + int(np.argmax(dice))  # the first epoch with the highest Dice
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["provenance"]
    assert best["selected_on"] == "dice" and best["best_epoch"] == want
    assert best["best_val"]["val_dice_brain"] == pytest.approx(max(dice))
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["training_state"]
    assert last["select"] == "dice" and last["best_epoch"] == want and last["best_val"] == pytest.approx(-max(dice))
    capsys.readouterr()
    assert main(["train-unet", *pos, str(out), *common, "--epochs", "5", "--resume"]) != 0
    assert f"{out / 'last.pt'} chose its best epoch on --select dice" in capsys.readouterr().err
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["training_state"]["epoch"] == 4


def test_resume_restores_weights(synth_dir, tmp_path):
    from E3PoseLogic.networks.config import UNetConfig
    from E3PoseLogic.networks.unet import UNet
    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.training.common import make_optimizer, resume_state

    src = UNet(UNetConfig(n_feat=4, n_levels=2, input_size=16))
    opt = make_optimizer(src, "adam", 1e-3, 0.0)
    src(torch.rand(1, 1, 16, 16, 16)).sum().backward()
    opt.step()
    save_native(tmp_path / "last.pt", src, "unet", {}, extra={"training_state": {
        "epoch": 5, "best_val": 0.25, "best_epoch": 4, "elapsed_s": 12.0, "optimizer": opt.state_dict()}})
    dst = UNet(UNetConfig(n_feat=4, n_levels=2, input_size=16))
    opt2 = make_optimizer(dst, "adam", 1e-3, 0.0)
    st = resume_state(tmp_path / "last.pt", dst, opt2)
    assert st == {"epoch": 5, "best_val": 0.25, "best_epoch": 4, "elapsed_s": 12.0, "select": "loss"}
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_init_from_checkpoint_and_cosine_schedule(synth_dir, tmp_path):
    """--init starts from a checkpoint's weights (BatchNorm statistics too); a mismatched architecture is refused
    with the file named; the cosine schedule is a function of the epoch (so --resume continues it)."""
    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.cli import main
    from E3PoseLogic.networks.config import UNetConfig
    from E3PoseLogic.networks.unet import UNet
    from E3PoseLogic.training.common import init_weights, read_metrics, scheduled_lr

    src = UNet(UNetConfig(n_feat=4, n_levels=3, input_size=32, spacing_mm=12.0))
    with torch.no_grad():
        for t in src.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.0)
    save_native(tmp_path / "src.pt", src, "unet", {"trained_on": "test"})
    dst = UNet(UNetConfig(n_feat=4, n_levels=3, input_size=32, spacing_mm=12.0))
    init_weights(dst, tmp_path / "src.pt", "unet")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(RuntimeError, match="src.pt"):
        init_weights(UNet(UNetConfig(n_feat=8, n_levels=3, input_size=32)), tmp_path / "src.pt", "unet")

    out = tmp_path / "run"
    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    assert main(["train-unet", *pos, str(out), *UNET_TINY, "--epochs", "2", "--steps-per-epoch", "1",
                 "--batch-size", "1", "--lr", "0.01", "--lr-schedule", "cosine", "--init", str(tmp_path / "src.pt"),
                 "--threads", "1", "--quiet", "--bn-recalibrate", "0"]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.005])
    prov = torch.load(out / "last.pt", weights_only=True)["provenance"]
    assert prov["init"].endswith("src.pt") and prov["lr_schedule"] == "cosine"

    class A:
        lr, epochs, lr_schedule = 1.0, 4, "cosine"
    assert [scheduled_lr(A, e) for e in range(5)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    A.lr_schedule = "constant"
    assert scheduled_lr(A, 3) == 1.0


def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(synth_dir, tmp_path):
    """DistributedDataParallel on CPU (gloo): 2 processes x batch 1 take the same draws and, with gradients averaged,
    reach the same weights as 1 process x batch 2 (the E3-CNN normalises per sample, so the two are equivalent)."""
    import os
    import subprocess
    import sys

    from E3PoseLogic.cli import main
    from E3PoseLogic.networks.config import E3CNNConfig

    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2 + [str(synth_dir / "poses.csv")]
    opts = [*E3_TINY, "--epochs", "1", "--steps-per-epoch", "3", "--optimizer", "adam", "--lr", "0.01",
            "--threads", "1", "--quiet", "--device", "cpu", "--seed", "3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "E3PoseLogic", "train-e3cnn", *pos, str(tmp_path / "ddp"), *opts,
                           "--batch-size", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train-e3cnn", *pos, str(tmp_path / "one"), *opts, "--batch-size", "2"]) == 0
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    assert ddp["provenance"]["world_size"] == 2 and one["provenance"]["world_size"] == 1
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][k], v, atol=1e-4, rtol=1e-3, msg=k)
    # and training did move the weights away from the seeded initialisation
    from E3PoseLogic.networks.e3cnn import E3CNN
    torch.manual_seed(3)
    start = E3CNN(E3CNNConfig.from_dict(one["config"])).state_dict()
    assert max(float((one["state_dict"][k] - start[k]).abs().max()) for k in one["state_dict"]
               if start[k].is_floating_point() and start[k].numel()) > 1e-3


def test_mixed_precision_path(synth_dir, tmp_path):
    """--amp (bf16 autocast; on CPU here, the same code path as on a GPU): both trainers run, losses are finite,
    checkpoints stay float32, and the E3-CNN and the rotation maths run in float32 whatever autocast says."""
    from E3PoseLogic.cli import main
    from E3PoseLogic.training.common import read_metrics
    from E3PoseLogic.training.losses import geodesic_angle, predicted_rotation

    common = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--quiet",
              "--device", "cpu", "--amp"]
    pos = [str(synth_dir / "images"), str(synth_dir / "labels")] * 2
    assert main(["train-unet", *pos, str(tmp_path / "u"), *UNET_TINY, *common]) == 0
    assert main(["train-e3cnn", *pos, str(synth_dir / "poses.csv"), str(tmp_path / "e"), *E3_TINY, *common,
                 "--loss", "geodesic"]) == 0
    for kind, key in (("u", "val_dice_brain"), ("e", "val_median_rot_deg")):
        row = read_metrics(tmp_path / kind / "metrics.csv")[-1]
        assert math.isfinite(row["train_loss"]) and math.isfinite(row[key])
        state = torch.load(tmp_path / kind / "best.pt", weights_only=True)["state_dict"]
        assert all(v.dtype in (torch.float32, torch.int64, torch.bool, torch.uint8) for v in state.values())

    # the E3-CNN forward is float32 inside the task even under autocast
    import types

    from E3PoseLogic.networks.config import E3CNNConfig
    from E3PoseLogic.networks.e3cnn import E3CNN
    from E3PoseLogic.training.e3cnn_trainer import E3CNNTask

    net = E3CNN(E3CNNConfig(n_downsample=1, mult=1, lmax=2, crop_size=8))
    task = E3CNNTask.__new__(E3CNNTask)
    task.args = types.SimpleNamespace(loss="axes")
    seen = []
    hook = net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task._loss(net, torch.rand(1, 1, 8, 8, 8), torch.eye(3)[None])
    hook.remove()
    assert seen == [torch.float32] and torch.isfinite(loss)

    pooled = torch.randn(3, 9)
    r = torch.tensor(_rot("xyz", [10, 20, 30]), dtype=torch.float32).expand(3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_amp, ang_amp = predicted_rotation(pooled), geodesic_angle(r, r.transpose(-1, -2))
    assert r_amp.dtype == ang_amp.dtype == torch.float32
    torch.testing.assert_close(r_amp, predicted_rotation(pooled))
    torch.testing.assert_close(ang_amp, geodesic_angle(r, r.transpose(-1, -2)))


def test_light_import_and_synthetic_detection(synth_dir, tmp_path):
    import subprocess
    import sys

    code = "import sys, E3PoseLogic.cli.train; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from E3PoseLogic.training.data import detect_synthetic

    assert detect_synthetic(synth_dir / "images").startswith("synthetic")
    assert detect_synthetic(tmp_path) is None
