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

from .residual import frame_choice
from .rotation import geodesic_deg  # noqa: F401  (re-exported: batched geodesic angle)

# Rotation-magnitude bins (degrees), as in Table 2 of the 3DPose-Net paper (Salehi et al. 2019).
MAGNITUDE_BINS = (0.0, 30.0, 60.0, 90.0, 120.0, 180.0)
SUCCESS_THRESHOLDS = (5.0, 10.0, 30.0)  # success_T: error <= T over all cases (a missing prediction fails)
SHARE_ABOVE = (30.0,)  # above_T: error > T or missing, over all cases (= 1 - success_T)
FAILURE_DEG = 60.0  # failure_60: the E(3)-Pose paper's failure (error > 60 degrees), a missing prediction included
GA_SPLIT_WEEKS = 25.0  # subgroups ga_lt_25 / ga_ge_25
REFINE_WITHIN_DEG, REFINE_WORSE_DEG = 10.0, 2.0  # refinement check: final worse by > 2 deg where the network was <= 10
MAX_ABS_ANGLE_DEG = 1e6  # larger Euler angles are corrupt values, not poses


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


def summarise(errors: Sequence[float], n_missing: int = 0, thresholds: Sequence[float] = SUCCESS_THRESHOLDS,
              failure_above: Optional[float] = FAILURE_DEG,
              share_above: Sequence[float] = SHARE_ABOVE) -> Dict[str, Optional[float]]:
    """Statistics of the errors that exist; rates over all cases, a missing prediction counting as a failure.

    ``success_T``: share with error <= T; ``above_T``: share with error > T or missing; ``failure_F``: the same
    above ``failure_above``. Percentiles: numpy's default linear interpolation. Empty input gives None statistics
    (JSON null); rates are None only when there is no case at all.
    """
    e = np.asarray([x for x in errors if x is not None and np.isfinite(x)], dtype=np.float64)
    n_total = len(e) + int(n_missing)
    out: Dict[str, Optional[float]] = {"n": int(len(e)), "n_missing": int(n_missing)}
    if len(e):
        out.update(mean=float(e.mean()), median=float(np.median(e)), p95=float(np.percentile(e, 95)),
                   max=float(e.max()))
    else:
        out.update(mean=None, median=None, p95=None, max=None)

    def rate(count):
        return float(count / n_total) if n_total else None

    for t in thresholds:
        out[f"success_{t:g}"] = rate(np.sum(e <= t))
    for t in share_above:
        out[f"above_{t:g}"] = rate(np.sum(e > t) + n_missing)
    if failure_above is not None:
        out[f"failure_{failure_above:g}"] = rate(np.sum(e > failure_above) + n_missing)
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
    missing_magnitudes = list(missing_magnitudes)
    midx = bin_index(missing_magnitudes, edges) if missing_magnitudes else np.array([], int)
    errors = np.asarray(errors, dtype=np.float64)
    out = []
    for i in range(len(edges) - 1):
        s = summarise(errors[idx == i], n_missing=int(np.sum(midx == i)))
        s["bin"] = bin_label(i, edges)
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------- file input
_TRUE = {"1", "true", "yes", "y", "t", "navigator"}
_FALSE = {"0", "false", "no", "n", "f", "standard"}


def _protocol(value: Optional[str]) -> Optional[str]:
    """A ``protocol`` cell, lower case; "navigator-like" and "nav" mean "navigator"; empty -> None."""
    v = (value or "").strip().lower()
    if not v:
        return None
    return "navigator" if v in ("navigator-like", "navigator_like", "nav") else v


def _navigator_flag(value: Optional[str]) -> Optional[str]:
    """A boolean-ish ``navigator`` cell -> "navigator" / "standard"; empty -> None; anything else raises."""
    v = (value or "").strip().lower()
    if not v:
        return None
    if v in _TRUE:
        return "navigator"
    if v in _FALSE:
        return "standard"
    raise ValueError(f"navigator is {value!r}, not a yes/no value (1/0, true/false, yes/no)")


def _number(r: dict, key: str, what: str, limit: Optional[float] = None) -> float:
    raw = r.get(key)
    if raw is None or raw == "":
        raise ValueError(f"{key} is empty")
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{key} is {raw!r}, not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{key} is {raw!r}, not a finite {what}")
    if limit is not None and abs(v) > limit:
        raise ValueError(f"{key} is {raw!r}, beyond +-{limit:g} (not a {what})")
    return v


def read_ground_truth(path, warnings_out: Optional[List[str]] = None) -> Dict[str, dict]:
    """CSV rows by frame_id: ``rotation_voxel`` (= R_vc^T), ``com_ras`` (None without com_r/a/s or with the three
    cells empty), ``fold``, ``ga_weeks`` (None when absent or empty), ``protocol`` (None when unknown).

    Strict, so that no wrong number reaches a summary: every angle must be a finite number of degrees (at most
    1e6 in magnitude), com_* and ga_weeks finite when given; the error names the file, line and frame_id of each
    bad row. A UTF-8 byte-order mark is accepted. A frame_id repeated with different values is an error naming the
    ids; repeated with identical values it is kept once and reported in ``warnings_out`` (a list to append to;
    without one, ``warnings.warn``). ``protocol`` comes from a ``protocol`` column (standard / navigator, other
    names kept as given) or else a boolean-ish ``navigator`` column.
    """
    rows: Dict[str, dict] = {}
    raw_rows: Dict[str, tuple] = {}
    lines: Dict[str, List[int]] = {}
    errors: List[str] = []
    conflicting: List[str] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip() for c in (reader.fieldnames or []) if c}
        need = {"frame_id", "rot_x", "rot_y", "rot_z"}
        if not need <= cols:
            raise ValueError(f"{path}: missing columns {sorted(need - cols)} (have {sorted(cols)})")
        has_com = {"com_r", "com_a", "com_s"} <= cols
        for raw in reader:
            line = reader.line_num
            r = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items() if k}
            fid = r.get("frame_id") or ""
            where = f"line {line}" + (f" (frame_id {fid!r})" if fid else "")
            try:
                if not fid:
                    raise ValueError("frame_id is empty")
                if raw.get(None) or any(v is None for v in r.values()):
                    n = sum(v is not None for v in r.values()) + len(raw.get(None) or [])
                    raise ValueError(f"{n} fields where the header has {len(r)}")
                angles = [_number(r, k, "angle in degrees", MAX_ABS_ANGLE_DEG) for k in ("rot_x", "rot_y", "rot_z")]
                com = None
                if has_com and any(r.get(k) for k in ("com_r", "com_a", "com_s")):
                    com = np.array([_number(r, k, "coordinate in mm") for k in ("com_r", "com_a", "com_s")])
                ga = _number(r, "ga_weeks", "number of weeks") if r.get("ga_weeks") else None
                protocol = _protocol(r.get("protocol")) or _navigator_flag(r.get("navigator"))
            except ValueError as e:
                errors.append(f"{where}: {e}")
                continue
            lines.setdefault(fid, []).append(line)
            key = tuple(sorted(r.items()))
            if fid in rows:
                if raw_rows[fid] != key and fid not in conflicting:
                    conflicting.append(fid)
                continue
            raw_rows[fid] = key
            rows[fid] = dict(rotation_voxel=rotation_from_euler_csv(*angles).T, com_ras=com, fold=r.get("fold"),
                             ga_weeks=ga, protocol=protocol)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise ValueError(f"{path}: {len(errors)} bad row(s):\n  " + "\n  ".join(shown))
    if conflicting:
        detail = "; ".join(f"{fid!r} on lines {', '.join(map(str, lines[fid]))}" for fid in conflicting[:20])
        raise ValueError(f"{path}: frame_id repeated with different values ({len(conflicting)} id(s)): {detail}. "
                         "Keep one row per frame_id.")
    repeated = [fid for fid, ls in lines.items() if len(ls) > 1]
    if repeated:
        msg = (f"{path}: {len(repeated)} frame_id(s) repeated with identical rows, each counted once: "
               + "; ".join(f"{fid!r} on lines {', '.join(map(str, lines[fid]))}" for fid in repeated[:20]))
        if warnings_out is None:
            import warnings

            warnings.warn(msg, stacklevel=2)
        else:
            warnings_out.append(msg)
    return rows


def _matrix(d: dict, key: str, path) -> Optional[np.ndarray]:
    if d.get(key) is None:
        return None
    try:
        R = np.asarray(d[key], dtype=np.float64)
    except (TypeError, ValueError):
        R = None
    if R is None or R.shape != (3, 3) or not np.all(np.isfinite(R)):
        raise ValueError(f"{path}: {key!r} is not a finite 3x3 matrix")
    return R


def read_prediction(path) -> dict:
    """``rotation_voxel`` (3x3), ``network_rotation_voxel`` (3x3 or None: the network's pose before refinement),
    ``translation_ras`` (3 or None) and ``doubtful`` (True / False, None without a residual network's frame choice)
    from an ``e3pose infer`` JSON."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(d, dict) or "rotation_voxel" not in d:
        raise ValueError(f"{path}: no 'rotation_voxel' key (not an e3pose infer result?)")
    t = d.get("translation_ras")
    if t is not None:
        t = np.asarray(t, dtype=np.float64)
        if t.shape != (3,) or not np.all(np.isfinite(t)):
            raise ValueError(f"{path}: 'translation_ras' is not a finite 3-vector")
    ref = (d.get("confidence") or {}).get("refinement") if isinstance(d.get("confidence"), dict) else None
    choice = frame_choice(ref)
    doubtful = bool(choice["doubtful"]) if "doubtful" in choice else None
    return dict(rotation_voxel=_matrix(d, "rotation_voxel", path),
                network_rotation_voxel=_matrix(d, "network_rotation_voxel", path), translation_ras=t,
                doubtful=doubtful)


def evaluate_cases(predictions: Dict[str, Optional[dict]], truth: Dict[str, dict]) -> List[dict]:
    """One row per ground-truth case: rotation errors (final and, when given, network-only), per-axis errors,
    translation error, magnitude, bin, subgroup fields, status."""
    out = []
    for fid, gt in truth.items():
        mag = float(rotation_magnitude_deg(gt["rotation_voxel"].T))
        row = dict(frame_id=fid, gt_rotation_deg=mag, bin=bin_label(int(bin_index([mag])[0])), fold=gt.get("fold"),
                   protocol=gt.get("protocol"), ga_weeks=gt.get("ga_weeks"), rotation_error_deg=math.nan,
                   err_ex_deg=math.nan, err_ey_deg=math.nan, err_ez_deg=math.nan, translation_error_mm=math.nan,
                   network_rotation_error_deg=math.nan, doubtful=None)
        pred = predictions.get(fid)
        if pred is None:
            row["status"] = "missing"
        else:
            ax = axis_angles_deg(pred["rotation_voxel"], gt["rotation_voxel"])
            if gt["com_ras"] is not None and pred.get("translation_ras") is not None:
                row["translation_error_mm"] = float(np.linalg.norm(pred["translation_ras"] - gt["com_ras"]))
            if pred.get("network_rotation_voxel") is not None:
                row["network_rotation_error_deg"] = float(geodesic_deg(pred["network_rotation_voxel"],
                                                                       gt["rotation_voxel"]))
            row["doubtful"] = pred.get("doubtful")
            row.update(status="ok", rotation_error_deg=float(geodesic_deg(pred["rotation_voxel"], gt["rotation_voxel"])),
                       err_ex_deg=float(ax[0]), err_ey_deg=float(ax[1]), err_ez_deg=float(ax[2]))
        out.append(row)
    return out


def brain_mask_scores(pred_mask_path, label_path) -> dict:
    """Brain Dice and centre-of-mass distance (mm) of a predicted label map (``e3pose infer``'s NAME_mask.nii.gz)
    against an annotated one (1 = brain; other labels ignored), on the annotation's grid.

    Why: on the held-out sets the pose's large errors follow the U-Net's mask (a small or shifted mask moves the crop),
    so an evaluation that shows where the pose fails has to show the mask too. The prediction is mapped onto the
    annotation's grid nearest-neighbour through world coordinates, so the two files may lie on different grids.
    Raises ``InputError`` (naming the file) for an unreadable file, an empty annotation or no overlap of the grids.
    """
    from scipy import ndimage

    from . import frames
    from .errors import InputError
    from .volume_io import load_mask, load_volume

    labels, affine = load_volume(label_path, labels=True)
    truth = labels == 1
    if not truth.any():
        raise InputError(label_path, "the annotation has no brain (no voxel with label 1)")
    pred = load_mask(pred_mask_path, affine, truth.shape).astype(bool)
    dice = 2.0 * float(np.count_nonzero(pred & truth)) / float(np.count_nonzero(pred) + np.count_nonzero(truth))
    com = [frames.apply(affine, np.array(ndimage.center_of_mass(m))) for m in (pred, truth)]
    return dict(brain_dice=dice, mask_centre_error_mm=float(np.linalg.norm(com[0] - com[1])))


def add_mask_scores(cases: List[dict], pred_dir, label_dir) -> List[str]:
    """``brain_dice`` and ``mask_centre_error_mm`` on every row with a prediction (NaN where they cannot be had);
    returns one message per case that could not be scored (a missing or unreadable file: the others go on)."""
    from .errors import InputError
    from .volume_io import find_nifti

    problems = []
    for c in cases:
        c.setdefault("brain_dice", math.nan)
        c.setdefault("mask_centre_error_mm", math.nan)
        if c["status"] != "ok":
            continue
        fid = c["frame_id"]
        pred = Path(pred_dir) / f"{fid}_mask.nii.gz"
        label = find_nifti(label_dir, fid)
        if not pred.is_file():
            problems.append(f"{pred}: no predicted mask (e3pose infer writes NAME_mask.nii.gz beside NAME.json)")
        elif label is None:
            problems.append(f"{Path(label_dir) / fid}.nii[.gz]: no annotation for {fid}")
        else:
            try:
                c.update(brain_mask_scores(pred, label))
            except InputError as e:
                problems.append(str(e))
    return problems


MASK_CENTRE_MM = 4.0  # a mask centre this far off moves the E3-CNN's crop enough to matter (crop-jitter probe)
DOUBT_CHECK_DEG = 30.0  # the "doubtful" flag is scored on finding the poses off by more than this


def subgroups(cases: List[dict]) -> Dict[str, List[dict]]:
    """Cases per subgroup: each protocol (standard, navigator, others as named) and gestational age below / from
    25 weeks; a subgroup appears only when some case has the field."""
    groups: Dict[str, List[dict]] = {}
    names = sorted({c["protocol"] for c in cases if c.get("protocol")},
                   key=lambda n: ({"standard": 0, "navigator": 1}.get(n, 2), n))
    for n in names:
        groups[n] = [c for c in cases if c.get("protocol") == n]
    if any(c.get("ga_weeks") is not None for c in cases):
        groups[f"ga_lt_{GA_SPLIT_WEEKS:g}"] = [c for c in cases if c.get("ga_weeks") is not None
                                               and c["ga_weeks"] < GA_SPLIT_WEEKS]
        groups[f"ga_ge_{GA_SPLIT_WEEKS:g}"] = [c for c in cases if c.get("ga_weeks") is not None
                                               and c["ga_weeks"] >= GA_SPLIT_WEEKS]
    return groups


def group_summary(cases: List[dict]) -> dict:
    """The statistics reported for every group (all cases and each subgroup).

    ``rotation_error_deg``: the final pose; ``network_rotation_error_deg`` (None when no prediction has
    ``network_rotation_voxel``): the network alone; ``refinement``: how many cases the final pose made worse than
    the network by more than 2 degrees among those whose network pose was within 10 degrees; ``brain_mask`` (None
    unless ``add_mask_scores`` ran): the predicted mask's Dice and centre error. Missing predictions count as failures
    in every rate (not in the mask's statistics, which need a mask).
    """
    ok = [c for c in cases if c["status"] == "ok"]
    n_missing = len(cases) - len(ok)
    rot = summarise([c["rotation_error_deg"] for c in ok], n_missing=n_missing)
    terrs = [c["translation_error_mm"] for c in ok if np.isfinite(c["translation_error_mm"])]
    trans = summarise(terrs, n_missing=n_missing, thresholds=(5.0, 10.0), failure_above=None,
                      share_above=()) if terrs else None
    both = [c for c in ok if np.isfinite(c.get("network_rotation_error_deg", math.nan))]
    net = refine = None
    if both:
        net = summarise([c["network_rotation_error_deg"] for c in both], n_missing=n_missing)
        near = [c for c in both if c["network_rotation_error_deg"] <= REFINE_WITHIN_DEG]
        worse = [c["frame_id"] for c in near
                 if c["rotation_error_deg"] > c["network_rotation_error_deg"] + REFINE_WORSE_DEG]
        refine = dict(n_compared=len(both), n_without_network_pose=len(ok) - len(both),
                      within_deg=REFINE_WITHIN_DEG, worse_by_deg=REFINE_WORSE_DEG,
                      n_network_within=len(near), n_worse=len(worse), worse=worse)
    flagged = [c for c in ok if c.get("doubtful") is not None]
    doubt = None
    if flagged:  # how well the "doubtful" flag of the results finds the poses off by more than 30 deg
        bad = [c for c in flagged if c["rotation_error_deg"] > DOUBT_CHECK_DEG]
        doubt = dict(above_deg=DOUBT_CHECK_DEG, n_above=len(bad), n_above_flagged=sum(bool(c["doubtful"]) for c in bad),
                     n_others=len(flagged) - len(bad),
                     n_others_flagged=sum(bool(c["doubtful"]) for c in flagged) - sum(bool(c["doubtful"]) for c in bad))
    scored = [c for c in ok if np.isfinite(c.get("brain_dice", math.nan))]
    mask = None
    if scored:  # the mask the pose was made from, against the annotation (``add_mask_scores``)
        dice = np.array([c["brain_dice"] for c in scored])
        dist = np.array([c["mask_centre_error_mm"] for c in scored])
        mask = dict(n=len(scored), dice_median=float(np.median(dice)), dice_p10=float(np.percentile(dice, 10)),
                    centre_error_median_mm=float(np.median(dist)), centre_error_p95_mm=float(np.percentile(dist, 95)),
                    share_centre_above_4mm=float(np.mean(dist > MASK_CENTRE_MM)))
    return dict(n_cases=len(cases), n_missing=n_missing, rotation_error_deg=rot, network_rotation_error_deg=net,
                refinement=refine, translation_error_mm=trans, doubtful=doubt, brain_mask=mask)


def summary(cases: List[dict]) -> dict:
    """``group_summary`` of all cases, the missing ids, per-bin summaries and ``by_subgroup``."""
    ok = [c for c in cases if c["status"] == "ok"]
    missing = [c for c in cases if c["status"] != "ok"]
    s = group_summary(cases)
    s["missing"] = [c["frame_id"] for c in missing]
    s["translation_note"] = None if s["translation_error_mm"] else (
        "no translation error: the CSV has no com_r, com_a, com_s columns or the predictions no translation_ras")
    s["by_rotation_magnitude"] = summarise_by_magnitude(
        [c["gt_rotation_deg"] for c in ok], [c["rotation_error_deg"] for c in ok],
        [c["gt_rotation_deg"] for c in missing])
    s["by_subgroup"] = {name: group_summary(group) for name, group in subgroups(cases).items()}
    return s
