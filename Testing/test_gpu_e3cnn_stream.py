"""Resources/training/gpu_e3cnn_stream.py (the E3-CNN's GPU fine-tuning on streamed phantoms, session 27): its crops
and targets must be what the CPU trainer reads from files and what inference cuts, and a run must leave loadable,
selected weights."""
import csv
import json

import numpy as np
import pytest

from _support import load_script, trained_default_model


@pytest.fixture(scope="module")
def script():
    return load_script("gpu_e3cnn_stream", "training", importable=True)


@pytest.fixture(scope="module")
def bundled():
    return trained_default_model()


def test_streamed_case_equals_the_files_path(script, bundled, tmp_path):
    """True-mask crop and target as ``e3pose synth`` + ``training.data.e3cnn_case`` (cube) give them; the U-Net crop
    as ``training.data.unet_crop_box`` (inference's mask and cube) places it on that input."""
    from E3PoseLogic.crop import crop_input
    from E3PoseLogic.synth import generate_dataset
    from E3PoseLogic.training.data import e3cnn_case, read_annotations, unet_case, unet_crop_box

    opts = dict(script.unet_stream.RECIPES[2][1])  # varied anatomy, random contrast in some
    generate_dataset(tmp_path, n=1, seed=4243, cfg=script.unet_stream.synth_config(opts))
    img = next((tmp_path / "images").glob("*.nii.gz"))
    lab = tmp_path / "labels" / img.name
    r_vc = next(iter(read_annotations(tmp_path / "poses.csv").values()))
    ref = e3cnn_case(img, lab, r_vc, 6.0, 64, 0.6, 16, "cube")
    unet = str(bundled.unet)
    x_unet, x_true, target, tag = script.e3cnn_case((4243, 0, opts, unet, (0.6, 16), False))
    assert tag == "4243_0" and x_true.shape == x_unet.shape == (16, 16, 16)
    np.testing.assert_allclose(target, ref.r_vc, atol=1e-5)  # a wrong axis convention is off by degrees, not 1e-5
    assert np.abs(x_true - ref.x).max() < 1e-2  # NIfTI stores the affine in float32
    x_grid, _ = unet_case(img, lab, 6.0, 64)
    assert np.abs(x_unet - crop_input(x_grid, unet_crop_box(x_grid, unet, 0.6, 16))).max() < 2e-2
    assert np.abs(x_unet - x_true).max() > 0.05  # the two crops are not the same cube


def test_a_short_run_saves_selected_loadable_weights(script, bundled, tmp_path, monkeypatch):
    from E3PoseLogic.checkpoints import load_e3cnn

    monkeypatch.setattr(script, "VAL_SETS", ((11, 1, {}), (12, 1, dict(navigator=True))))
    out = tmp_path / "run"
    rc = script.main(["--init", str(bundled.e3cnn), "--unet", str(bundled.unet),
                      "--out", str(out), "--device", "cpu", "--workers", "1", "--max-steps", "2", "--batch", "2",
                      "--start-cases", "2", "--val-every", "1000", "--lrs", "1e-3"])
    assert rc == 0
    model, prov = load_e3cnn(out / "lr0.001" / "e3cnn.pt")  # the provenance is flattened into the info
    assert prov["init_trained_on"] == bundled.card["e3cnn"]["trained_on"]
    assert prov["phantoms_seen"] >= 2 and prov["best_step"] in (0, 2) and prov["lrs_side_by_side"] == [1e-3]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [0, 2]
    best = min(float(r["score"]) for r in rows)
    assert prov["best_val"]["score"] == pytest.approx(best, abs=1e-4)  # the saved weights are the best scored
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["runs"]["0.001"]["best_val"]["score"] == pytest.approx(best, abs=1e-4)


def test_refuses_a_box_crop_network(script, bundled, tmp_path):
    """The published box crop is cut differently from the cube this script trains on: refused, naming the file."""
    import torch

    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.networks.config import E3CNNConfig
    from E3PoseLogic.networks.e3cnn import E3CNN

    torch.manual_seed(0)
    path = tmp_path / "box.pt"
    save_native(path, E3CNN(E3CNNConfig(mult=1, n_downsample=2, lmax=1, crop_size=16, crop_shape="box")), "e3cnn")
    with pytest.raises(SystemExit, match="box.pt.*crop shape 'box'"):
        script.main(["--init", str(path), "--unet", str(bundled.unet), "--out", str(tmp_path / "o"),
                     "--device", "cpu", "--workers", "1", "--max-steps", "1"])


def test_refuses_a_network_of_another_kind(script, bundled, tmp_path):
    """A residual network given as --init is refused with a message naming the file (the checkpoint's error, raised
    in a worker, cannot be unpickled: the pool would wait for ever)."""
    with pytest.raises(SystemExit, match="residual.pt"):
        script.main(["--init", str(bundled.residual), "--unet", str(bundled.unet), "--out", str(tmp_path / "o"),
                     "--device", "cpu", "--workers", "1", "--max-steps", "1"])
