"""Pose accuracy against annotations: geodesic rotation error, translation error, summaries and bins.

Pure numpy functions here; ``cli/evaluate.py`` does the file handling and the plot. Rotations compared are the
canonical axes in the voxel-axis frame (``rotation_voxel`` of an ``e3pose infer`` JSON; R_vc^T of the CSV), both
proper, so the left-right sign of e_x is settled by handedness and needs no special case.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .rotation import geodesic_deg  # noqa: F401  (re-exported: batched geodesic angle)

# Rotation-magnitude bins (degrees), as in Table 2 of the 3DPose-Net paper (Salehi et al. 2019).
MAGNITUDE_BINS = (0.0, 30.0, 60.0, 90.0, 120.0, 180.0)
SUCCESS_THRESHOLDS = (10.0, 30.0)


def rotation_magnitude_deg(R) -> np.ndarray:
    """Angle of R itself (its distance from the identity)."""
    return geodesic_deg(np.eye(3), R)


def axis_angles_deg(Ra, Rb) -> np.ndarray:
    """Angle between matching columns (e_x, e_y, e_z) of two axis matrices, degrees, shape (..., 3)."""
    Ra, Rb = np.asarray(Ra, dtype=np.float64), np.asarray(Rb, dtype=np.float64)
    cos = np.einsum("...ij,...ij->...j", Ra, Rb)
    na = np.linalg.norm(Ra, axis=-2) * np.linalg.norm(Rb, axis=-2)
    return np.degrees(np.arccos(np.clip(cos / na, -1.0, 1.0)))


def rotation_from_euler_csv(rot_x: float, rot_y: float, rot_z: float) -> np.ndarray:
    """The CSV's R_vc (voxel-axis frame -> canonical): scipy extrinsic 'xyz', degrees."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [rot_x, rot_y, rot_z], degrees=True).as_matrix()


def summarise(errors: Sequence[float], n_missing: int = 0,
              thresholds: Sequence[float] = SUCCESS_THRESHOLDS) -> Dict[str, Optional[float]]:
    """Statistics of the errors that exist; success rates over all cases, a missing prediction counting as a failure.

    Percentiles: numpy's default linear interpolation. Empty input gives None statistics (JSON null).
    """
    e = np.asarray([x for x in errors if x is not None and np.isfinite(x)], dtype=np.float64)
    n_total = len(e) + int(n_missing)
    out: Dict[str, Optional[float]] = {"n": int(len(e)), "n_missing": int(n_missing)}
    if len(e):
        out.update(mean=float(e.mean()), median=float(np.median(e)), p95=float(np.percentile(e, 95)),
                   max=float(e.max()))
    else:
        out.update(mean=None, median=None, p95=None, max=None)
    for t in thresholds:
        out[f"success_{t:g}"] = float(np.sum(e <= t) / n_total) if n_total else None
    return out


def bin_index(magnitudes, edges: Sequence[float] = MAGNITUDE_BINS) -> np.ndarray:
    """Bin of each magnitude: [e0, e1), [e1, e2), ..., last bin closed at 180."""
    m = np.round(np.asarray(magnitudes, dtype=np.float64), 6)  # 90 computed as 89.99999999 belongs to 90-120
    return np.searchsorted(np.asarray(edges[1:-1]), m, side="right")


def bin_label(i: int, edges: Sequence[float] = MAGNITUDE_BINS) -> str:
    return f"{edges[i]:g}-{edges[i + 1]:g}"


def summarise_by_magnitude(magnitudes, errors, missing_magnitudes: Iterable[float] = (),
                           edges: Sequence[float] = MAGNITUDE_BINS) -> List[dict]:
    """``summarise`` per ground-truth rotation-magnitude bin (missing predictions counted in their bin)."""
    idx = bin_index(magnitudes, edges)
    midx = bin_index(list(missing_magnitudes), edges) if len(list(missing_magnitudes)) else np.array([], int)
    errors = np.asarray(errors, dtype=np.float64)
    out = []
    for i in range(len(edges) - 1):
        s = summarise(errors[idx == i], n_missing=int(np.sum(midx == i)))
        s["bin"] = bin_label(i, edges)
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------- file input
def read_ground_truth(path) -> Dict[str, dict]:
    """CSV rows by frame_id: ``rotation_voxel`` (= R_vc^T), ``com_ras`` (None without com_r/a/s), ``fold``, ``ga_weeks``."""
    rows: Dict[str, dict] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.strip() for c in (reader.fieldnames or [])}
        need = {"frame_id", "rot_x", "rot_y", "rot_z"}
        if not need <= cols:
            raise ValueError(f"{path}: missing columns {sorted(need - cols)} (have {sorted(cols)})")
        has_com = {"com_r", "com_a", "com_s"} <= cols
        for r in reader:
            r = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
            fid = r["frame_id"]
            r_vc = rotation_from_euler_csv(float(r["rot_x"]), float(r["rot_y"]), float(r["rot_z"]))
            rows[fid] = dict(
                rotation_voxel=r_vc.T,
                com_ras=np.array([float(r[k]) for k in ("com_r", "com_a", "com_s")]) if has_com else None,
                fold=r.get("fold"), ga_weeks=float(r["ga_weeks"]) if r.get("ga_weeks") else None)
    return rows


def read_prediction(path) -> dict:
    """``rotation_voxel`` (3x3) and ``translation_ras`` (3 or None) from an ``e3pose infer`` JSON."""
    d = json.loads(Path(path).read_text())
    if "rotation_voxel" not in d:
        raise ValueError(f"{path}: no 'rotation_voxel' key (not an e3pose infer result?)")
    R = np.asarray(d["rotation_voxel"], dtype=np.float64)
    if R.shape != (3, 3) or not np.all(np.isfinite(R)):
        raise ValueError(f"{path}: 'rotation_voxel' is not a finite 3x3 matrix")
    t = d.get("translation_ras")
    return dict(rotation_voxel=R, translation_ras=None if t is None else np.asarray(t, dtype=np.float64))


def evaluate_cases(predictions: Dict[str, Optional[dict]], truth: Dict[str, dict]) -> List[dict]:
    """One row per ground-truth case: rotation error, per-axis errors, translation error, magnitude, bin, status."""
    out = []
    for fid, gt in truth.items():
        mag = float(rotation_magnitude_deg(gt["rotation_voxel"].T))
        row = dict(frame_id=fid, gt_rotation_deg=mag, bin=bin_label(int(bin_index([mag])[0])), fold=gt.get("fold"))
        pred = predictions.get(fid)
        if pred is None:
            row.update(status="missing", rotation_error_deg=math.nan, err_ex_deg=math.nan, err_ey_deg=math.nan,
                       err_ez_deg=math.nan, translation_error_mm=math.nan)
        else:
            ax = axis_angles_deg(pred["rotation_voxel"], gt["rotation_voxel"])
            terr = math.nan
            if gt["com_ras"] is not None and pred.get("translation_ras") is not None:
                terr = float(np.linalg.norm(pred["translation_ras"] - gt["com_ras"]))
            row.update(status="ok", rotation_error_deg=float(geodesic_deg(pred["rotation_voxel"], gt["rotation_voxel"])),
                       err_ex_deg=float(ax[0]), err_ey_deg=float(ax[1]), err_ez_deg=float(ax[2]),
                       translation_error_mm=terr)
        out.append(row)
    return out


def summary(cases: List[dict]) -> dict:
    """Overall and per-bin summaries of ``evaluate_cases`` rows."""
    ok = [c for c in cases if c["status"] == "ok"]
    missing = [c for c in cases if c["status"] != "ok"]
    rot = summarise([c["rotation_error_deg"] for c in ok], n_missing=len(missing))
    terrs = [c["translation_error_mm"] for c in ok if np.isfinite(c["translation_error_mm"])]
    trans = summarise(terrs, n_missing=len(missing), thresholds=(5.0, 10.0)) if terrs else None
    bins = summarise_by_magnitude([c["gt_rotation_deg"] for c in ok], [c["rotation_error_deg"] for c in ok],
                                  [c["gt_rotation_deg"] for c in missing])
    return dict(n_cases=len(cases), n_missing=len(missing), missing=[c["frame_id"] for c in missing],
                rotation_error_deg=rot, translation_error_mm=trans,
                translation_note=None if trans else "no translation error: the CSV has no com_r, com_a, com_s "
                                                    "columns or the predictions no translation_ras",
                by_rotation_magnitude=bins)
