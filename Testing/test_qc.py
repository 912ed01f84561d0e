"""QC rendering with Slicer's displayable managers (offscreen) and the `e3pose qc` command."""
from __future__ import annotations

import json

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
