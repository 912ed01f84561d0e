"""QC rendering with Slicer's displayable managers (offscreen) and the `e3pose qc` command."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import make_synthetic_head, rotation

pytestmark = pytest.mark.mrml


def _gl_ok():
    pytest.importorskip("slicer")
    import vtk

    rw = vtk.vtkRenderWindow()
    rw.SetOffScreenRendering(1)
    try:
        rw.Render()
    except Exception:  # pragma: no cover
        return False
    return bool(rw.SupportsOpenGL()) if hasattr(rw, "SupportsOpenGL") else True


def test_qc_cli_writes_pictures_and_contact_sheet(tmp_path):
    nib = pytest.importorskip("nibabel")
    if not _gl_ok():
        pytest.skip("no offscreen OpenGL")
    from E3PoseLogic.cli import main

    h = make_synthetic_head(shape=(40, 40, 34), spacing=(2.8, 2.8, 3.4), grid_rotation=rotation("z", 20))
    res, inp = tmp_path / "res", tmp_path / "in"
    res.mkdir()
    inp.mkdir()
    nib.save(nib.Nifti1Image(h["array"], h["affine"]), str(inp / "head.nii.gz"))
    mask = h["brain"].copy()
    mask[h["eyes"] > 0] = 2
    nib.save(nib.Nifti1Image(mask, h["affine"]), str(res / "head_mask.nii.gz"))
    r = h["result"]
    (res / "head.json").write_text(json.dumps({
        "input": "/somewhere/else/head.nii.gz", "rotation_ras": r.rotation.tolist(),
        "translation_ras": r.translation.tolist(), "ijk_to_ras": h["affine"].tolist(),
        "confidence": {"determinant": 1.0}}))
    out = tmp_path / "qc"
    assert main(["qc", str(res), "--inputs", str(inp), "-o", str(out), "--size", "160"]) == 0
    png = out / "head_qc.png"
    assert png.is_file() and (out / "contact_sheet.png").is_file() and (out / "index.html").is_file()
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))[..., :3]
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.35) & (img[..., 2] < 0.35)
    blue = (img[..., 2] > 0.8) & (img[..., 0] < 0.4)
    assert red.sum() > 10 and blue.sum() > 10  # the axes are drawn
    assert img.std() > 0.05


def _screen_direction(img, rgb_test, r_min, r_max):
    """Mean unit direction (right, up) from the view centre (the brain centre) to the pixels of one colour in an
    annulus: the axis line, not its tip label."""
    img = img.astype(float) / 255.0
    h, w, _ = img.shape
    rows, cols = np.nonzero(rgb_test(img))
    right, up = cols - (w - 1) / 2.0, (h - 1) / 2.0 - rows
    r = np.hypot(right, up)
    keep = (r > r_min) & (r < r_max)
    assert keep.sum() > 10, "axis line not found"
    d = np.array([np.mean(right[keep] / r[keep]), np.mean(up[keep] / r[keep])])
    return d / np.linalg.norm(d)


def _angle_deg(a, b):
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


RED = lambda im: (im[..., 0] > 0.8) & (im[..., 1] < 0.35) & (im[..., 2] < 0.35)  # noqa: E731
GREEN = lambda im: (im[..., 1] > 0.7) & (im[..., 0] < 0.35) & (im[..., 2] < 0.35)  # noqa: E731
BLUE = lambda im: (im[..., 2] > 0.8) & (im[..., 0] < 0.4) & (im[..., 1] < 0.6)  # noqa: E731


def test_qc_axes_point_where_the_pose_says(tmp_path, monkeypatch):
    """`e3pose qc` on a head turned 60 degrees about the superior axis: in the axial view (radiological: screen
    right = patient left = -R, screen up = anterior) the red x axis runs from the brain centre along the pose's e_x,
    the green y axis along e_y, and the blue z axis is seen end-on; in the coronal view it points up."""
    nib = pytest.importorskip("nibabel")
    if not _gl_ok():
        pytest.skip("no offscreen OpenGL")
    from E3PoseLogic import qc
    from E3PoseLogic.cli import main

    views = {}
    real = qc.render_scene_views

    def capture(*a, **k):
        images = real(*a, **k)
        views.update(images)
        return images

    monkeypatch.setattr(qc, "render_scene_views", capture)
    h = make_synthetic_head(shape=(40, 40, 34), spacing=(2.8, 2.8, 3.4), grid_rotation=rotation("z", 20),
                            pose_rotation=rotation("z", 60))
    res, inp = tmp_path / "res", tmp_path / "in"
    res.mkdir()
    inp.mkdir()
    nib.save(nib.Nifti1Image(h["array"], h["affine"]), str(inp / "head.nii.gz"))
    nib.save(nib.Nifti1Image(h["brain"], h["affine"]), str(res / "head_mask.nii.gz"))
    r = h["result"]
    (res / "head.json").write_text(json.dumps({
        "input": str(inp / "head.nii.gz"), "rotation_ras": r.rotation.tolist(),
        "translation_ras": r.translation.tolist(), "ijk_to_ras": h["affine"].tolist()}))
    size = 200
    assert main(["qc", str(res), "-o", str(tmp_path / "qc"), "--size", str(size)]) == 0
    assert set(views) == {"Axial", "Sagittal", "Coronal", "3D"}
    e_x, e_y = r.rotation[:, 0], r.rotation[:, 1]
    assert np.allclose(e_x, [np.cos(np.pi / 3), np.sin(np.pi / 3), 0.0])
    axial = lambda v: np.array([-v[0], v[1]])  # noqa: E731  (RAS -> screen right, up)
    lo, hi = 0.06 * size, 0.25 * size  # the 40 mm axes are about 0.35 * size long here; labels lie beyond
    assert _angle_deg(_screen_direction(views["Axial"], RED, lo, hi), axial(e_x)) < 3.0
    assert _angle_deg(_screen_direction(views["Axial"], GREEN, lo, hi), axial(e_y)) < 3.0
    blue = BLUE(views["Axial"].astype(float) / 255.0)
    rows, cols = np.nonzero(blue)
    assert np.hypot(cols - (size - 1) / 2, rows - (size - 1) / 2).max() < 0.05 * size  # end-on: a dot
    assert _angle_deg(_screen_direction(views["Coronal"], BLUE, lo, hi), [0.0, 1.0]) < 3.0  # e_z superior: up


def test_qc_cli_missing_input_message(tmp_path, capsys):
    pytest.importorskip("slicer")
    from E3PoseLogic.cli import main

    (tmp_path / "x.json").write_text(json.dumps({"input": "/nope/x.nii.gz", "rotation_ras": np.eye(3).tolist(),
                                                 "translation_ras": [0, 0, 0]}))
    assert main(["qc", str(tmp_path), "-o", str(tmp_path / "qc")]) == 1
    assert "input volume not found" in capsys.readouterr().err


def test_qc_without_slicer_core_says_pip_install(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "slicer" or name.startswith("slicer."):
            raise ImportError("No module named 'slicer'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from E3PoseLogic.cli import main

    assert main(["qc", str(tmp_path), "-o", str(tmp_path / "qc")]) == 2
    assert "pip install slicer-core" in capsys.readouterr().err


def test_qc_bad_input_reported_per_file_others_rendered(tmp_path):
    """One referenced input truncated, one an RGB image: each is reported by name, no traceback, and the good
    result still gets its picture and the contact sheet (issue 9, 3.3)."""
    import contextlib
    import io

    nib = pytest.importorskip("nibabel")
    if not _gl_ok():
        pytest.skip("no offscreen OpenGL")
    from E3PoseLogic.cli import main

    h = make_synthetic_head(shape=(40, 40, 34), spacing=(2.8, 2.8, 3.4))
    res, inp = tmp_path / "res", tmp_path / "in"
    res.mkdir()
    inp.mkdir()
    mask = h["brain"].copy()
    mask[h["eyes"] > 0] = 2
    r = h["result"]
    rgb = np.zeros(h["array"].shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for name in ("a_truncated", "b_good", "c_rgb"):
        nib.save(nib.Nifti1Image(h["array"] if name != "c_rgb" else rgb, h["affine"]), str(inp / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, h["affine"]), str(res / f"{name}_mask.nii.gz"))
        (res / f"{name}.json").write_text(json.dumps({
            "input": str(inp / f"{name}.nii.gz"), "rotation_ras": r.rotation.tolist(),
            "translation_ras": r.translation.tolist()}))
    whole = (inp / "a_truncated.nii.gz").read_bytes()
    (inp / "a_truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "qc"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["qc", str(res), "-o", str(out), "--size", "120"])
    err = err.getvalue()
    assert rc == 1, err
    assert "Traceback" not in err
    assert re.search(r"a_truncated: FAILED: .*a_truncated\.nii\.gz: (the file is truncated or corrupt|not a "
                     r"readable NIfTI)", err), err
    assert re.search(r"c_rgb: FAILED: .*c_rgb\.nii\.gz: an RGB colour image .*scalar 3D volume", err), err
    assert sorted(p.name for p in out.iterdir()) == ["b_good_qc.png", "contact_sheet.png", "index.html"]


def test_pose_note_says_which_axes_are_drawn():
    """The QC title says whose axes are drawn: refined (how far they moved, doubt), or the E3-CNN's (with how many
    of its turned readings agreed, where they were pooled)."""
    from E3PoseLogic.qc import pose_note

    off = {"brain_volume_ml": 295.0, "refinement": {"applied": False, "reason": "turned off (refine off)"}}
    assert pose_note(off) == "brain_volume_ml 295; E3-CNN axes (not refined)"
    off["network_turned_readings"] = {"turned_readings": 6, "agreeing": 5, "moved_deg": 3.7}
    assert pose_note(off).endswith("; E3-CNN axes (not refined; 5 of 7 turned readings agree)")
    refined = {"refinement": {"applied": True, "angle_moved_deg": 12.4, "hypothesis": "network",
                              "residual": {"frame_choice": {"pose_logit": 1.0, "doubtful": True,
                                                            "doubt_reasons": ["pose_logit"]}}},
               "network_turned_readings": None}
    note = pose_note(refined)
    assert note.startswith("; refined axes (moved 12 deg from the E3-CNN, network plane)")
    assert "DOUBTFUL, check (pose logit 1.0)" in note and "turned" not in note


def test_contact_sheet_puts_doubtful_poses_first(tmp_path):
    """A batch's doubtful poses are the ones to open: the sheet and its page list them first, marked CHECK with
    the reason, and a pose that is not flagged (or not refined, so never flagged) keeps its place."""
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from E3PoseLogic.qc import contact_sheet, doubt_of

    flagged = {"refinement": {"applied": True, "residual": {"frame_choice": {
        "pose_logit": 6.0, "judge_logit": 3.7, "doubtful": True, "doubt_reasons": ["judge_logit"]}}}}
    settled = {"refinement": {"applied": True, "residual": {"frame_choice": {
        "pose_logit": 9.0, "judge_logit": 8.1, "doubtful": False, "doubt_reasons": []}}}}
    unrefined = {"refinement": {"applied": False, "reason": "turned off (refine off)"}}
    assert doubt_of(flagged) == "judge logit 3.7"
    assert doubt_of(settled) is None and doubt_of(unrefined) is None and doubt_of({}) is None

    pngs = []
    for i, name in enumerate(["a", "b", "c"]):
        png = tmp_path / f"{name}_qc.png"
        mpimg.imsave(str(png), np.full((20, 40, 3), 0.2 * (i + 1)))
        pngs.append(png)
    out_png, out_html = tmp_path / "sheet.png", tmp_path / "index.html"
    contact_sheet(pngs, out_png, out_html, titles=["a", "b", "c"],
                  doubts=[doubt_of(settled), doubt_of(unrefined), doubt_of(flagged)])
    page = out_html.read_text()
    assert page.index('id="c_qc"') < page.index('id="a_qc"') < page.index('id="b_qc"')
    assert "1 of 3 poses doubtful" in page and "CHECK c</b>: doubtful pose (judge logit 3.7)" in page
    assert "CHECK a" not in page and "CHECK b" not in page
    assert mpimg.imread(str(out_png)).shape[0] > 0
    contact_sheet(pngs[:2], out_png, out_html, doubts=[None, None])
    assert "2 poses, none flagged doubtful" in out_html.read_text()
