"""`e3pose benchmark` times what users run: Pipeline.run (its stages, the mask mapped back to the input grid
included), start-up in a fresh process, reading and writing files; --refine reaches Pipeline.run."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("e3nn")


@pytest.fixture
def run_spy(monkeypatch):
    """Record every Pipeline.run call (and its refine argument) while running the real one."""
    import inspect

    from E3PoseLogic.pipeline import Pipeline

    real = Pipeline.run
    real_has_refine = "refine" in inspect.signature(real).parameters
    calls = []

    def spy(self, array_ijk, ijk_to_ras, mask=None, source=None, progress=None, cancel=None, refine=None):
        calls.append({"mask": mask, "refine": refine})
        kw = {"refine": refine} if (refine is not None and real_has_refine) else {}
        return real(self, array_ijk, ijk_to_ras, mask=mask, source=source, progress=progress, cancel=cancel, **kw)

    monkeypatch.setattr(Pipeline, "run", spy)
    return calls


def test_benchmark_times_pipeline_run_startup_and_io(tmp_path, run_spy, capsys):
    from E3PoseLogic.cli import main

    out = tmp_path / "bench.json"
    assert main(["benchmark", "--variant", "default", "--repeats", "1", "--warmup", "1", "--startup-runs", "1",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    # every timed figure comes from Pipeline.run: warm-up + repeats, then repeats with kernels rebuilt
    assert len(run_spy) == 1 + 1 + 1
    assert all(c["mask"] is None and c["refine"] is None for c in run_spy)  # the U-Net path, no refine passed
    assert rep["format"] == "e3pose-benchmark/2" and rep["refine"] is None
    p = rep["pipeline"]
    for stage in ("preprocess", "segmentation", "crop", "rotation", "output", "total", "wall", "cpu"):
        assert p[stage]["n"] == 1 and 0 <= p[stage]["min_s"] <= p[stage]["median_s"] <= p[stage]["max_s"]
    # the stage breakdown is Pipeline.run's own: its stages add up to its total, and the call costs at least that
    stages = [k for k in p if k not in ("total", "wall", "cpu")]
    assert sum(p[k]["median_s"] for k in stages) == pytest.approx(p["total"]["median_s"], rel=1e-9)
    assert p["wall"]["min_s"] >= p["total"]["min_s"]
    assert rep["networks"]["unet_forward"]["median_s"] <= p["segmentation"]["max_s"]
    # the E3-CNN runs in the rotation stage and, with a cube-crop model, once more in the refinement (the doubt flag's
    # second reading)
    e3cnn_stages = p["rotation"]["max_s"] + (p["refine"]["max_s"] if "refine" in p else 0.0)
    assert rep["networks"]["e3cnn_forward"]["median_s"] <= e3cnn_stages
    assert set(rep["rebuild_kernels"]) == {"rotation", "e3cnn_forward", "total"}
    assert set(rep["io"]) == {"read_nifti", "write_outputs"}
    assert rep["per_volume_s"] > p["wall"]["median_s"]
    assert set(rep["startup"]) == {"interpreter", "imports", "model_load", "total"}
    s = rep["startup"]
    assert s["total"]["median_s"] >= s["imports"]["median_s"] + s["model_load"]["median_s"]
    assert rep["machine"]["cpu_count"] >= 1 and rep["machine"]["torch"]
    assert rep["mask_source"] == "unet" and "first_run" in rep


def test_benchmark_passes_refine_to_pipeline_run(tmp_path, run_spy):
    from E3PoseLogic.cli import main

    out = tmp_path / "bench.json"
    assert main(["benchmark", "--variant", "default", "--repeats", "1", "--warmup", "0", "--startup-runs", "0",
                 "--no-rebuild", "--refine", "off", "--json", str(out)]) == 0
    assert [c["refine"] for c in run_spy] == ["off"]
    rep = json.loads(out.read_text())
    assert rep["refine"] == "off" and "startup" not in rep and "rebuild_kernels" not in rep
    assert rep["refinement_applied"] in (False, None) and "refine" not in rep["pipeline"]  # off means off
