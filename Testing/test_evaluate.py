"""Evaluation: hand-computed geodesic angles, summaries, bins, subgroups, network-only vs final pose, hostile CSVs,
and the CLI end to end (real CSV and JSON files in a tmp folder)."""
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
    assert s["success_5"] == pytest.approx(4 / 6) and s["above_30"] == pytest.approx(2 / 6)
    assert s["failure_60"] == pytest.approx(1 / 6)  # only the missing case: 50 is not a failure
    e = ev.summarise([], n_missing=2)
    assert e["median"] is None and e["success_10"] == 0.0 and e["failure_60"] == 1.0 and e["above_30"] == 1.0
    # boundaries: success is <= T, above / failure are > T
    b = ev.summarise([5.0, 5.001, 10.0, 30.0, 30.001, 60.0, 60.001, 170.0])
    assert b["success_5"] == pytest.approx(1 / 8) and b["success_10"] == pytest.approx(3 / 8)
    assert b["success_30"] == pytest.approx(4 / 8) and b["above_30"] == pytest.approx(4 / 8)
    assert b["failure_60"] == pytest.approx(2 / 8)
    assert ev.summarise([], n_missing=0)["failure_60"] is None
    t = ev.summarise([1.0, 7.0], thresholds=(5.0, 10.0), failure_above=None, share_above=())
    assert set(t) == {"n", "n_missing", "mean", "median", "p95", "max", "success_5", "success_10"}


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
    # no network_rotation_voxel, no protocol / ga_weeks columns: no network section, no subgroups
    assert s["network_rotation_error_deg"] is None and s["refinement"] is None and s["by_subgroup"] == {}
    assert rows["b"]["network_rotation_error_deg"] == "" and s["warnings"] == []


def test_cli_errors(tmp_path):
    from E3PoseLogic.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("frame_id,angle\na,1\n")
    assert main(["evaluate", str(tmp_path), str(bad)]) == 2
    assert main(["evaluate", str(tmp_path / "nope"), str(bad)]) == 2


# ------------------------------------------------------------------------ subgroups and the network-only pose
def write_gt(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_pred(pred_dir, fid, r_vc, err_deg, t, network_err_deg=None):
    """Prediction whose final pose is err_deg off the truth (about z), and the network pose network_err_deg off."""
    d = {"rotation_voxel": (r_vc.T @ rz(err_deg)).tolist(), "translation_ras": list(t)}
    if network_err_deg is not None:
        d["network_rotation_voxel"] = (r_vc.T @ rz(network_err_deg)).tolist()
    (pred_dir / f"{fid}.json").write_text(json.dumps(d))


# frame_id: (protocol, ga_weeks, final error, network error, translation error in mm); None = no prediction
CASES = {
    "s1": ("standard", 22.0, 3.0, 8.0, 3.0),  # network within 10, refinement helped
    "s2": ("standard", 30.0, 12.0, 5.0, 1.0),  # network within 10, final worse by 7: the one counted
    "s3": ("standard", 30.0, 70.0, 70.0, 2.0),  # a failure (> 60) for both
    "n1": ("navigator", 24.0, 4.0, 9.0, 4.0),
    "n2": ("navigator", 36.0, 9.0, 7.5, 0.0),  # worse by 1.5 only: not counted
    "n3": ("navigator", 25.0, None, None, None),  # refused: a failure everywhere; 25 weeks belongs to ga_ge_25
    "n4": ("navigator", 20.0, 40.0, 20.0, 6.0),  # worse by 20, but the network was not within 10: not counted
}


def make_subgroup_case(tmp_path, protocol_column=True):
    rng = np.random.default_rng(3)
    gt_rows, r_vc = [], {}
    for fid, (proto, ga, *_rest) in CASES.items():
        e = rng.uniform(-170, 170, 3).round(3)
        r_vc[fid] = Rotation.from_euler("xyz", e, degrees=True).as_matrix()
        group = proto if protocol_column else {"standard": "no", "navigator": "Yes"}[proto]
        gt_rows.append([fid, *e, 10.0, 20.0, 30.0, ga, "test", group])
    header = ["frame_id", "rot_x", "rot_y", "rot_z", "com_r", "com_a", "com_s", "ga_weeks", "fold",
              "protocol" if protocol_column else "navigator"]
    gt = write_gt(tmp_path / "gt.csv", header, gt_rows)
    pred = tmp_path / "pred"
    pred.mkdir()
    for fid, (_p, _g, err, net, terr) in CASES.items():
        if err is not None:
            write_pred(pred, fid, r_vc[fid], err, (10.0 + terr, 20.0, 30.0), net)
    return pred, gt


def test_subgroups_and_network_pose(tmp_path, capsys):
    from E3PoseLogic.cli import main

    pred, gt = make_subgroup_case(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", str(pred), str(gt), "-o", str(out), "--no-plot"]) == 0
    text = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())

    r = s["rotation_error_deg"]  # final errors 3, 12, 70, 4, 9, 40 and one missing: 7 cases
    assert s["n_cases"] == 7 and s["missing"] == ["n3"] and r["n"] == 6
    assert r["median"] == pytest.approx(10.5, abs=1e-6)
    assert [r["success_5"], r["success_10"], r["success_30"]] == pytest.approx([2 / 7, 3 / 7, 4 / 7])
    assert r["above_30"] == pytest.approx(3 / 7) and r["failure_60"] == pytest.approx(2 / 7)
    n = s["network_rotation_error_deg"]  # network errors 8, 5, 70, 9, 7.5, 20 and the missing one
    assert n["median"] == pytest.approx(8.5, abs=1e-6) and n["n_missing"] == 1
    assert [n["success_5"], n["success_10"], n["failure_60"]] == pytest.approx([1 / 7, 4 / 7, 2 / 7])
    f = s["refinement"]
    assert (f["n_compared"], f["n_network_within"], f["n_worse"], f["worse"]) == (6, 4, 1, ["s2"])
    assert f["within_deg"] == 10.0 and f["worse_by_deg"] == 2.0 and f["n_without_network_pose"] == 0
    assert s["translation_error_mm"]["median"] == pytest.approx(2.5)

    g = s["by_subgroup"]
    assert list(g) == ["standard", "navigator", "ga_lt_25", "ga_ge_25"]
    st, nav, young, old = (g[k] for k in ("standard", "navigator", "ga_lt_25", "ga_ge_25"))
    assert (st["n_cases"], st["n_missing"], nav["n_cases"], nav["n_missing"]) == (3, 0, 4, 1)
    assert st["rotation_error_deg"]["median"] == pytest.approx(12.0, abs=1e-6)
    assert st["rotation_error_deg"]["success_5"] == pytest.approx(1 / 3)
    assert st["rotation_error_deg"]["failure_60"] == pytest.approx(1 / 3)
    assert st["refinement"]["worse"] == ["s2"] and nav["refinement"]["n_worse"] == 0
    assert nav["rotation_error_deg"]["median"] == pytest.approx(9.0, abs=1e-6)
    assert nav["rotation_error_deg"]["success_10"] == pytest.approx(2 / 4)
    assert nav["rotation_error_deg"]["failure_60"] == pytest.approx(1 / 4)  # the refused case
    assert nav["rotation_error_deg"]["above_30"] == pytest.approx(2 / 4)
    assert nav["network_rotation_error_deg"]["median"] == pytest.approx(9.0, abs=1e-6)  # 9, 7.5, 20
    assert st["translation_error_mm"]["median"] == pytest.approx(2.0)
    assert nav["translation_error_mm"]["median"] == pytest.approx(4.0)
    assert (young["n_cases"], young["n_missing"], old["n_cases"], old["n_missing"]) == (3, 0, 4, 1)
    assert young["rotation_error_deg"]["median"] == pytest.approx(4.0, abs=1e-6)  # s1, n1, n4
    assert old["rotation_error_deg"]["median"] == pytest.approx(12.0, abs=1e-6)  # s2, s3, n2 (+ n3 missing)
    for grp in g.values():  # the same statistics as the overall summary
        assert set(grp) == {"n_cases", "n_missing", "rotation_error_deg", "network_rotation_error_deg",
                            "refinement", "translation_error_mm", "doubtful", "brain_mask"}
        assert grp["doubtful"] is None  # these results have no residual network's frame choice
        assert grp["brain_mask"] is None  # no --labels
        assert set(grp["rotation_error_deg"]) == set(r)

    rows = {x["frame_id"]: x for x in csv.DictReader(open(out / "per_case.csv"))}
    assert float(rows["s2"]["rotation_error_deg"]) == pytest.approx(12.0, abs=1e-3)
    assert float(rows["s2"]["network_rotation_error_deg"]) == pytest.approx(5.0, abs=1e-3)
    assert rows["n3"]["network_rotation_error_deg"] == "" and rows["n3"]["status"] == "missing"
    assert rows["n1"]["protocol"] == "navigator" and float(rows["n1"]["ga_weeks"]) == 24.0

    assert "success <=5 deg 28.6 %" in text and "failures >60 deg 28.6 %" in text
    assert "network alone: median 8.50 deg" in text
    assert "worse than the network by >2 deg: 1 of 4 cases with the network within 10 deg (s2)" in text
    for name in ("standard: 3 cases, 0 missing", "navigator: 4 cases, 1 missing", "ga_lt_25: 3 cases",
                 "ga_ge_25: 4 cases, 1 missing"):
        assert name in text


def test_navigator_column_yes_no(tmp_path):
    """A boolean-ish ``navigator`` column gives the same subgroups as ``protocol``; a value that is not yes/no
    is refused with its line."""
    from E3PoseLogic.cli import main

    pred, gt = make_subgroup_case(tmp_path, protocol_column=False)
    assert main(["evaluate", str(pred), str(gt), "-o", str(tmp_path / "e"), "--no-plot"]) == 0
    g = json.loads((tmp_path / "e" / "summary.json").read_text())["by_subgroup"]
    assert g["standard"]["n_cases"] == 3 and g["navigator"]["n_cases"] == 4
    assert g["navigator"]["rotation_error_deg"]["median"] == pytest.approx(9.0, abs=1e-6)
    for value, want in (("1", "navigator"), ("TRUE", "navigator"), ("0", "standard"), ("false", "standard"),
                        ("", None)):
        bad = gt.read_text().replace(",no\n", f",{value}\n", 1)
        (tmp_path / "v.csv").write_text(bad)
        got = ev.read_ground_truth(tmp_path / "v.csv")["s1"]["protocol"]
        assert got == want, value
    (tmp_path / "v.csv").write_text(gt.read_text().replace(",no\n", ",maybe\n", 1))
    with pytest.raises(ValueError, match=r"line 2 \(frame_id 's1'\): navigator is 'maybe'"):
        ev.read_ground_truth(tmp_path / "v.csv")


def test_mixed_network_pose_and_bad_network_matrix(tmp_path):
    truth = {"a": dict(rotation_voxel=np.eye(3), com_ras=None), "b": dict(rotation_voxel=np.eye(3), com_ras=None)}
    preds = {"a": dict(rotation_voxel=rz(1.0), network_rotation_voxel=rz(4.0)),
             "b": dict(rotation_voxel=rz(20.0), network_rotation_voxel=None)}
    s = ev.summary(ev.evaluate_cases(preds, truth))
    assert s["refinement"]["n_compared"] == 1 and s["refinement"]["n_without_network_pose"] == 1
    assert s["network_rotation_error_deg"]["n"] == 1 and s["rotation_error_deg"]["n"] == 2
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"rotation_voxel": np.eye(3).tolist(), "network_rotation_voxel": [[1, 0], [0, 1]]}))
    with pytest.raises(ValueError, match="network_rotation_voxel"):
        ev.read_prediction(f)
    f.write_text(json.dumps({"rotation_voxel": np.eye(3).tolist(), "network_rotation_voxel": None}))
    assert ev.read_prediction(f)["network_rotation_voxel"] is None


def test_synth_writes_protocol_column(tmp_path):
    """``e3pose synth`` appends ``protocol`` (standard / navigator) after the old columns; evaluate splits by it."""
    from E3PoseLogic.cli import main
    from E3PoseLogic.synth import AcquisitionConfig, SynthConfig, generate_dataset

    old = ["frame_id", "rot_x", "rot_y", "rot_z", "com_r", "com_a", "com_s", "ga_weeks", "fold"]
    std = SynthConfig(acquisition=AcquisitionConfig(voxel_mm=(4.0,), size_mm=(200.0,)))
    generate_dataset(tmp_path / "std", 1, seed=11, cfg=std)
    generate_dataset(tmp_path / "nav", 1, seed=12, cfg=SynthConfig(acquisition=AcquisitionConfig(navigator=True)))
    rows = []
    for name, want in (("std", "standard"), ("nav", "navigator")):
        with open(tmp_path / name / "poses.csv", newline="") as f:
            r = list(csv.DictReader(f))
        assert list(r[0]) == old + ["protocol"] and [x["protocol"] for x in r] == [want]
        rows += r
    gt = write_gt(tmp_path / "all.csv", old + ["protocol"], [[x[k] for k in old + ["protocol"]] for x in rows])
    pred = tmp_path / "pred"
    pred.mkdir()
    for x in rows:  # perfect predictions, straight from the CSV's Euler angles
        r_vc = Rotation.from_euler("xyz", [float(x[k]) for k in ("rot_x", "rot_y", "rot_z")], degrees=True)
        write_case(pred, x["frame_id"], r_vc.as_matrix().T, [float(x[k]) for k in ("com_r", "com_a", "com_s")])
    assert main(["evaluate", str(pred), str(gt), "-o", str(tmp_path / "e"), "--no-plot"]) == 0
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert s["by_subgroup"]["standard"]["n_cases"] == 1 and s["by_subgroup"]["navigator"]["n_cases"] == 1
    assert s["rotation_error_deg"]["max"] < 1e-3 and s["rotation_error_deg"]["success_5"] == 1.0


# ------------------------------------------------------------------------ hostile annotation CSVs (issue 9, 3.4)
HEADER = ["frame_id", "rot_x", "rot_y", "rot_z", "com_r", "com_a", "com_s", "ga_weeks"]


def _pred_for(tmp_path, ids=("a", "b")):
    pred = tmp_path / "pred"
    pred.mkdir(exist_ok=True)
    for fid in ids:
        write_case(pred, fid, rz(-10.0), (0.0, 0.0, 0.0))  # truth below: 10 degrees about z, com at 0
    return pred


@pytest.mark.parametrize("column,value", [("rot_x", "nan"), ("rot_y", "NaN"), ("rot_z", "1e999"), ("rot_x", "inf"),
                                          ("rot_z", "-Infinity"), ("rot_y", "1e300"), ("rot_x", ""),
                                          ("rot_x", "ten"), ("com_a", "nan"), ("ga_weeks", "inf")])
def test_bad_ground_truth_values_are_refused(tmp_path, capsys, column, value):
    """NaN, infinite (overflowing) or absurd ground truth stops the run (before: exit 0, status ok, median null),
    naming the file, the line, the frame_id and the column."""
    from E3PoseLogic.cli import main

    row_b = {"frame_id": "b", "rot_x": "0", "rot_y": "0", "rot_z": "10", "com_r": "0", "com_a": "0", "com_s": "0",
             "ga_weeks": "30"}
    row_b[column] = value
    gt = write_gt(tmp_path / "gt.csv", HEADER, [["a", 0, 0, 10, 0, 0, 0, 30], [row_b[k] for k in HEADER]])
    out = tmp_path / "eval"
    assert main(["evaluate", str(_pred_for(tmp_path)), str(gt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    said = f"{column} is {value!r}" if value else f"{column} is empty"
    assert str(gt) in err and f"line 3 (frame_id 'b'): {said}" in err
    assert not out.exists()  # nothing written from a bad CSV


def test_every_bad_row_is_listed(tmp_path):
    gt = write_gt(tmp_path / "gt.csv", HEADER, [["a", "nan", 0, 0, 0, 0, 0, 30], ["b", 0, 0, 10, 0, 0, 0, 30],
                                                ["c", 0, "inf", 0, 0, 0, 0, 30], ["", 0, 0, 0, 0, 0, 0, 30],
                                                ["d", 0, 0]])
    with pytest.raises(ValueError) as e:
        ev.read_ground_truth(gt)
    msg = str(e.value)
    assert str(gt) in msg and "4 bad row(s)" in msg
    for part in ("line 2 (frame_id 'a'): rot_x is 'nan'", "line 4 (frame_id 'c'): rot_y is 'inf'",
                 "line 5: frame_id is empty", "line 6 (frame_id 'd'): 3 fields where the header has 8"):
        assert part in msg
    write_gt(gt, ["frame_id", "rot_x", "rot_y", "rot_z"], [["a", 0, 0, 0, 5]])
    with pytest.raises(ValueError, match="line 2 .*5 fields where the header has 4"):
        ev.read_ground_truth(gt)


def test_csv_with_byte_order_mark(tmp_path):
    """A CSV saved with a UTF-8 BOM (Excel's "CSV UTF-8") is read (before: "missing columns ['frame_id']")."""
    from E3PoseLogic.cli import main

    gt = write_gt(tmp_path / "gt.csv", HEADER, [["a", 0, 0, 10, 0, 0, 0, 30], ["b", 0, 0, 10, 3, 4, 0, 22]],
                  encoding="utf-8-sig")
    assert gt.read_bytes().startswith(b"\xef\xbb\xbfframe_id")
    assert main(["evaluate", str(_pred_for(tmp_path)), str(gt), "-o", str(tmp_path / "e"), "--no-plot"]) == 0
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert s["n_cases"] == 2 and s["rotation_error_deg"]["median"] == pytest.approx(0.0, abs=1e-6)
    assert s["translation_error_mm"]["max"] == pytest.approx(5.0)
    assert list(s["by_subgroup"]) == ["ga_lt_25", "ga_ge_25"]


def test_duplicate_frame_ids_differing_is_an_error(tmp_path, capsys):
    """Two rows for one frame_id with different values: which is the truth is unknown, so stop and name them
    (before: the last row silently won)."""
    from E3PoseLogic.cli import main

    gt = write_gt(tmp_path / "gt.csv", HEADER, [["a", 0, 0, 10, 0, 0, 0, 30], ["b", 0, 0, 10, 0, 0, 0, 30],
                                                ["a", 0, 0, 50, 0, 0, 0, 30], ["b", 0, 0, 10, 0, 0, 0, 31]])
    out = tmp_path / "eval"
    assert main(["evaluate", str(_pred_for(tmp_path)), str(gt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(gt) in err and "repeated with different values" in err
    assert "'a' on lines 2, 4" in err and "'b' on lines 3, 5" in err
    assert not out.exists()


def test_duplicate_identical_rows_warn_and_count_once(tmp_path, capsys):
    from E3PoseLogic.cli import main

    gt = write_gt(tmp_path / "gt.csv", HEADER, [["a", 0, 0, 10, 0, 0, 0, 30], ["b", 0, 0, 10, 0, 0, 0, 30],
                                                ["a", 0, 0, 10, 0, 0, 0, 30]])
    assert main(["evaluate", str(_pred_for(tmp_path)), str(gt), "-o", str(tmp_path / "e"), "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(gt) in err and "'a' on lines 2, 4" in err and "counted once" in err
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert s["n_cases"] == 2 and len(s["warnings"]) == 1 and "'a'" in s["warnings"][0]
    with pytest.warns(UserWarning, match="counted once"):  # library callers (the trainers) get a Python warning
        assert len(ev.read_ground_truth(gt)) == 2


def test_doubtful_flags_are_scored_against_the_failures():
    """group_summary counts how many poses off by more than 30 deg the results flagged doubtful, and how many of
    the others; results without the flag are left out, missing ones too."""
    from E3PoseLogic.evaluate import group_summary

    def case(err, doubtful, status="ok"):
        return dict(status=status, rotation_error_deg=err, translation_error_mm=1.0, network_rotation_error_deg=err,
                    frame_id=f"c{err}", doubtful=doubtful)

    cases = [case(45.0, True), case(100.0, False), case(2.0, True), case(1.0, False), case(3.0, False),
             case(50.0, None), case(float("nan"), None, status="missing")]
    d = group_summary(cases)["doubtful"]
    assert (d["n_above"], d["n_above_flagged"], d["n_others"], d["n_others_flagged"]) == (2, 1, 3, 1)
    assert d["above_deg"] == 30.0


def test_labels_score_the_predicted_brain_masks(tmp_path, capsys):
    """--labels: Dice and centre distance of NAME_mask.nii.gz against the annotation, whatever grid each lies on; a
    case whose files are missing is named and the others are still scored."""
    from E3PoseLogic.cli import main
    from E3PoseLogic.volume_io import save_volume

    gt = write_gt(tmp_path / "gt.csv", ["frame_id", "rot_x", "rot_y", "rot_z", "protocol"],
                  [["a", 0, 0, 0, "standard"], ["b", 0, 0, 0, "standard"], ["c", 0, 0, 0, "navigator"],
                   ["d", 0, 0, 0, "navigator"]])
    pred, labels = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir(), labels.mkdir()
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = (-20.0, 7.0, 3.0)
    truth = np.zeros((20, 20, 20), np.int16)
    truth[5:15, 5:15, 5:15] = 1
    truth[2, 2, 2] = 2  # eyes: not brain
    for fid in "abcd":
        write_pred(pred, fid, np.eye(3), 0.0, (0.0, 0.0, 0.0))
        if fid != "d":
            save_volume(labels / f"{fid}.nii.gz", truth, coarse, dtype=np.int16)
    shifted = np.zeros_like(truth)
    shifted[7:17, 5:15, 5:15] = 1  # two voxels (4 mm) along i: Dice 2 * 800 / 2000
    shifted[0:3, 0:3, 0:3] = 2  # predicted eyes are not brain either
    save_volume(pred / "a_mask.nii.gz", shifted, coarse, dtype=np.uint8)
    fine = coarse.copy()
    fine[:3, :3] = np.eye(3)  # a 1 mm grid over the same region: the same cube, mapped onto the annotation's grid
    cube = np.zeros((40, 40, 40), np.uint8)
    cube[10:30, 10:30, 10:30] = 1
    save_volume(pred / "b_mask.nii.gz", cube, fine, dtype=np.uint8)
    save_volume(pred / "d_mask.nii.gz", cube, fine, dtype=np.uint8)  # "c": no mask, "d": no annotation
    out = tmp_path / "ev"
    assert main(["evaluate", str(pred), str(gt), "-o", str(out), "--no-plot", "--labels", str(labels)]) == 0
    rows = {r["frame_id"]: r for r in csv.DictReader(open(out / "per_case.csv"))}
    assert float(rows["a"]["brain_dice"]) == pytest.approx(0.8, abs=1e-4)
    assert float(rows["a"]["mask_centre_error_mm"]) == pytest.approx(4.0, abs=1e-4)
    assert float(rows["b"]["brain_dice"]) == pytest.approx(1.0) and float(rows["b"]["mask_centre_error_mm"]) < 1e-3
    assert rows["c"]["brain_dice"] == "" and rows["d"]["brain_dice"] == ""
    s = json.loads((out / "summary.json").read_text())
    m = s["brain_mask"]
    assert m["n"] == 2 and m["dice_median"] == pytest.approx(0.9, abs=1e-4) and m["share_centre_above_4mm"] == 0.0
    assert s["by_subgroup"]["standard"]["brain_mask"]["n"] == 2 and s["by_subgroup"]["navigator"]["brain_mask"] is None
    assert len(s["mask_problems"]) == 2
    assert "c_mask.nii.gz" in s["mask_problems"][0] and "no annotation for d" in s["mask_problems"][1]
    captured = capsys.readouterr()
    assert "brain mask (2 scored): Dice median 0.900" in captured.out and "c_mask.nii.gz" in captured.err
    # without --labels nothing about masks; a labels path that is not a folder is refused
    assert main(["evaluate", str(pred), str(gt), "-o", str(tmp_path / "ev2"), "--no-plot"]) == 0
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["brain_mask"] is None
    assert main(["evaluate", str(pred), str(gt), "--labels", str(tmp_path / "nope")]) == 2
