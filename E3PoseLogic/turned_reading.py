"""The E3-CNN read on turned copies of its cube, the answers turned back and pooled.

Why: the E3-CNN is equivariant only up to its voxel lattice (exactly for the cube's 48 signed axis permutations,
``crop``), so the frame it reads scatters by a few degrees with how the head lies on the 16^3 lattice. Reading the
same crop turned by a few fixed, off-lattice rotations about its centre and pooling the answers turned back averages
that scatter out; the largest group of answers within ``AGREE_DEG`` of each other is pooled, so a reading that comes
out half a turn away does not drag the mean. This uses nothing the phantom has and real heads lack: it is a property
of the network and its lattice.

The turns are half a turn's worth of small ones: +-``TURN_DEG`` about each index axis. That set is closed under the
grid's 48 signed axis permutations (a turn conjugated by one is again in the set), so a volume stored mirrored or
turned by 90 degrees is read from the same views and gets the same pose, as without the turns.

Tuning set (seeds 31 + 32n, 120 volumes; session 29), the E3-CNN alone, median / above 60 deg: one reading 10.9 deg /
11; with +-20 deg about the axes 9.9 / 10 (+-30: 10.1 / 11, +-45: 10.1 / 10; 8 turns of +-30 or +-60 deg about the
body diagonals 9.9 / 9 and 9.9 / 11; 16 random turns 10.0 / 10). Cost: one more network call, the 6 cubes in one
batch (``e3pose benchmark --refine off``, 2 CPU cores: the rotation stage 0.03 -> 0.13 s).

Only for cube crops (our models): the published box crop cannot be turned, and published checkpoints keep the
published answer.
"""
from __future__ import annotations

import numpy as np

TURN_DEG = 20.0  # each turn: this many degrees about one index axis, either way
TURNS = 6  # the turns read besides the crop itself: all six (0 for none)
AGREE_DEG = 30.0  # answers within this of each other count as one group


def turns(n=TURNS, turn_deg=TURN_DEG) -> np.ndarray:
    """[n, 3, 3] the first ``n`` (0 or 6) of the rotations by +-``turn_deg`` about the index axes i, j, k."""
    from scipy.spatial.transform import Rotation

    if n not in (0, 6):
        raise ValueError(f"the turns come as a set closed under the grid's symmetries: 0 or 6, not {n}")
    vecs = [s * np.radians(turn_deg) * e for e in np.eye(3) for s in (1.0, -1.0)][:n]
    return Rotation.from_rotvec(vecs).as_matrix() if vecs else np.zeros((0, 3, 3))


def largest_group_mean(rotations, agree_deg=AGREE_DEG):
    """-> (rotation, members): the chordal mean (polar factor of the mean matrix) of the largest group of
    ``rotations`` [N, 3, 3] within ``agree_deg`` of one of them, and how many it holds. Of equally large groups, one
    holding the first rotation wins, else the tightest: the choice does not depend on the order of the others."""
    from .rotation import geodesic_deg, nearest_rotation

    r = np.asarray(rotations, dtype=np.float64)
    d = np.atleast_2d(geodesic_deg(r[:, None], r[None, :]))
    within = d < agree_deg
    size = within.sum(1)
    best = np.flatnonzero(size == size.max())
    with_first = best[within[best, 0]]
    if len(with_first):
        best = with_first
    k = int(best[np.argmin([d[i][within[i]].sum() for i in best])])
    members = r[within[k]]
    return nearest_rotation(members.mean(0)), int(len(members))


def turned_readings(read_axes, volume, box, first_axes, n=TURNS, turn_deg=TURN_DEG):
    """-> (rotation, info): the voxel-frame rotation pooled from the first reading ``first_axes`` ((p, a, b) rows,
    U-Net index components) and ``n`` readings of ``box``'s cube turned by ``turns``. ``read_axes`` maps a batch
    of crops [B, S, S, S] to their axes [B, 3, 3] (one network call). info: ``turned_readings`` (n), ``agreeing``
    (answers in the pooled group, the first included) and ``moved_deg`` (from the first reading's rotation)."""
    from .crop import crop_input
    from .rotation import axes_to_rotation, geodesic_deg

    first = axes_to_rotation(*np.asarray(first_axes, dtype=np.float64))[0]
    qs = turns(n, turn_deg)
    if len(qs) == 0:
        return first, {"turned_readings": 0, "agreeing": 1, "moved_deg": 0.0}
    axes = np.asarray(read_axes(np.stack([crop_input(volume, box, turn=q) for q in qs])), dtype=np.float64)
    # crop point u samples the grid at centre + q u, so a direction v in the crop is q v on the grid
    back = [axes_to_rotation(*(ax @ q.T))[0] for ax, q in zip(axes, qs)]
    rotation, members = largest_group_mean(np.stack([first] + back))
    return rotation, {"turned_readings": int(n), "agreeing": members,
                      "moved_deg": float(geodesic_deg(first, rotation))}


def pooled_counts(info):
    """(readings pooled, the first included; how many agreed, or None) from a result's
    ``confidence["network_turned_readings"]``, or None when nothing was pooled. Read defensively: the entry may come
    from a JSON file (the QC title and the Slicer module's line both say it)."""
    import math

    def count(v):
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    n = count(info.get("turned_readings")) if isinstance(info, dict) else None
    if not n or n < 1:
        return None
    return n + 1, count(info.get("agreeing"))
