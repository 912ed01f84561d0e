"""Pose refinement after the E3-CNN: the head's mirror plane, then its orientation within that plane.

Why these two steps: every head, phantom or real, is close to mirror-symmetric about its mid-sagittal plane, and
the image compared with its own reflection needs no template and no assumption about contrast, size or age. The
plane fixes e_x (up to sign) and the left-right position of the centre, to a fraction of a degree on standard
volumes (about 5 degrees at 6 mm voxels), where the E3-CNN is off by tens of degrees. What it cannot fix is the angle
within the plane and the sign of e_x: a small 2D network (``networks.sagittal``) reads slabs parallel to the plane
and gives e_y and e_z, whose handedness in the slab settles the sign of e_x (the pseudovector rule of E(3)-Pose, in
2D).

Everything is done in a local cube around the brain whose spacing follows the brain's size (``radius`` = radius
of the sphere with the brain's volume), so small and large heads look alike to the network.

Hypotheses: the mirror plane nearest the E3-CNN's e_x and the two best other planes of a global search over
directions, each direction scored at its best offset along its normal (the U-Net's centre is not on the plane). In
the mirror score alone a head can be almost as symmetric front-to-back as left-to-right, so each plane is read by
the 2D network too, and the plane whose mirror score plus reading consistency (and plane logit) is highest wins
(``hypothesis_score``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from . import frames

REFINE_CHOICES = ("auto", "on", "off")
CONSISTENCY_WEIGHT = 1.0  # see hypothesis_score
NETWORK_BONUS = 0.05
PLANE_LOGIT_WEIGHT = 0.2  # see hypothesis_score
PLANE_LOGIT_CLIP = 5.0
FINE_RADIUS = 1.0  # x radius: the ball the fine mirror fit compares (see MirrorSearch)
COARSE_VOXEL_MM = 4.0  # volumes with voxels this large (geometric mean) or larger: navigator-like resolution, where
COARSE_PRECISE_RADIUS = 1.2  # the chosen plane's last fit compares a wider ball (see refine_pose)
HIGHPASS_MM = 6.0  # Gaussian removed before the fine mirror fit (measured: 3.2 -> 1.0 deg on a biased head)
COARSE_HIGHPASS_MM = 12.0  # and before the global search (see MirrorSearch)
SEARCH_OFFSET_RANGE_MM = 8.0  # the global search looks this far along each normal for the plane (coarse-voxel steps)
SEARCH_POINTS = 4000  # random points of the coarse ball that the global search compares
SEARCH_MIN_SEPARATION_DEG = 15.0  # search starts closer than this to a better one are the same peak
SEARCH_HYPOTHESES = 2  # planes of the global search that compete with the E3-CNN's (4: no better on the tuning set)
SAME_PLANE_DEG = 3.0  # fitted planes closer than this are one hypothesis
HYPOTHESIS_TURNS = 4  # in-plane angles at which each plane hypothesis is read (x 2 sides)
READING_TURNS = 8  # and the chosen plane, twice. More angles voting (8 and 16) did not help on the tuning set:
# 168 volumes, paired median change -0.03 deg, one reading turned front to back, 0.1 s more
PASSES = 2  # the whole refinement again from its own result (measured on the tuning set: standard volumes 2.2 ->
# 1.9 deg median, within 5 deg 85 -> 94 %; navigator-like 6.6 -> 6.1 deg, above 60 deg 13 -> 11 of 83). A third
# pass: no gain (all 2.87 -> 2.94 deg; paired, better / worse by > 1 deg: standard 4 / 2, navigator-like 17 / 16)


@dataclass
class Plane:
    normal: np.ndarray  # unit, cube coordinates
    offset: float  # mm along the normal from the cube centre
    score: float  # Pearson correlation of the image with its reflection
    source: str = ""  # "network" or "search"


@dataclass
class Refinement:
    rotation: np.ndarray  # world, columns e_x e_y e_z
    translation: np.ndarray  # world RAS mm
    info: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)  # every hypothesis as a world rotation, best first (analysis)


def equivalent_radius(brain_ml: float) -> float:
    """Radius (mm) of the sphere whose volume is the brain's."""
    return float((3.0 * brain_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


# ------------------------------------------------------------------------------------------------ local cube
def local_cube(array, ijk_to_ras, centre, axes, radius, cfg, resampler=None):
    """The volume resampled on a cube around ``centre`` (world), axes = columns of ``axes``, spacing radius/k.

    Returns (cube float32 scaled so its 99th percentile near the brain is 1, spacing mm). Outside the field of
    view is 0. ``resampler``: ``volume_resampler(array, ijk_to_ras)``, for many cubes of one volume.
    """

    n = int(round(cfg.cube_side * cfg.cube_voxels_per_radius))
    sp = float(radius) / cfg.cube_voxels_per_radius
    axes = np.asarray(axes, dtype=np.float64)
    grid = np.eye(4)
    grid[:3, :3] = axes * sp
    grid[:3, 3] = np.asarray(centre, dtype=np.float64) - axes @ np.full(3, (n - 1) / 2.0 * sp)
    sample = resampler if resampler is not None else volume_resampler(array, ijk_to_ras)
    cube = np.asarray(sample(grid, (n, n, n), order=1), dtype=np.float32)
    ball = cube[ball_mask(n, sp, 1.3 * radius)]
    scale = float(np.percentile(ball, 99)) if ball.size else 0.0
    if scale > 0:
        cube /= scale
    return cube, sp


def volume_resampler(array, ijk_to_ras):
    """What ``local_cube`` samples: the volume as float32, handed to SimpleITK once (``preprocess.Resampler``)."""
    from .preprocess import Resampler

    return Resampler(np.asarray(array, dtype=np.float32), ijk_to_ras)


def ball_mask(shape, spacing_mm, radius_mm):
    """Boolean ball of ``radius_mm`` about the array centre (``shape``: one side or three)."""
    x = [(np.arange(n) - (n - 1) / 2.0) * spacing_mm for n in np.broadcast_to(shape, (3,))]
    return x[0][:, None, None] ** 2 + x[1][None, :, None] ** 2 + x[2][None, None, :] ** 2 <= radius_mm ** 2


# ------------------------------------------------------------------------------------------------ mirror plane
class MirrorScore:
    """Correlation of the cube with its reflection about a plane, over the points of a ball around the centre."""

    def __init__(self, cube, sp, radius, max_points=None):
        self.cube, self.sp = cube, sp
        n = cube.shape[0]
        self.c = (n - 1) / 2.0
        idx = np.arange(n)
        g = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)
        p = (g - self.c) * sp
        keep = np.flatnonzero(np.einsum("ij,ij->i", p, p) <= radius * radius)
        if max_points and len(keep) > max_points:  # a fixed random subset: same answer, a fraction of the time
            keep = np.sort(np.random.default_rng(0).choice(keep, max_points, replace=False))
        self.p = p[keep]
        v = cube[tuple(g[keep].T)].astype(np.float64)
        self.v = v - v.mean()
        self.vn = float(np.sqrt((self.v ** 2).sum())) + 1e-12
        self._torch = None

    def scores(self, normals, offsets) -> np.ndarray:
        """Scores of several planes in one trilinear interpolation call (torch's grid_sample: 2-3x faster than
        scipy's map_coordinates here): the search's table, a polish step. Outside the cube is zero, interpolated
        within the voxel beyond its faces (scipy's "grid-constant" mode)."""
        import torch

        # grid_sample's coordinates: its last axis is (x, y, z) = the cube's (k, j, i), and with align_corners -1
        # and 1 are the first and last voxel centres, i.e. (index - c) / c = mm / (sp c). Points and normals are
        # kept in that order and scale (a contiguous grid samples twice as fast as a flipped view)
        scale = self.sp * self.c
        if self._torch is None:
            self._torch = (torch.from_numpy(np.ascontiguousarray(self.cube, dtype=np.float32))[None, None],
                           torch.from_numpy(np.ascontiguousarray(self.p[:, ::-1] / scale, dtype=np.float32)),
                           torch.from_numpy(self.v))
        cube, p, v = self._torch
        nv = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
        nv = nv / np.linalg.norm(nv, axis=1, keepdims=True)
        off = np.broadcast_to(np.asarray(offsets, dtype=np.float64).ravel(), (len(nv),)) / scale
        n_t = torch.from_numpy(np.ascontiguousarray(nv[:, ::-1], dtype=np.float32))
        with torch.inference_mode():
            d = n_t @ p.T - torch.from_numpy(off.astype(np.float32))[:, None]  # [B, P]: distance to each plane
            grid = torch.addcmul(p[None], d[..., None], n_t[:, None, :], value=-2.0)  # reflected points [B, P, 3]
            w = sample_trilinear(cube, grid.reshape(-1, 3))
        w = w.reshape(len(nv), -1).double()
        w = w - w.mean(dim=1, keepdim=True)
        return ((w @ v) / (self.vn * (w.norm(dim=1) + 1e-12))).numpy()

    def __call__(self, normal, offset=0.0):
        return float(self.scores(normal, [offset])[0])


def sample_trilinear(cube, points):
    """``grid_sample`` of ``cube`` [1, 1, D, H, W] at ``points`` [T, 3] (its (x, y, z) order and scale, zeros
    outside) -> [T]. PyTorch's 3D grid_sample on the CPU gives each batch entry one thread, so the points are dealt
    out as one batch entry per thread: the same values in less time (the refinement's largest cost; the plane
    search's table of 700 planes: 140 -> 90 ms on 2 cores, the rest of it being the arithmetic around the call)."""
    import torch
    import torch.nn.functional as F

    total = points.shape[0]
    n = max(1, min(torch.get_num_threads(), total // 4096))
    pad = (-total) % n
    if pad:
        points = torch.cat([points, points.new_zeros(pad, 3)])
    w = F.grid_sample(cube.expand(n, -1, -1, -1, -1), points.reshape(n, -1, 1, 1, 3), mode="bilinear",
                      padding_mode="zeros", align_corners=True)
    return w.reshape(-1)[:total]


def hemisphere(n):
    """``n`` nearly uniform unit vectors with z >= 0 (a plane normal and its negative are the same plane)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - i / n)
    az = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([np.cos(az) * np.sin(polar), np.sin(az) * np.sin(polar), np.cos(polar)], 1)


def peaks(dirs, scores, k, min_deg):
    """Indices of the ``k`` best directions, none within ``min_deg`` of a better one (a normal and its negative
    are one plane)."""
    cos_min = np.cos(np.radians(min_deg))
    out = []
    for i in np.argsort(-np.asarray(scores)):
        if all(abs(float(dirs[i] @ dirs[j])) < cos_min for j in out):
            out.append(int(i))
            if len(out) == k:
                break
    return out


def _tangents(n):
    u = np.cross(n, [1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.cross(n, [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    return u, np.cross(n, u)


def polish_plane(score, normal, offset=0.0, step_deg=8.0, step_mm=2.0, min_deg=0.25):
    """Pattern search on (normal, offset) of a ``MirrorScore``: tilt by +-step about two tangents, shift by +-step;
    halve when stuck."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    d = float(offset)
    best = score(n, d)
    st, sm = np.radians(step_deg), step_mm
    while st > np.radians(min_deg):
        u, v = _tangents(n)
        improved = False
        moves = [(np.cos(st) * n + np.sin(st) * t, d) for t in (u, -u, v, -v)] + [(n, d + sm), (n, d - sm)]
        # the moves are fixed before any is taken, so scoring them together changes nothing
        for (cn, cd), s in zip(moves, score.scores([m[0] for m in moves], [m[1] for m in moves])):
            if s > best + 1e-7:
                best, n, d, improved = s, cn / np.linalg.norm(cn), cd, True
        if not improved:
            st, sm = st / 2.0, sm / 2.0
    return n, d, best


class MirrorSearch:
    """Mirror planes of one cube: a global search and quick fits on a coarse grid, a precise fit on the fine grid.

    The precise fit ignores what varies slowly (bias field, the far surroundings): a smooth intensity ramp across
    the plane tilts the best reflection by degrees, fine detail (fissure, ventricles, folds) does not.
    """

    def __init__(self, cube, sp, radius, precise_radius=FINE_RADIUS):
        from scipy import ndimage

        # the global search and the quick fits see the head's shape and its coverings on a 2x coarser grid; what
        # varies over more than COARSE_HIGHPASS_MM (bias field, the intensity of fluid and body around the head) is
        # removed first (measured on the tuning set: more true planes ranked first, see candidates)
        coarse = cube[::2, ::2, ::2]
        coarse = coarse - ndimage.gaussian_filter(coarse, COARSE_HIGHPASS_MM / (2 * sp))
        self.coarse = MirrorScore(coarse, 2 * sp, 1.2 * radius, max_points=SEARCH_POINTS)
        # offsets a coarse voxel apart: the high-passed score is sharp, and steps of 4 mm missed the true plane in 3
        # of the 6 test heads whose centre was 7 mm off it (test_refine), a coarse voxel apart none
        k = int(np.ceil(SEARCH_OFFSET_RANGE_MM / (2 * sp)))
        self.offsets = tuple(float(v) for v in np.linspace(-SEARCH_OFFSET_RANGE_MM, SEARCH_OFFSET_RANGE_MM, 2 * k + 1))
        # the fine fits look at the brain and its coverings only (radius 1.0: measured on the tuning set, 0.3 deg
        # median on standard volumes against 0.4 deg at 1.2; the coarse search needs the face and eyes of 1.2)
        self.fine = MirrorScore(cube - ndimage.gaussian_filter(cube, HIGHPASS_MM / sp), sp, FINE_RADIUS * radius,
                                max_points=15000)
        # the chosen plane's last fit ("precise"): the same, or over a wider ball (see refine_pose)
        self.precise = self.fine
        if precise_radius != FINE_RADIUS:
            self.precise = MirrorScore(self.fine.cube, sp, precise_radius * radius, max_points=15000)

    def best_offset(self, normal, scores=None):
        """(offset, coarse score): the best of ``self.offsets`` along ``normal``, then +-half a step around it.
        ``scores``: the coarse scores at ``self.offsets`` when the search has them already."""
        offsets = self.offsets
        if scores is None:
            scores = self.coarse.scores(np.tile(np.asarray(normal, dtype=np.float64), (len(offsets), 1)), offsets)
        i = int(np.argmax(scores))
        best = (float(offsets[i]), float(scores[i]))
        half = (offsets[1] - offsets[0]) / 2.0
        for o in (offsets[i] - half, offsets[i] + half):
            sc = self.coarse(normal, o)
            if sc > best[1]:
                best = (float(o), sc)
        return best

    def candidates(self, prior_normals=(), n_search=100, n_best=None) -> List[Plane]:
        """The best ``n_best`` distinct planes of a search over ``n_search`` directions, plus a plane fitted from
        each prior normal (``source='network'``), each fitted on the coarse grid and scored on the fine one.

        Each direction is scored at its best offset: the brain centre the search starts from is the U-Net's, which
        can be millimetres off the mirror plane (4.2 mm median on the transfer set), and a plane scored through
        the wrong point compares the head with a shifted copy of itself. In 30 transfer-set failures examined,
        the true plane scored at offset 0 was outranked by tens of directions in most; at its best offset, after
        the high-pass, it ranked first in 24. The settings were then chosen on the tuning set (synth seeds 31-34,
        168 volumes): above 60 deg 11.9 % -> 7.1 %, standard volumes' 95th percentile 15.7 -> 6.0 deg.
        """
        n_best = SEARCH_HYPOTHESES if n_best is None else n_best
        dirs = hemisphere(n_search)
        offsets = np.asarray(self.offsets)
        table = self.coarse.scores(np.repeat(dirs, len(offsets), axis=0), np.tile(offsets, len(dirs)))
        table = table.reshape(len(dirs), len(offsets))
        scores = table.max(axis=1)
        starts = [(np.asarray(p, float), self.best_offset(np.asarray(p, float))[0], "network")
                  for p in prior_normals]
        for i in peaks(dirs, scores, n_best + 1, SEARCH_MIN_SEPARATION_DEG):
            starts.append((dirs[i], self.best_offset(dirs[i], table[i])[0], "search"))
        out = []
        for d, off0, src in starts:
            n, off, _ = polish_plane(self.coarse, d, off0, step_deg=8.0, min_deg=2.0, step_mm=4.0)
            plane = Plane(n, off, self.fine(n, off), src)
            if src == "network":  # the coarse fit can drift to a false optimum tens of degrees away (seen on a
                start = Plane(d, off0, self.fine(d, off0), src)  # 2.9 mm head): keep the start if it fits better
                plane = max((self.polish(q, min_deg=1.0) for q in (plane, start)), key=lambda q: q.score)
            out.append(plane)
        n_prior = len(prior_normals)
        return out[:n_prior] + distinct_planes(out[n_prior:], exclude=out[:n_prior])[:n_best]

    def polish(self, plane: Plane, min_deg=0.3, precise=False) -> Plane:
        score = self.precise if precise else self.fine
        n, off, s = polish_plane(score, plane.normal, plane.offset, step_deg=2.0, min_deg=min_deg, step_mm=1.0)
        return Plane(n, off, s, plane.source)


# ------------------------------------------------------------------------------------------------ slabs
def slab_basis(normal):
    """(u, v) with (normal, u, v) right-handed: the slab's pixel axes."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    u, v = _tangents(n)
    return u, v


def slab_points(normal, offset, u, v, radius, cfg, warp=None):
    """Cube-frame mm coordinates of the slab pixels: [C, 2 sides, S, S, 3]."""
    s = cfg.size
    t = (np.arange(s) - (s - 1) / 2.0) * (cfg.fov * radius / s)
    a, b = np.meshgrid(t, t, indexing="ij")
    if warp is not None:
        a, b = a + warp[0], b + warp[1]
    plane = a[..., None] * u + b[..., None] * v
    pts = []
    for off in cfg.offsets:
        sides = [plane + ((offset + sgn * off * radius) * normal) for sgn in ((1.0,) if off == 0 else (1.0, -1.0))]
        if len(sides) == 1:
            sides = sides * 2
        pts.append(np.stack(sides))
    return np.stack(pts)


def sample_slabs(cube, sp, points):
    """Slab intensities [..., C, S, S] from slab points [..., C, 2, S, S, 3]: the mean of the two sides of each
    offset. Several slabs in one call share the work out over the CPU's threads."""
    c = (cube.shape[0] - 1) / 2.0
    shape = points.shape[:-1]
    vals = linear_at(cube, (points.reshape(-1, 3) / sp + c).T)
    return vals.reshape(shape).mean(axis=-3).astype(np.float32)


_POOL = None


def linear_at(volume, coords, min_chunk=20000):
    """scipy's trilinear ``map_coordinates`` of ``volume`` at index coordinates ``coords`` [3, T] (zero outside), in
    chunks on a small thread pool: it releases the GIL, so each chunk runs on its own core (the same values). As many
    chunks as torch has threads (at most 4), so a thread limit set for the pipeline holds here too."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from scipy import ndimage

    def run(part):
        return ndimage.map_coordinates(volume, part, order=1, mode="constant", cval=0.0)

    n = max(1, min(torch.get_num_threads(), 4, coords.shape[1] // min_chunk))
    if n == 1:
        return run(coords)
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child inherits the pool object but not its threads
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="e3pose-slabs"))
    return np.concatenate(list(_POOL[1].map(run, np.array_split(coords, n, axis=1))))


def normalise_slab(x):
    """Slab intensities divided by their 99th percentile (as in training)."""
    q = float(np.percentile(x, 99))
    return (x / q if q > 0 else x).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class Reading:
    """What the 2D network says about one plane."""
    rotation: np.ndarray  # canonical axes in the cube frame (columns)
    consistency: float  # mean resultant length of the e_y, e_z answers (1 = all readings agree)
    to_centre: np.ndarray  # in-plane step (cube mm) from the slab centre to the brain centre
    plane_logit: Optional[float] = None  # mean logit that the plane is the mid-sagittal one (networks that have it)


def read_plane(net, cube, sp, radius, plane, n_turns=8, shift=None) -> Reading:
    """The network's reading of one mirror plane: canonical axes (cube frame), consistency, centre step and, when
    the network has one, its mid-sagittal logit.

    The slabs are read from both sides and at ``n_turns`` in-plane angles (the network was trained on all of them);
    the answers, turned back, are averaged.
    """
    import torch

    from .rotation import axes_to_rotation

    cfg = net.config
    points, bases = [], []
    for side in (1.0, -1.0):
        n = side * plane.normal
        u0, v0 = slab_basis(n)
        for k in range(n_turns):
            a = 2.0 * np.pi * k / n_turns
            u, v = np.cos(a) * u0 + np.sin(a) * v0, -np.sin(a) * u0 + np.cos(a) * v0
            pts = slab_points(n, side * plane.offset, u, v, radius, cfg)
            if shift is not None:  # slab centre moved within the plane (cube mm)
                pts = pts + shift
            points.append(pts)
            bases.append((u, v))
    batch = [normalise_slab(x) for x in sample_slabs(cube, sp, np.stack(points))]
    with torch.inference_mode():
        out = net(torch.from_numpy(np.stack(batch))).double().numpy()
    ys, zs, cs = [], [], []
    for (u, v), o in zip(bases, out):
        y, z = o[0] * u + o[1] * v, o[2] * u + o[3] * v
        ys.append(y / max(np.linalg.norm(y), 1e-9))
        zs.append(z / max(np.linalg.norm(z), 1e-9))
        cs.append((o[4] * u + o[5] * v) * radius)
    y, z = np.mean(ys, 0), np.mean(zs, 0)
    consistency = float((np.linalg.norm(y) + np.linalg.norm(z)) / 2.0)
    r, _ = axes_to_rotation(np.cross(y, z), y, z)
    logit = float(np.mean(out[:, 6])) if out.shape[1] > 6 else None
    return Reading(r, consistency, np.median(cs, axis=0), logit)


def distinct_planes(planes, min_deg=5.0, exclude=()):
    """Planes best first, without those within ``min_deg`` of a better one or of one in ``exclude``."""
    out = []
    for p in sorted(planes, key=lambda q: -q.score):
        if all(_plane_angle(p, q) >= min_deg for q in list(out) + list(exclude)):
            out.append(p)
    return out


def _plane_angle(p, q):
    return float(np.degrees(np.arccos(min(1.0, abs(float(p.normal @ q.normal))))))


def refine_pose(net, array, ijk_to_ras, centre, rotation, brain_ml, move_centre=True, passes=None) -> Refinement:
    """Refined (rotation, translation) in world RAS from the network pose; ``net`` is a ``SagittalNet`` (eval).

    ``move_centre=False`` keeps the given centre (a brain mask the user gave is trusted: its centre of mass is the
    definition of the origin, and the network's centre is less precise than a true mask's, 1.0 mm against 0.8 mm
    on the held-out set, though far better than the U-Net's 3 mm).

    ``passes`` (default ``PASSES``): the whole refinement is run again from its own result. The second pass's cube is
    centred on the refined centre and aligned with the refined axes, so its slabs look like the network's training
    slabs and its plane search starts on the plane (see PASSES). ``info`` describes the last pass, except
    ``angle_moved_deg`` and ``centre_moved_mm`` (from the pose given) and ``hypothesis`` ("network" when the plane
    nearest the E3-CNN's e_x won every pass); ``passes`` lists what each pass did.
    """
    from .rotation import geodesic_deg

    passes = PASSES if passes is None else int(passes)
    if passes < 1:
        raise ValueError(f"passes must be at least 1, not {passes}")
    rot0, centre0 = np.asarray(rotation, dtype=np.float64), np.asarray(centre, dtype=np.float64)
    ref, summary = None, []
    for _ in range(passes):
        ref = _refine_once(net, array, ijk_to_ras, centre0 if ref is None else ref.translation,
                           rot0 if ref is None else ref.rotation, brain_ml, move_centre)
        summary.append({k: ref.info[k] for k in ("hypothesis", "margin_to_runner_up", "angle_moved_deg",
                                                 "centre_moved_mm")})
    # later passes start from the previous pass's plane (their "network" hypothesis): the plane is the E3-CNN's
    # only if every pass kept the plane it started from
    kept = all(p["hypothesis"] == "network" for p in summary)
    ref.info.update(hypothesis="network" if kept else "search", angle_moved_deg=float(geodesic_deg(rot0, ref.rotation)),
                    centre_moved_mm=float(np.linalg.norm(ref.translation - centre0)), passes=summary)
    return ref


def _refine_once(net, array, ijk_to_ras, centre, rotation, brain_ml, move_centre) -> Refinement:
    """One pass: hypotheses (the mirror plane nearest the given pose's e_x and the two best other planes of a
    global search), each read by the network; the best by ``hypothesis_score`` is fitted precisely and read again."""
    from .rotation import geodesic_deg

    cfg = net.config
    radius = equivalent_radius(brain_ml)
    rot0 = np.asarray(rotation, dtype=np.float64)
    cube, sp = local_cube(array, ijk_to_ras, centre, rot0, radius, cfg)
    # at navigator-like resolution (6 mm voxels: the brain is 4-8 voxels in radius) the fit of the chosen plane
    # compares a wider ball than the plane ranking does: the skull and fluid add what the brain's few voxels lack
    # (tuning set, navigator-like: fitted from the true plane, drift 4.4 -> 3.2 deg median; refined median 7.5 ->
    # 6.6 deg). On finer grids the wider ball costs precision; used for the ranking too, it chose more wrong planes
    search = MirrorSearch(cube, sp, radius, COARSE_PRECISE_RADIUS if is_coarse(ijk_to_ras) else FINE_RADIUS)
    # cube axes = the network's axes, so its e_x is (1, 0, 0) in cube coordinates. The E3-CNN's plane always
    # competes: in the mirror score alone a head is nearly as symmetric front-to-back as left-to-right (measured on
    # phantoms: the coronal plane sometimes scores higher than the mid-sagittal one)
    hyps, fitted = [], []
    for plane in search.candidates(prior_normals=[np.array([1.0, 0.0, 0.0])]):
        # compared after a quick precise fit: the fine score drops fast with a few degrees of misfit (the sample
        # head: 0.29 two degrees off, 0.92 on its plane), so unfitted planes would be ranked by their misfit
        plane = search.polish(plane, min_deg=1.0)
        if any(_plane_angle(plane, q) < SAME_PLANE_DEG for q in fitted):
            continue  # two starts that the fit brought to one plane: read it once (the E3-CNN's comes first)
        fitted.append(plane)
        reading = read_plane(net, cube, sp, radius, plane, n_turns=HYPOTHESIS_TURNS)
        hyps.append(dict(plane=plane, r_cube=reading.rotation, consistency=reading.consistency,
                         plane_logit=reading.plane_logit,
                         score=hypothesis_score(plane.score, reading.consistency, plane.source == "network",
                                                reading.plane_logit)))
    hyps.sort(key=lambda h: -h["score"])
    plane = search.polish(hyps[0]["plane"], precise=True)
    first = read_plane(net, cube, sp, radius, plane, n_turns=READING_TURNS)
    # read again with the slab centred where the network put the brain centre: its view then matches training
    # best (measured on the tuning set: translation 1.44 -> 1.37 mm median)
    reading = read_plane(net, cube, sp, radius, plane, n_turns=READING_TURNS, shift=first.to_centre)
    r_cube, consistency = reading.rotation, reading.consistency
    to_centre = first.to_centre + reading.to_centre
    rot = rot0 @ r_cube
    # the centre moves onto the mirror plane, then within it to where the network puts the brain centre
    shift = rot0 @ (plane.normal * plane.offset + to_centre) if move_centre else np.zeros(3)
    translation = np.asarray(centre, dtype=np.float64) + shift
    info = {
        "method": "mirror plane + mid-sagittal 2D network",
        "hypothesis": plane.source,
        "hypothesis_score": hyps[0]["score"],
        "margin_to_runner_up": float(hyps[0]["score"] - hyps[1]["score"]) if len(hyps) > 1 else None,
        "mirror_score": plane.score,
        "reading_consistency": consistency,
        "angle_moved_deg": float(geodesic_deg(rot0, rot)),
        "centre_moved_mm": float(np.linalg.norm(shift)),
        "hypotheses": [{"source": h["plane"].source, "score": h["score"], "mirror_score": h["plane"].score,
                        "reading_consistency": h["consistency"], "plane_logit": h["plane_logit"],
                        "angle_from_network_deg": float(geodesic_deg(np.eye(3), h["r_cube"]))} for h in hyps],
    }
    return Refinement(rotation=rot, translation=translation, info=info, candidates=[rot0 @ h["r_cube"] for h in hyps])


def is_coarse(ijk_to_ras) -> bool:
    """Navigator-like resolution: voxels of ``COARSE_VOXEL_MM`` or more (geometric mean)."""
    return float(np.prod(frames.voxel_sizes(ijk_to_ras))) ** (1.0 / 3.0) >= COARSE_VOXEL_MM


def snap_to_mirror_plane(array, ijk_to_ras, centre, rotation, brain_ml, cfg):
    """-> (rotation, degrees turned): ``rotation`` turned the least that puts its e_x on the normal of the mirror
    plane fitted from it (precise fit, ``MirrorSearch.polish``); the in-plane angle is kept. ``cfg``: the cube
    geometry (the refinement network's ``SagittalConfig``)."""
    radius = equivalent_radius(brain_ml)
    rot = np.asarray(rotation, dtype=np.float64)
    cube, sp = local_cube(array, ijk_to_ras, centre, rot, radius, cfg)
    search = MirrorSearch(cube, sp, radius, COARSE_PRECISE_RADIUS if is_coarse(ijk_to_ras) else FINE_RADIUS)
    plane = search.polish(Plane(np.array([1.0, 0.0, 0.0]), 0.0, 0.0), precise=True)
    n = plane.normal * np.sign(plane.normal[0])
    axis = np.cross([1.0, 0.0, 0.0], n)
    sin = float(np.linalg.norm(axis))
    if sin < 1e-12:
        return rot, 0.0
    from scipy.spatial.transform import Rotation

    turn = Rotation.from_rotvec(axis / sin * np.arctan2(sin, float(n[0]))).as_matrix()  # takes (1, 0, 0) to n
    return rot @ turn, float(np.degrees(np.arctan2(sin, float(n[0]))))


def hypothesis_score(mirror_score, consistency, from_network, plane_logit=None):
    """How a plane hypothesis is ranked: mirror correlation + weight x reading consistency (+ a bonus for the
    E3-CNN's own plane) + weight x the network's mid-sagittal log-odds, clipped (networks that have it). The
    weights were chosen on the tuning set (synth seeds 31 and 32), not the test set."""
    score = mirror_score + CONSISTENCY_WEIGHT * consistency + (NETWORK_BONUS if from_network else 0.0)
    if plane_logit is not None:
        score += PLANE_LOGIT_WEIGHT * float(np.clip(plane_logit, -PLANE_LOGIT_CLIP, PLANE_LOGIT_CLIP))
    return float(score)


def check_refine(refine: Optional[str]) -> str:
    """The refinement choice, validated ("auto", "on" or "off"; None means "auto")."""
    refine = "auto" if refine is None else str(refine).lower()
    if refine not in REFINE_CHOICES:
        raise ValueError(f"refine must be one of {', '.join(REFINE_CHOICES)}, not {refine!r}")
    return refine
