"""Resources/benchmarks/retry_grids.py: every retry attempt kept with its pose, and a grid subset scored offline picks
the attempt the pipeline itself keeps when it tries only that subset."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from E3PoseLogic import pipeline as P
from E3PoseLogic import judge, residual
from E3PoseLogic.models import default_model

from _support import load_script


def test_attempts_are_kept_and_subsets_scored_as_the_pipeline_chooses(tmp_path, monkeypatch):
    from E3PoseLogic.cli import main as cli
    from E3PoseLogic.evaluate import read_ground_truth
    from E3PoseLogic.rotation import geodesic_deg
    from E3PoseLogic.volume_io import load_volume

    model = default_model()
    if model.random_weights or model.residual is None:
        pytest.skip("no trained model with a residual network is bundled")
    monkeypatch.setattr(residual, "DOUBT_LOGIT", 1e6)  # every pose doubtful: every volume is retried
    monkeypatch.setattr(judge, "DOUBT_BELOW", 1e6)  # (the frame judge's rule, when the model has one)
    data = tmp_path / "tune"
    assert cli(["synth", str(data), "--n", "2", "--seed", "9303", "--val-fraction", "0"]) == 0
    out = tmp_path / "out"
    rg = load_script("retry_grids")
    shipped = P.DOUBT_RETRY_FACTORS
    assert rg.main([str(data), "-o", str(out), "--factors", "5/6", "4/6", "--grid-sets", "none", "5/6",
                    "5/6,4/6"]) == 0
    records = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [r["frame_id"] for r in records] == sorted(read_ground_truth(data / "poses.csv"))
    truth = read_ground_truth(data / "poses.csv")
    rows = {r["grids"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {"none", "0.8333", "0.8333+0.6667"}
    first_errors, full_errors = [], []
    assert P.DOUBT_RETRY_FACTORS == shipped  # the script built its own pipeline; the default is untouched
    pipe = P.Pipeline.from_files(None, None, device="cpu", retry_factors=(5.0 / 6.0, 4.0 / 6.0))
    for rec in records:
        spacings = [a["unet_spacing_mm"] for a in rec["attempts"]]
        assert spacings == pytest.approx([6.0, 5.0, 4.0])
        assert "rotation_voxel" in rec["attempts"][0]  # the first grid's mask was accepted on these volumes
        for a in rec["attempts"]:
            if "refused" in a:  # a retry grid whose mask the pipeline refuses has no pose, only the reason
                assert a["refused"] and "rotation_voxel" not in a
            else:
                assert np.asarray(a["rotation_voxel"]).shape == (3, 3) and len(a["translation_ras"]) == 3
        first_errors.append(geodesic_deg(np.asarray(rec["attempts"][0]["rotation_voxel"]),
                                         truth[rec["frame_id"]]["rotation_voxel"]))
        # the pipeline with only these grids keeps the attempt the script's choice names
        res = pipe.run(*load_volume(data / "images" / f"{rec['frame_id']}.nii.gz"), second_look="always")
        kept = rg.choose(rec["attempts"], (5.0 / 6.0, 4.0 / 6.0), rec["model_spacing_mm"])
        assert np.allclose(kept["rotation_voxel"], res.rotation_voxel, atol=1e-5)
        full_errors.append(geodesic_deg(res.rotation_voxel, truth[rec["frame_id"]]["rotation_voxel"]))
    assert float(rows["none"]["median_deg"]) == pytest.approx(float(np.median(first_errors)), abs=1e-3)
    assert float(rows["0.8333+0.6667"]["median_deg"]) == pytest.approx(float(np.median(full_errors)), abs=1e-3)
    # --reuse scores the kept attempts without the images
    shutil.rmtree(data / "images")
    (out / "summary.csv").unlink()
    assert rg.main([str(data), "-o", str(out), "--reuse", "--grid-sets", "none"]) == 0
    assert next(csv.DictReader(open(out / "summary.csv")))["median_deg"] == rows["none"]["median_deg"]
