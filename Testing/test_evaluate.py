"""Evaluation: hand-computed geodesic angles, summaries, bins, and the CLI end to end."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from E3PoseLogic import evaluate as ev


def rz(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def test_geodesic_hand_cases():
    assert ev.geodesic_deg(np.eye(3), rz(90)) == pytest.approx(90.0, abs=1e-12)
    assert ev.geodesic_deg(rz(30), rz(30)) == pytest.approx(0.0, abs=1e-6)
    assert ev.geodesic_deg(rz(170), rz(-170)) == pytest.approx(20.0, abs=1e-9)
    assert ev.geodesic_deg(np.eye(3), np.diag([-1.0, -1.0, 1.0])) == pytest.approx(180.0)
    r = Rotation.random(5, random_state=np.random.default_rng(0)).as_matrix()
    assert np.allclose(ev.geodesic_deg(r, r), 0.0, atol=1e-5)  # batched, clipped (no NaN from rounding)
    assert np.allclose(ev.geodesic_deg(r, r @ rz(45)), 45.0)
    assert ev.rotation_magnitude_deg(rz(-120)) == pytest.approx(120.0)
    assert np.allclose(ev.axis_angles_deg(np.eye(3), rz(90)), [90.0, 90.0, 0.0])


def test_summarise_tiny_list():
    s = ev.summarise([1.0, 2.0, 3.0, 4.0, 50.0], n_missing=1)
    assert s["n"] == 5 and s["n_missing"] == 1
    assert s["median"] == 3.0 and s["mean"] == 12.0 and s["max"] == 50.0
    assert s["p95"] == pytest.approx(4.0 + 0.8 * 46.0)  # linear: position 0.95 * 4 = 3.8
    assert s["success_10"] == pytest.approx(4 / 6)  # the missing case is a failure
    assert s["success_30"] == pytest.approx(4 / 6)
    e = ev.summarise([], n_missing=2)
    assert e["median"] is None and e["success_10"] == 0.0


def test_bins():
    assert ev.bin_index([0, 29.9, 30, 59, 60, 95, 120, 180]).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]
    b = ev.summarise_by_magnitude([10, 40, 100], [1.0, 20.0, 40.0], missing_magnitudes=[150])
    assert [x["bin"] for x in b] == ["0-30", "30-60", "60-90", "90-120", "120-180"]
    assert [x["n"] for x in b] == [1, 1, 0, 1, 0] and b[4]["n_missing"] == 1 and b[4]["success_30"] == 0.0


def write_case(pred_dir, fid, rotation_voxel, t):
    (pred_dir / f"{fid}.json").write_text(json.dumps(
        {"rotation_voxel": np.asarray(rotation_voxel).tolist(), "translation_ras": list(t), "input": f"{fid}.nii.gz"}))


def test_cli_end_to_end(tmp_path):
    from E3PoseLogic.cli import main

    # ground truth: R_vc as Euler; prediction rotation_voxel = R_vc^T composed with a known error
    truth = {"a": (0.0, 0.0, 20.0), "b": (0.0, 0.0, 100.0), "c": (90.0, 0.0, 0.0), "d": (0.0, 0.0, 45.0)}
    com = {"a": (1.0, 2.0, 3.0), "b": (0.0, 0.0, 0.0), "c": (10.0, 0.0, 0.0), "d": (0.0, 0.0, 0.0)}
    gt = tmp_path / "gt.csv"
    with open(gt, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame_id", "rot_x", "rot_y", "rot_z", "com_r", "com_a", "com_s", "fold"])
        for k, e in truth.items():
            w.writerow([k, *e, *com[k], "validation" if k != "d" else "training"])
    pred = tmp_path / "pred"
    pred.mkdir()
    r_vc = {k: Rotation.from_euler("xyz", e, degrees=True).as_matrix() for k, e in truth.items()}
    write_case(pred, "a", r_vc["a"].T, (1.0, 2.0, 7.0))  # exact rotation, 4 mm off
    write_case(pred, "b", r_vc["b"].T @ rz(15), (3.0, 4.0, 0.0))  # 15 degrees, 5 mm
    write_case(pred, "d", r_vc["d"].T @ rz(40), (0.0, 0.0, 0.0))  # 40 degrees; "c" missing
    (pred / "junk.json").write_text("{}")  # not a ground-truth id: ignored
    out = tmp_path / "eval"
    assert main(["evaluate", str(pred), str(gt), "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_cases"] == 4 and s["missing"] == ["c"]
    r = s["rotation_error_deg"]
    assert r["median"] == pytest.approx(15.0, abs=1e-6) and r["n"] == 3
    assert r["success_10"] == pytest.approx(0.25) and r["success_30"] == pytest.approx(0.5)
    assert s["translation_error_mm"]["median"] == pytest.approx(4.0)
    bins = {b["bin"]: b for b in s["by_rotation_magnitude"]}
    assert bins["0-30"]["n"] == 1 and bins["90-120"]["n"] == 1 and bins["30-60"]["n"] == 1
    assert bins["90-120"]["n_missing"] == 1  # case c: 90 degrees about x, magnitude 90 -> bin [90, 120)
    rows = {r["frame_id"]: r for r in csv.DictReader(open(out / "per_case.csv"))}
    assert float(rows["b"]["rotation_error_deg"]) == pytest.approx(15.0, abs=1e-4)
    assert rows["c"]["status"] == "missing"
    assert (out / "rotation_error_by_magnitude.png").stat().st_size > 5000

    # fold filter, and a CSV without com columns: translation skipped with a note
    gt2 = tmp_path / "gt2.csv"
    gt2.write_text("frame_id,rot_x,rot_y,rot_z,fold\na,0,0,20,training\nb,0,0,100,validation\n")
    assert main(["evaluate", str(pred), str(gt2), "-o", str(tmp_path / "e2"), "--fold", "validation",
                 "--no-plot"]) == 0
    s2 = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert s2["n_cases"] == 1 and s2["translation_error_mm"] is None and "com_r" in s2["translation_note"]


def test_cli_errors(tmp_path):
    from E3PoseLogic.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("frame_id,angle\na,1\n")
    assert main(["evaluate", str(tmp_path), str(bad)]) == 2
    assert main(["evaluate", str(tmp_path / "nope"), str(bad)]) == 2
