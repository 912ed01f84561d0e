"""The frame judge: a wide view of the head and what surrounds it says whether a frame is the head's own, and where
the refined frame does not look like it, a search over all rotations gives the residual network better starts.

Why: the failures left after the refinement are young navigator-like heads (6 mm voxels, brain 6-10 voxels
across) whose frame is off by anything from 30 to 180 degrees, not just a half turn. The residual network reads 3.2
brain radii and its pose logit prefers the wrong frame to the true one in 12 of 16 of them (tuning sets, session
19); the judge, the same small network reading 6 radii (skull, face, neck and the body's direction), prefers the
true one in 14 of 16. Searching 512 rotations with it puts the best start within the residual network's reach
(about 45 degrees) in 9 of the 16. The judge is read once per pose; the search only runs where its logit is low
(``SEARCH_BELOW``: 15 of the 16 failures, 20 of 319 other poses), so it costs time on few volumes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SEARCH_BELOW = 5.0  # the judge's logit of the refined frame below this: search all rotations
DOUBT_BELOW = SEARCH_BELOW  # the final frame's judge logit below this: check the result
SWITCH_MARGIN = 1.0  # how much higher a searched frame's logit must be to replace the refined one
SEARCH_ROTATIONS = 512  # random rotations (fixed seed): neighbours about 20 degrees apart
SEARCH_SEED = 7
SEARCH_STARTS = 4  # the best-judged rotations (at least ``DISTINCT_DEG`` apart) handed to the residual network
DISTINCT_DEG = 30.0
POLISH_STEPS = 4  # readings of the judge's own residual outputs that finish a frame its search switched to
# where a pose that looks wrong gets a second look: this search, and the pipeline's grid retry of doubtful poses
SECOND_LOOK_CHOICES = ("auto", "always", "off")


def check_second_look(choice) -> str:
    """The second-look choice, validated ("auto", "always" or "off"; None means "auto")."""
    choice = "auto" if choice is None else str(choice).lower()
    if choice not in SECOND_LOOK_CHOICES:
        raise ValueError(f"second_look must be one of {', '.join(SECOND_LOOK_CHOICES)}, not {choice!r}")
    return choice


def second_look_allowed(choice: str, ijk_to_ras) -> bool:
    """Whether a pose that looks wrong gets a second look (the judge's search, the grid retry) on this volume.

    "auto": on navigator-like volumes only (``refine.is_coarse``: voxels of 4 mm or more). Why (session 31): the
    judge learned the head's surroundings from phantoms, and on finer volumes of real anatomy its search turned
    good poses into half turns more often than it rescued bad ones (transfer sets, 210 finer volumes: above 30 deg
    6 with the second looks, 3 without), while on phantoms of those resolutions it rescued almost nothing (600
    held-out: 1 against 2). On navigator-like phantoms it rescues many (9 against 19 above 30 deg of 300). Chosen on
    tuning sets of plain and varied-contrast phantoms; docs/accuracy_history.md, session 31."""
    if choice == "always":
        return True
    if choice == "off":
        return False
    from .refine import is_coarse

    return bool(is_coarse(ijk_to_ras))


@lru_cache(maxsize=2)
def search_rotations(n=SEARCH_ROTATIONS, seed=SEARCH_SEED):
    """[n, 3, 3] rotations spread over SO(3), the same on every run."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(n, random_state=seed).as_matrix()


def judge_logits(judge, array, ijk_to_ras, centre, rotations, radius):
    """The judge's pose logit of each frame (columns = head axes) about ``centre``, mirror-averaged
    (``residual.read_residuals``)."""
    from .refine import volume_resampler
    from .residual import read_residuals, residual_input

    sample = volume_resampler(array, ijk_to_ras)
    xs = np.stack([residual_input(array, ijk_to_ras, centre, r, radius, judge.config, resampler=sample)
                   for r in rotations])
    return read_residuals(judge, xs)[2]


def distinct_best(rotations, logits, k=SEARCH_STARTS, min_deg=DISTINCT_DEG):
    """Indices of the ``k`` highest logits whose rotations are at least ``min_deg`` apart."""
    from .rotation import geodesic_deg

    chosen = []
    for i in np.argsort(-np.asarray(logits)):
        if all(geodesic_deg(rotations[i], rotations[j]) >= min_deg for j in chosen):
            chosen.append(int(i))
            if len(chosen) == k:
                break
    return chosen


def judged_pose(judge, residual, array, ijk_to_ras, centre, rotation, brain_ml, move_centre=True, plane_cfg=None,
                search=True):
    """-> (rotation, centre, info): the refined pose, or a better-judged one found by the search. Each searched
    start is corrected by the residual network (``correct_pose``, ``plane_cfg`` as there). Running the mirror-plane
    refinement from each start first did worse on the tuning sets (14 poses above 30 deg against 10).
    ``search=False`` (no second look on this volume, ``second_look_allowed``): the refined frame's logit
    is read, for the doubt flag, and a low one is noted (``search_skipped``) instead of searched.

    A frame the search switched to is then finished by ``POLISH_STEPS`` readings of the judge's own residual
    outputs (it was trained for them too, and reads the skull and neck around these small heads): on the 35 switched
    tuning poses the 29 within 60 deg went from 16.8 to 9.8 deg median and the centre from 3.2 to 1.8 mm, none worse by
    more than 5 deg, where more readings of the residual network or the mirror-plane refinement did not help (the
    plane search jumped to other frames). Its logit is read again at the polished frame."""
    from .refine import equivalent_radius
    from .residual import correct_pose
    from .rotation import geodesic_deg

    radius = equivalent_radius(brain_ml)
    rotation, centre = np.asarray(rotation, dtype=np.float64), np.asarray(centre, dtype=np.float64)
    first = float(judge_logits(judge, array, ijk_to_ras, centre, [rotation], radius)[0])
    info = {"logit": first, "refined_logit": first, "searched": False, "switched": False}
    if first >= SEARCH_BELOW:
        return rotation, centre, info
    if not search:
        info["search_skipped"] = True
        return rotation, centre, info
    grid = search_rotations()
    starts = [grid[i] for i in distinct_best(grid, judge_logits(judge, array, ijk_to_ras, centre, grid, radius))]
    candidates = []
    for start in starts:
        rot, cen, _ = correct_pose(residual, array, ijk_to_ras, centre, start, brain_ml, move_centre=move_centre,
                                   choose=False, plane_cfg=plane_cfg)
        logit = float(judge_logits(judge, array, ijk_to_ras, cen, [rot], radius)[0])
        candidates.append((logit, rot, cen))
    best = max(candidates, key=lambda c: c[0])
    switch = best[0] > first + SWITCH_MARGIN
    info.update(searched=True, switched=bool(switch), best_searched_logit=best[0],
                searched_logits=[c[0] for c in candidates])
    if not switch:
        return rotation, centre, info
    logit, rot, cen = best
    if POLISH_STEPS:
        rot, cen, polish = correct_pose(judge, array, ijk_to_ras, cen, rot, brain_ml, steps=POLISH_STEPS,
                                        move_centre=move_centre, choose=False, plane_cfg=plane_cfg)
        info["polish"] = {"steps": POLISH_STEPS, "angle_moved_deg": polish["angle_moved_deg"],
                          "centre_moved_mm": polish["centre_moved_mm"]}
        logit = float(judge_logits(judge, array, ijk_to_ras, cen, [rot], radius)[0])
    info.update(logit=logit, angle_moved_deg=float(geodesic_deg(rotation, rot)),
                centre_moved_mm=float(np.linalg.norm(cen - centre)))
    return rot, cen, info


def search_note(refinement, unit=" deg") -> str:
    """What the judge's search did, for a person reading the result: "frame judge searched and switched 141 deg"
    (the axes drawn are a searched frame, not the refined one), "frame judge searched, kept the refined frame", or ''
    when it did not search. Read defensively: ``refinement`` may come from a JSON file."""
    judged = refinement.get("judge") if isinstance(refinement, dict) else None
    if not isinstance(judged, dict) or judged.get("searched") is not True:
        return ""
    if judged.get("switched") is not True:
        return "frame judge searched, kept the refined frame"
    angle = judged.get("angle_moved_deg")
    if isinstance(angle, (int, float)) and not isinstance(angle, bool) and np.isfinite(angle):
        return f"frame judge searched and switched {angle:.0f}{unit}"
    return "frame judge searched and switched"
