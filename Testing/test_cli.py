"""``e3pose infer`` end to end: real NIfTI files, real (tiny, random-weight) networks in the native format.

The U-Net has random weights, so it finds no brain: most runs pass known masks with ``--mask-dir`` (a synthetic
head: a bright ellipsoid "brain" inside a larger, dimmer ellipsoid "head"). The E3-CNN is random too, so the
rotation is meaningless; what is checked is everything around it: the translation (= the mask's centre of mass),
the matrix forms and their consistency, file names, per-file error reporting, the exit code and atomic outputs.

Everything shares two small networks and one good batch run (module fixtures) to stay well under a minute on two
CPU cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("torch")
pytest.importorskip("e3nn")

from _support import rotation, small_e3cnn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UNET_SPACING = 6.0  # the tiny U-Net's grid: 32^3 voxels of 6 mm (travels in its native file)
TMP_RE = re.compile(r"^\..*\.tmp\.")
SUFFIXES = (".npy", ".json", "_mask.nii.gz", ".tfm")


# ------------------------------------------------------------------------------------------------- helpers
def grid(shape, spacing, rotation=None, centre=(4.0, -6.0, 10.0)):
    """IJK-to-RAS of a grid of ``shape`` voxels centred on ``centre`` (world mm)."""
    d = np.eye(3) if rotation is None else np.asarray(rotation, float)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(np.broadcast_to(np.asarray(spacing, float), (3,)))
    m[:3, 3] = np.asarray(centre) - m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return m


def world_coords(shape, affine):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def ellipsoid(shape, affine, centre, radii):
    w = world_coords(shape, affine)
    return ((((w - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0).astype(np.uint8)


def head(shape, affine, centre=(6.0, -3.0, 9.0), radii=(30.0, 36.0, 27.0), seed=0):
    """(volume float32, brain mask uint8): bright brain ellipsoid in a dimmer head, a little noise."""
    brain = ellipsoid(shape, affine, centre, radii)
    skull = ellipsoid(shape, affine, centre, np.asarray(radii) + 14.0)
    rng = np.random.default_rng(seed)
    vol = 30.0 * skull + 70.0 * brain + rng.normal(0.0, 2.0, shape)
    return vol.astype(np.float32), brain


def save(path, array, affine):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def world_com(mask_path):
    """Centre of mass (world RAS mm) of the brain (label 1) in a mask file, through the file's own affine."""
    img = nib.load(str(mask_path))
    m = np.asarray(img.get_fdata()) > 0.5
    ijk = np.argwhere(m).mean(0)
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


def infer(args, models):
    """``e3pose infer`` in-process -> (exit code, stderr text)."""
    from E3PoseLogic.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["infer", *map(str, args), "--unet", str(models["unet"]), "--e3cnn", str(models["e3cnn"]),
                   "--device", "cpu"])
    return rc, err.getvalue()


def tmp_files(folder):
    return [p.name for p in Path(folder).iterdir() if TMP_RE.match(p.name)]


def finished(folder):
    """Names whose JSON (written last) is in place; pathlib's glob also matches hidden temporary files."""
    return sorted(p.name[: -len(".json")] for p in Path(folder).glob("*.json") if not p.name.startswith("."))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def check_complete_set(outdir, name):
    """The four outputs of ``name`` exist and every one of them reads back."""
    from E3PoseLogic import frames

    out = Path(outdir)
    for suffix in SUFFIXES:
        assert (out / f"{name}{suffix}").is_file(), f"{name}{suffix} missing"
    rec = json.loads((out / f"{name}.json").read_text())
    npy = np.load(out / f"{name}.npy")
    assert npy.shape == (4, 4) and np.all(np.isfinite(npy))
    mask = nib.load(str(out / f"{name}_mask.nii.gz"))
    assert mask.get_fdata().max() >= 1
    tfm = frames.read_itk_transform(out / f"{name}.tfm")
    np.testing.assert_allclose(tfm, rec["canonical_to_world_ras"], atol=1e-6)
    return rec, npy, mask


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny E3-CNN (16^3 crop) and a tiny U-Net (32^3 grid at 6 mm), random weights, native files."""
    import torch

    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.networks.config import UNetConfig
    from E3PoseLogic.networks.unet import UNet

    d = tmp_path_factory.mktemp("models")
    e3 = small_e3cnn(seed=0, crop_size=16, n_downsample=0, lmax=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet(UNetConfig(n_feat=4, n_levels=2, input_size=32, spacing_mm=UNET_SPACING)).eval()
    return {"e3cnn": save_native(d / "e3cnn.pt", e3, "e3cnn"), "unet": save_native(d / "unet.pt", unet, "unet")}


@pytest.fixture(scope="module")
def good(tmp_path_factory, models):
    """One default run over a folder (2 volumes, one with an inner dot in its name, plus a non-NIfTI file) and a
    single .nii file whose mask lies on another grid."""
    base = tmp_path_factory.mktemp("good")
    inputs, masks, out = base / "inputs", base / "masks", base / "out"
    vols = {}
    # 1: axis-aligned 2.5 mm grid
    a1 = grid((56, 56, 56), 2.5)
    v1, m1 = head((56, 56, 56), a1, seed=1)
    vols["h1"] = (save(inputs / "h1.nii.gz", v1, a1), a1, save(masks / "h1.nii.gz", m1, a1))
    # 2: oblique, mirrored (det < 0), anisotropic grid; the name keeps its inner dot
    oblique_mirrored = rotation("z", -35) @ rotation("x", 20) @ np.diag([-1.0, 1, 1])
    a2 = grid((60, 60, 44), (2.2, 2.2, 3.0), oblique_mirrored, centre=(-5, 8, 0))
    v2, m2 = head((60, 60, 44), a2, centre=(-3.0, 10.0, 2.0), radii=(28.0, 33.0, 25.0), seed=2)
    vols["sub-01_run.2"] = (save(inputs / "sub-01_run.2.nii.gz", v2, a2), a2,
                            save(masks / "sub-01_run.2.nii.gz", m2, a2))
    (inputs / "notes.txt").write_text("not a volume")
    # 3: a single uncompressed file given by name; its mask on a coarser 3 mm grid (resampled through the world)
    a3 = grid((48, 48, 48), 2.8, rotation("y", 15), centre=(0, 0, 0))
    v3, _ = head((48, 48, 48), a3, centre=(2.0, 1.0, -3.0), seed=3)
    am = grid((40, 40, 40), 3.3, centre=(1, 1, 1))
    mm = ellipsoid((40, 40, 40), am, (2.0, 1.0, -3.0), (30.0, 36.0, 27.0))
    vols["solo"] = (save(base / "single" / "solo.nii", v3, a3), a3, save(masks / "solo.nii.gz", mm, am))

    rc, err = infer([inputs, vols["solo"][0], "-o", out, "--mask-dir", masks, "-q"], models)
    return dict(base=base, inputs=inputs, masks=masks, out=out, vols=vols, rc=rc, err=err)


# ------------------------------------------------------------------------------------------------- 1. good batch
def test_good_batch_outputs(good):
    assert good["rc"] == 0, good["err"]
    assert "Traceback" not in good["err"]
    assert "3 done, 0 failed" in good["err"]
    out = good["out"]
    expected = {f"{n}{s}" for n in good["vols"] for s in SUFFIXES}
    assert {p.name for p in out.iterdir()} == expected  # names keep inner dots; notes.txt ignored; no temp files
    assert (out / "sub-01_run.2.npy").is_file() and not (out / "sub-01_run.npy").exists()


@pytest.mark.parametrize("name", ["h1", "sub-01_run.2", "solo"])
def test_good_batch_geometry(good, name):
    from E3PoseLogic import frames

    path, affine, mask_path = good["vols"][name]
    rec, npy, mask_img = check_complete_set(good["out"], name)
    assert rec["input"] == str(path)
    assert rec["mask_source"] == str(mask_path)
    assert rec["model"]["trained"] is True  # native files with no random_weights flag
    np.testing.assert_allclose(rec["ijk_to_ras"], affine, atol=1e-5)

    # translation = the given mask's world centre of mass (computed on the 6 mm U-Net grid: half a voxel)
    t = np.array(rec["translation_ras"])
    assert np.linalg.norm(t - world_com(mask_path)) < 0.5 * UNET_SPACING

    # matrix forms agree with each other
    r = np.array(rec["rotation_ras"])
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-6)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-6)
    c2w = np.array(rec["canonical_to_world_ras"])
    np.testing.assert_allclose(c2w[:3, :3], r, atol=1e-9)
    np.testing.assert_allclose(c2w[:3, 3], t, atol=1e-9)
    np.testing.assert_allclose(np.array(rec["world_to_canonical_ras"]) @ c2w, np.eye(4), atol=1e-6)
    d = frames.direction_cosines(affine)
    rv = np.array(rec["rotation_voxel"])
    np.testing.assert_allclose(d @ rv @ np.diag([np.sign(np.linalg.det(d)), 1, 1]), r, atol=1e-5)
    c2v = np.array(rec["canonical_to_voxel"])
    np.testing.assert_allclose(c2v[:3, :3], rv, atol=1e-9)
    np.testing.assert_allclose(c2v[:3, 3], (np.linalg.inv(affine) @ np.append(t, 1.0))[:3], atol=1e-4)

    # default .npy = canonical -> input voxel indices
    np.testing.assert_allclose(npy, c2v, atol=1e-9)
    assert rec["npy"]["file"] == f"{name}.npy" and "voxel" in rec["npy"]["maps"]

    # the mask output lies on the input grid; with a given mask on that grid it is that mask
    assert mask_img.shape == nib.load(str(path)).shape
    np.testing.assert_allclose(mask_img.affine, affine, atol=1e-4)
    if name != "solo":
        np.testing.assert_array_equal(np.asarray(mask_img.dataobj), np.asarray(nib.load(str(mask_path)).dataobj))


def test_scanner_space_npy(good, models, tmp_path):
    """--scanner-space: NAME.npy = canonical mm -> world RAS mm (--input-to-canonical: see the bad-input batch)."""
    rc, err = infer([good["vols"]["h1"][0], "-o", tmp_path, "--mask-dir", good["masks"], "-q", "--scanner-space"],
                    models)
    assert rc == 0, err
    npy = np.load(tmp_path / "h1.npy")
    rec = json.loads((tmp_path / "h1.json").read_text())
    ref = json.loads((good["out"] / "h1.json").read_text())  # same input, same networks: same pose
    np.testing.assert_allclose(rec["canonical_to_world_ras"], ref["canonical_to_world_ras"], atol=1e-6)
    np.testing.assert_allclose(npy, rec["canonical_to_world_ras"], atol=1e-9)
    assert rec["npy"]["maps"] == "canonical -> world RAS mm"


# ------------------------------------------------------------------------------------------------- 2. bad inputs
def test_bad_inputs_reported_by_name_batch_goes_on(good, models, tmp_path):
    """Every kind of bad input in one batch, through the real ``python -m E3PoseLogic infer``."""
    src, affine, mask_src = good["vols"]["h1"]
    shape = (56, 56, 56)
    vol, brain = head(shape, affine, seed=1)
    inp, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    expect = {}  # file name -> reason pattern on stderr

    def case(name, reason, image=None, mask=brain, aff=affine, raw=None):
        p = inp / name
        if raw is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(raw)
        else:
            save(p, vol if image is None else image, aff)
        if mask is not None:
            save(masks / name, mask, aff)
        if reason:
            expect[name] = reason

    case("ok.nii.gz", None)
    rng = np.random.default_rng(7)
    case("random_bytes.nii.gz", r"not a readable NIfTI", raw=rng.bytes(5000))
    whole = src.read_bytes()
    case("truncated.nii.gz", r"truncated or corrupt|not a readable NIfTI", raw=whole[: len(whole) // 2])
    case("series.nii.gz", r"4D series of 3 volumes", image=np.stack([vol[::2, ::2, ::2]] * 3, -1),
         mask=None)
    nan = vol.copy()
    nan[10:12, 20, 30] = np.nan
    case("nan.nii.gz", r"2 of \d+ voxels are not finite", image=nan)
    case("constant.nii.gz", r"image is empty", image=np.full(shape, 7.0, np.float32))
    sheared = affine.copy()
    sheared[0, 1] = 0.6
    case("sheared.nii.gz", r"not orthogonal \(sheared affine", aff=sheared)
    case("empty_mask.nii.gz", r"mask is empty", mask=np.zeros(shape, np.uint8))
    # a brain cut by the edge of the field of view: the ellipsoid is centred on the volume's first i-face
    edge_centre = affine[:3, :3] @ np.array([0.0, 27.5, 27.5]) + affine[:3, 3]
    case("border.nii.gz", r"touches the border", mask=ellipsoid(shape, affine, edge_centre, (30.0, 30.0, 30.0)))
    case("no_mask.nii.gz", r"no mask named no_mask\.nii\.gz", mask=None)
    missing = tmp_path / "does_not_exist.nii.gz"
    expect[missing.name] = r"no such file or folder"

    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "E3PoseLogic", "infer", str(inp), str(missing), "-o", str(out),
         "--mask-dir", str(masks), "--unet", str(models["unet"]), "--e3cnn", str(models["e3cnn"]),
         "--device", "cpu", "--input-to-canonical"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    err = proc.stderr
    print(err)  # shown when the test fails
    assert "Traceback" not in err, err
    assert proc.returncode == len(expect) == 10, err
    assert "1 done, 10 failed" in err, err
    lines = err.splitlines()
    for name, reason in expect.items():
        path = str(missing if name == missing.name else inp / name)  # the input's own path, not only its mask's
        hits = [ln for ln in lines if path in ln and re.search(reason, ln)]
        assert hits, f"{name}: no stderr line naming {path} with /{reason}/:\n{err}"
    # the good one in the middle of the batch was done; nothing at all for the bad ones
    rec, npy, _ = check_complete_set(out, "ok")
    # --input-to-canonical: NAME.npy = input voxel indices -> canonical, the inverse of the default
    np.testing.assert_allclose(npy @ np.array(rec["canonical_to_voxel"]), np.eye(4), atol=1e-9)
    np.testing.assert_allclose(npy, np.linalg.inv(np.load(good["out"] / "h1.npy")), atol=1e-9)
    assert rec["npy"]["maps"] == "input voxel indices -> canonical"
    assert {p.name for p in out.iterdir()} == {f"ok{s}" for s in SUFFIXES}
    print(f"subprocess batch: {time.perf_counter() - t0:.1f} s")


def test_unet_route_finds_no_brain_cleanly(good, models, tmp_path):
    """The tiny random U-Net finds no brain: a clean per-file failure, not a traceback."""
    path = good["vols"]["h1"][0]
    rc, err = infer([path, "-o", tmp_path / "out", "-q"], models)
    assert rc == 1, err
    assert "Traceback" not in err
    assert re.search(r"h1\.nii\.gz: the brain mask (is empty|is too small|touches)", err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------------- 3. nothing lost
def test_failed_rerun_keeps_previous_outputs(good, models, tmp_path):
    """Outputs of an earlier run survive a re-run in which the same inputs are now broken."""
    out = tmp_path / "out"
    shutil.copytree(good["out"], out)  # the earlier successful run's OUTDIR
    before = snapshot(out)
    broken = tmp_path / "inputs"
    broken.mkdir()
    whole = good["vols"]["h1"][0].read_bytes()
    (broken / "h1.nii.gz").write_bytes(whole[: len(whole) // 3])  # the input now truncated
    shutil.copy(good["vols"]["sub-01_run.2"][0], broken / "sub-01_run.2.nii.gz")
    masks = tmp_path / "masks"  # its mask now cut by the edge: fails inside the pipeline, after loading
    a2 = good["vols"]["sub-01_run.2"][1]
    corner = a2[:3, :3] @ np.zeros(3) + a2[:3, 3]
    save(masks / "sub-01_run.2.nii.gz", ellipsoid((60, 60, 44), a2, corner, (40.0, 40.0, 40.0)), a2)
    save(masks / "h1.nii.gz", nib.load(str(good["vols"]["h1"][2])).get_fdata().astype(np.uint8),
         good["vols"]["h1"][1])
    rc, err = infer([broken, "-o", out, "--mask-dir", masks, "-q"], models)
    assert rc == 2, err
    assert "Traceback" not in err
    assert re.search(r"h1\.nii\.gz: (the file is truncated or corrupt|not a readable NIfTI)", err), err
    assert re.search(r"sub-01_run\.2\.nii\.gz: the brain mask touches the border", err), err
    assert snapshot(out) == before  # byte-identical, nothing added (no temporary files)
    assert tmp_files(out) == []


def test_json_is_not_left_describing_a_replaced_set(good, models, tmp_path, monkeypatch):
    """Ctrl-C just before the JSON is written, in a re-run with another .npy form: no JSON may be left that
    describes files it does not match (its presence says the set is complete)."""
    import E3PoseLogic.outputs as outputs

    out = tmp_path / "out"
    shutil.copytree(good["out"], out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "save_json", interrupted)
    before = snapshot(out)
    rc, err = infer([good["vols"]["h1"][0], "-o", out, "--mask-dir", good["masks"], "-q", "--scanner-space"],
                    models)
    assert rc == 130 and "interrupted" in err, err
    assert tmp_files(out) == []
    assert snapshot(out) == before  # the earlier set is kept whole: its JSON is not deleted first (issue 9, 3.5)
    for name in finished(out):
        js = out / f"{name}.json"
        rec = json.loads(js.read_text())
        want = rec["canonical_to_voxel"] if "voxel" in rec["npy"]["maps"] else rec["canonical_to_world_ras"]
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), want, atol=1e-9,
                                   err_msg=f"{js.name} does not describe {name}.npy")
    check_complete_set(out, "solo")  # untouched sets stay complete


def linked_batch(good, tmp_path, names):
    """A batch of copies (hard links) of one good volume and its mask: (inputs, masks, output folder)."""
    src, _, mask = good["vols"]["h1"]
    inp, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    inp.mkdir()
    masks.mkdir()
    for name in names:
        os.link(src, inp / f"{name}.nii.gz")
        os.link(mask, masks / f"{name}.nii.gz")
    return inp, masks, out


def interrupted_infer(args, models, log, sig, ready, pause, early, late):
    """``e3pose infer ARGS`` in a subprocess (stderr to ``log``), sent ``sig`` as soon as ``ready()``; -> exit code.

    ``early`` / ``late``: what the failure says when the run ends before ``ready()``, or ``ready()`` never comes."""
    with open(log, "w") as fh:
        # the default SIGINT action, as in a terminal: a job started in the background (nohup cmd &, some CI
        # runners) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler, rightly
        proc = subprocess.Popen(
            [sys.executable, "-m", "E3PoseLogic", "infer", *map(str, args), "--unet", str(models["unet"]),
             "--e3cnn", str(models["e3cnn"]), "--device", "cpu"],
            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=fh,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None and not ready():
                time.sleep(pause)
            assert proc.poll() is None, early + ":\n" + log.read_text()
            assert ready(), late + ":\n" + log.read_text()
            proc.send_signal(sig)
            return proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigint_leaves_no_partial_outputs(good, models, tmp_path):
    """Ctrl-C (SIGINT) in the middle of a batch: no temporary or truncated files; every JSON has its full set."""
    n = 30
    inp, masks, out = linked_batch(good, tmp_path, [f"v{i:02d}" for i in range(n)])
    log = tmp_path / "stderr.txt"
    rc = interrupted_infer([inp, "-o", out, "--mask-dir", masks], models, log, signal.SIGINT,
                           ready=lambda: out.is_dir() and finished(out), pause=0.01,
                           early="the batch ended before it could be interrupted", late="no output appeared in time")
    err = log.read_text()
    assert rc == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert tmp_files(out) == []
    done = finished(out)
    assert 1 <= len(done) < n
    for name in done:
        check_complete_set(out, name)
    # files of the volume being written when interrupted (no JSON yet) are whole files, never truncated ones
    for p in out.iterdir():
        if p.suffix == ".npy":
            assert np.load(p).shape == (4, 4)
        elif p.name.endswith(".nii.gz"):
            nib.load(str(p)).get_fdata()
        elif p.suffix == ".tfm":
            from E3PoseLogic import frames

            frames.read_itk_transform(p)


def test_sigterm_during_rerun_keeps_earlier_sets_whole(good, models, tmp_path):
    """SIGTERM (a job scheduler's kill) at the first change a re-run makes to OUTDIR: no temporary file is left and
    every input still has one complete set, the earlier run's or the new one, never a mix (issue 9, 3.5)."""
    n = 6
    inp, masks, out = linked_batch(good, tmp_path, [f"v{i}" for i in range(n)])
    rc, err = infer([inp, "-o", out, "--mask-dir", masks, "-q"], models)  # the earlier run: voxel-index .npy
    assert rc == 0, err
    before = snapshot(out)

    def state():  # (the write-access probe made before the models load is not a change of the results)
        return {e.name: e.inode() for e in os.scandir(out) if not e.name.startswith(".e3pose-probe-")}

    first = state()
    log = tmp_path / "stderr.txt"
    # the re-run writes another .npy form, so old and new sets differ
    rc = interrupted_infer([inp, "-o", out, "--mask-dir", masks, "-q", "--scanner-space"], models, log,
                           signal.SIGTERM, ready=lambda: state() != first, pause=0.0005,
                           early="the re-run ended before it could be stopped",
                           late="the re-run changed nothing in time")
    err = log.read_text()
    assert tmp_files(out) == [], err
    assert rc == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == sorted(before), err
    for i in range(n):
        name = f"v{i}"
        rec, npy, _ = check_complete_set(out, name)
        want = rec["canonical_to_voxel"] if "voxel" in rec["npy"]["maps"] else rec["canonical_to_world_ras"]
        np.testing.assert_allclose(npy, want, atol=1e-9, err_msg=f"{name}.json does not describe {name}.npy")
        if (out / f"{name}.json").read_bytes() == before[f"{name}.json"]:  # an earlier set: kept byte for byte
            for suffix in SUFFIXES:
                assert (out / f"{name}{suffix}").read_bytes() == before[f"{name}{suffix}"], f"{name}{suffix}"


def test_same_name_inputs_refused_before_anything_is_computed(good, models, tmp_path):
    """dupA/scan.nii.gz, dupB/scan.nii.gz and dupB/scan.nii would all write OUT/scan.*: refused up front, naming
    them, instead of "3 done" with two results lost (issue 9, 3.1). The same file given twice is done once."""
    src, _, mask = good["vols"]["h1"]
    a, b, masks, out = tmp_path / "dupA", tmp_path / "dupB", tmp_path / "masks", tmp_path / "out"
    for d in (a, b, masks):
        d.mkdir()
    shutil.copy(src, a / "scan.nii.gz")
    shutil.copy(src, b / "scan.nii.gz")
    img = nib.load(str(src))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(b / "scan.nii"))
    shutil.copy(mask, masks / "scan.nii.gz")
    rc, err = infer([a / "scan.nii.gz", b, "-o", out, "--mask-dir", masks, "-q"], models)
    assert rc == 3, err
    assert "Traceback" not in err and "done" not in err, err
    assert "nothing was computed" in err and "separate -o folders" in err, err
    lines = [ln for ln in err.splitlines() if "scan.*:" in ln]
    assert len(lines) == 1 and all(str(p) in lines[0] for p in (a / "scan.nii.gz", b / "scan.nii",
                                                                 b / "scan.nii.gz")), err
    assert not out.exists()
    rc, err = infer([a, a / "scan.nii.gz", "-o", out, "--mask-dir", masks, "-q"], models)
    assert rc == 0 and "1 done, 0 failed" in err, err


def test_file_names_that_are_not_utf8(good, models, tmp_path):
    """Latin-1 bytes in the input's and the output folder's names: the batch goes on and writes complete sets
    (it used to abort with exit 134 in the ITK transform writer, leaving an orphan mask; issue 9, 3.2)."""
    src, _, mask = good["vols"]["h1"]
    raw = b"latin1_\xe9"
    name = os.fsdecode(raw)
    inp, masks = tmp_path / "lat", tmp_path / "masks"
    inp.mkdir()
    masks.mkdir()
    for n in (name, "plain"):
        shutil.copy(src, inp / f"{n}.nii.gz")
        shutil.copy(mask, masks / f"{n}.nii.gz")
    out = tmp_path / os.fsdecode(b"out_\xe9")
    proc = subprocess.run(  # a separate process: the failure this guards against aborts the interpreter
        [sys.executable, "-m", "E3PoseLogic", "infer", str(inp), "-o", str(out), "--mask-dir", str(masks),
         "--unet", str(models["unet"]), "--e3cnn", str(models["e3cnn"]), "--device", "cpu", "-q"],
        cwd=REPO, env=subprocess_env(), capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "2 done, 0 failed" in err, err
    assert sorted(os.listdir(os.fsencode(out))) == sorted(n + s.encode() for n in (b"plain", raw) for s in SUFFIXES)
    rec, _, _ = check_complete_set(out, name)
    assert os.fsencode(rec["input"]) == os.fsencode(inp) + b"/" + raw + b".nii.gz"


def test_unwritable_output_folder_found_before_any_work(good, models, tmp_path):
    """An output folder that cannot be created or written is reported at once, before the models load (here the
    E3-CNN file does not even exist), not once per input after each was computed (issue 9, 3.7)."""
    from E3PoseLogic.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    outs = [blocker, blocker / "out"]
    if os.geteuid() != 0:  # root writes anywhere: only a non-root run can test permissions
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        outs.append(locked)
    for out in outs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["infer", str(good["vols"]["h1"][0]), "-o", str(out), "--mask-dir", str(good["masks"]),
                       "--unet", str(models["unet"]), "--e3cnn", str(tmp_path / "missing.pt"), "--device", "cpu",
                       "-q"])
        err = err.getvalue()
        assert rc == 1, err
        assert re.search(re.escape(str(out)) + r": (the output folder is a file|cannot (create|write in) the output "
                                               r"folder).*nothing was computed", err), err
        assert "missing.pt" not in err and "FAILED" not in err, err
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------------- 4. checkpoints
@pytest.mark.parametrize("which", ["unet_as_e3cnn", "missing"])
def test_checkpoint_errors_name_the_file(good, models, tmp_path, which):
    from E3PoseLogic.cli import main

    bad = models["unet"] if which == "unet_as_e3cnn" else tmp_path / "nope" / "e3cnn.pt"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["infer", str(good["vols"]["h1"][0]), "-o", str(tmp_path / "out"), "--mask-dir",
                   str(good["masks"]), "--unet", str(models["unet"]), "--e3cnn", str(bad), "--device", "cpu", "-q"])
    err = err.getvalue()
    assert rc != 0
    assert "Traceback" not in err
    reason = "not an E3-CNN checkpoint" if which == "unet_as_e3cnn" else "file not found"
    assert re.search(re.escape(str(bad)) + r": .*" + reason, err), err
    assert not (tmp_path / "out").exists()


def test_text_file_as_weights_named_for_what_it_is(good, models, tmp_path):
    """A text file given as --unet is "a text file", not "pickled"; --allow-pickle never ends in a traceback
    (issue 9, 3.6)."""
    from E3PoseLogic.cli import main

    notes = tmp_path / "unet.ckpt"
    notes.write_text("epochs: 40\nlr: 0.001\n")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x04garbage")  # starts like a pickle, is not one
    cases = [(notes, [], r"not a PyTorch checkpoint: it is a text file \(starting 'epochs: 40'\)"),
             (notes, ["--allow-pickle"], r"not a PyTorch checkpoint: it is a text file"),
             (broken, ["--allow-pickle"], r"cannot be read as a PyTorch checkpoint even with full unpickling")]
    for path, extra, reason in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["infer", str(good["vols"]["h1"][0]), "-o", str(tmp_path / "out"), "--mask-dir",
                       str(good["masks"]), "--unet", str(path), "--e3cnn", str(models["e3cnn"]), "--device", "cpu",
                       "-q", *extra])
        err = err.getvalue()
        assert rc == 1 and "Traceback" not in err, err
        assert re.search(re.escape(str(path)) + ": " + reason, err), err
        if path == notes:
            assert "pickle" not in err.lower(), err
        assert not (tmp_path / "out").exists()


def test_demo_runs_on_the_bundled_sample(tmp_path, capsys):
    """`e3pose demo` (the README's main command): the whole pipeline with the bundled model, error vs known pose."""
    import json

    from E3PoseLogic.cli import main
    from E3PoseLogic.models import default_model

    assert main(["demo", "-o", str(tmp_path), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rec = json.loads((tmp_path / "sample_head.json").read_text())
    if rec["confidence"]["refinement"]["applied"]:  # both errors, the E3-CNN's and the refined one
        assert "E3-CNN alone: rotation" in out and "refined:      rotation" in out
        refined = float(re.search(r"refined: +rotation ([0-9.]+) deg", out).group(1))
        network = float(re.search(r"E3-CNN alone: rotation ([0-9.]+) deg", out).group(1))
        assert refined < network  # the refinement helps on the sample (measured: 14.9 -> 0.5 deg)
    else:
        assert "error vs the known pose: rotation" in out
    for suffix in (".npy", ".tfm", "_mask.nii.gz"):
        assert (tmp_path / f"sample_head{suffix}").is_file()
    model = default_model()
    if model.warning:  # random or synthetic-only model: the user is told, on screen and in the record
        assert "MODEL WARNING" in err or "random-weight" in err
        assert rec["model"]["e3cnn"]["warning"] == model.warning
    assert np.isclose(np.linalg.det(np.array(rec["rotation_ras"])), 1.0)
    if model.random_weights:  # a random U-Net finds no brain: the demo says it uses the true mask
        assert rec["mask_source"] == "given" and "true brain mask" in err
        return
    # the bundled model's U-Net found the brain: no fallback to the sample's true mask, and the record, the screen
    # and the written mask all say so
    assert rec["mask_source"] == "unet", err
    assert "brain mask: from the U-Net" in out and "U-Net failed" not in err
    from E3PoseLogic.cli.demo import SAMPLE_DIR

    written = np.asarray(nib.load(str(tmp_path / "sample_head_mask.nii.gz")).dataobj) == 1
    true = np.asarray(nib.load(str(SAMPLE_DIR / "sample_head_label.nii.gz")).dataobj) == 1
    assert written.shape == true.shape and not np.array_equal(written, true)  # the U-Net's, not the label
    assert 2.0 * np.sum(written & true) / (written.sum() + true.sum()) > 0.7  # and it found the brain
