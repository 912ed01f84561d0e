"""Classical baseline for the benchmark: similarity registration of a canonical-frame head template to the image.

Why: E3Pose is compared with what a lab would do without a network, i.e. register an average head (built from
volumes of known pose) to the new volume and read the pose off the transform. The template lives in the canonical
frame (array axes = e_x, e_y, e_z, brain centre of mass at the centre), so the registration transform *is* the pose:
rotation = canonical axes in the image's world, translation = where the template's origin lands (the brain centre),
scale = brain size relative to the template's mean brain.

Frames: world is RAS mm; SimpleITK works in LPS (``frames.sitk_geometry`` / ``preprocess._to_sitk`` do the flip).
The template's SimpleITK physical space is canonical mm itself (identity direction), so the fitted transform maps
an image point p_LPS to the canonical point c = s * Rt (p_LPS - centre) + ...; with F = diag(-1, -1, 1),
Rt = R^T F and s = 1 / scale, hence R = F Rt^T. F has det +1, so R is proper whatever the image's direction
cosines (oblique or mirrored storage only changes the voxel -> LPS map, which SimpleITK applies itself).

SimpleITK is imported inside the functions: the package imports without it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import frames
from .errors import CheckpointError
from .refine import ball_mask, equivalent_radius
from .rotation import nearest_rotation

TEMPLATE_FORMAT = "e3pose-registration-template-1"
START_CHOICES = ("identity", "moments", "multistart")
HEAD_BALL = 1.5  # metric mask and normalisation ball: this many mean brain radii about the brain centre (the head)
WORK_SPACING_FACTOR = 1.5  # the image is registered on an isotropic grid of 1.5 template voxels (3 mm by default)
# Mattes MI over correlation, measured on 6 synthetic cases started 15 degrees / 3 mm off the truth: MI 0.7-3.1
# degrees and <= 1.7 mm on all 6; correlation 2.4-6.0 degrees on 5 and one run away (128 degrees)
METRIC = "mattes"
MI_BINS = 32
SHRINK = (4, 2, 1)  # pyramid on the working grid: 12, 6, 3 mm
SMOOTH = (2.0, 1.0, 0.0)  # Gaussian sigma per level, in voxels of that level
LEARNING_RATE = 1.0  # regular-step gradient descent, first step ~1 mm at the head's edge
RELAXATION = 0.6
# ITK's moving-image gradient filter (and the fixed one) cost ~40 % of the time on a whole field of view and are
# not needed: gradients are computed at the sampled points instead
GRADIENT_FILTERS = False
SCALE_GRID = tuple(np.round(np.geomspace(0.6, 1.6, 9), 3))  # starting scales probed (brains: 0.65-1.5x the mean)
SCALE_LIMITS = (0.4, 2.5)  # a fit outside these ran away (start counted as failed)
_F = frames.LPS_FROM_RAS[:3, :3]


# ------------------------------------------------------------------------------------------------ template
@dataclass
class Template:
    """An average head in canonical pose: array axis 0 = e_x (left), 1 = e_y (anterior), 2 = e_z (inferior).

    Canonical mm are those of a brain of radius ``radius_mm`` (every input brain was scaled to it), origin at the
    brain centre of mass = the array centre.
    """

    image: np.ndarray
    spacing_mm: float
    radius_mm: float
    provenance: dict = field(default_factory=dict)

    def ijk_to_canonical(self) -> np.ndarray:
        """4x4: template voxel (i, j, k) -> canonical mm, origin at the brain centre (the array centre)."""
        n = np.asarray(self.image.shape, dtype=np.float64)
        m = np.diag([self.spacing_mm] * 3 + [1.0])
        m[:3, 3] = -(n - 1) / 2.0 * self.spacing_mm
        return m

    def head_mask(self) -> np.ndarray:
        """Where registration metrics look (uint8 on the template grid): the head, HEAD_BALL brain radii about the
        brain centre, not the womb around it."""
        return ball_mask(self.image.shape, self.spacing_mm, HEAD_BALL * self.radius_mm).astype(np.uint8)

    def digest(self) -> str:
        """SHA-256 of the template image: what cached registration results were measured with."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.image, np.float32).tobytes()).hexdigest()


def _canonical_grid(rotation_ras, com_ras, spacing_mm, size, factor=1.0):
    """IJK->RAS of a template-shaped grid placed on a head: canonical point c sits at com + factor * R c."""
    r = np.asarray(rotation_ras, dtype=np.float64)
    g = np.eye(4)
    g[:3, :3] = r * (spacing_mm * factor)
    g[:3, 3] = np.asarray(com_ras, dtype=np.float64) - g[:3, :3] @ np.full(3, (size - 1) / 2.0)
    return g


def build_template(cases: Iterable, spacing_mm: float = 2.0, size: int = 80) -> Template:
    """Average of volumes of known pose, each resampled into its canonical frame about its brain centre.

    ``cases``: (array_ijk, ijk_to_ras, rotation_ras, com_ras, brain_ml) tuples. Brains grow ~2x in radius over
    gestation, so each is scaled to the mean equivalent radius before averaging (else the average is a blur of
    sizes); each is divided by its 99th percentile inside the head ball so no single scanner scale dominates.
    """
    from .preprocess import field_of_view, resample_to_grid

    cases = list(cases)
    if not cases:
        raise ValueError("build_template needs at least one case")
    radii = np.array([equivalent_radius(float(c[4])) for c in cases])
    if not np.all(np.isfinite(radii)) or np.any(radii <= 0):
        raise ValueError(f"brain volumes must be positive, got radii {radii.tolist()} mm")
    mean_r = float(radii.mean())
    ball = ball_mask(size, spacing_mm, HEAD_BALL * mean_r)
    acc = np.zeros((size,) * 3, dtype=np.float64)
    seen = np.zeros((size,) * 3, dtype=np.float64)
    for (array, ijk_to_ras, rot, com, _), r in zip(cases, radii):
        frames.check_grid(ijk_to_ras)
        a = np.asarray(array, dtype=np.float32)
        grid = _canonical_grid(_proper(rot), com, spacing_mm, size, factor=r / mean_r)
        v = resample_to_grid(a, ijk_to_ras, grid, (size,) * 3, order=1).astype(np.float64)
        # outside a field of view is "unknown", not "dark": average only the volumes that cover a voxel
        inside = field_of_view(a.shape, ijk_to_ras, grid, (size,) * 3)
        scale = float(np.percentile(v[ball & inside], 99)) if np.any(ball & inside) else 0.0
        acc += np.where(inside, v / scale if scale > 0 else v, 0.0)
        seen += inside
    image = np.where(seen > 0, acc / np.maximum(seen, 1), 0.0)
    from . import __version__

    prov = dict(format=TEMPLATE_FORMAT, n_cases=len(cases), spacing_mm=float(spacing_mm), size=int(size),
                radius_mm=mean_r, case_radii_mm=np.round(radii, 3).tolist(),
                normalisation=f"each case / its 99th percentile within {HEAD_BALL} mean brain radii",
                e3pose_version=__version__)
    return Template(image=image.astype(np.float32), spacing_mm=float(spacing_mm), radius_mm=mean_r,
                    provenance=prov)


def save_template(template: Template, path) -> Path:
    """One ``.npz`` (image, spacing, radius, provenance as JSON), written atomically."""
    from .atomic import atomic_path, json_default

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, format=np.array(TEMPLATE_FORMAT), image=np.asarray(template.image, np.float32),
                                spacing_mm=np.float64(template.spacing_mm), radius_mm=np.float64(template.radius_mm),
                                provenance=np.array(json.dumps(template.provenance, default=json_default)))
    return path


def load_template(path) -> Template:
    """Inverse of ``save_template``; a missing, unreadable or foreign file raises ``CheckpointError`` naming it."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "registration template not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(path, f"not a readable registration template (.npz): {e}") from None
    missing = [k for k in ("format", "image", "spacing_mm", "radius_mm", "provenance") if k not in data]
    if missing or str(data.get("format")) != TEMPLATE_FORMAT:
        raise CheckpointError(path, f"not an E3Pose registration template (missing {missing or 'format tag'})")
    image = data["image"]
    spacing, radius = float(data["spacing_mm"]), float(data["radius_mm"])
    if image.ndim != 3 or not np.all(np.isfinite(image)) or not spacing > 0 or not radius > 0:
        raise CheckpointError(path, f"template is damaged (image {image.shape}, spacing {spacing}, radius {radius})")
    try:
        prov = json.loads(str(data["provenance"]))
    except ValueError as e:
        raise CheckpointError(path, f"template provenance is not JSON ({e})") from None
    return Template(image=image.astype(np.float32), spacing_mm=spacing, radius_mm=radius, provenance=prov)


# ------------------------------------------------------------------------------------------------ registration
@dataclass
class _Run:
    rotation: np.ndarray
    centre: np.ndarray
    scale: float
    metric: float
    failed: bool
    reason: str = ""


@dataclass
class RegistrationResult:
    rotation: np.ndarray  # 3x3 proper, columns = canonical axes e_x, e_y, e_z in world RAS
    translation: np.ndarray  # world RAS mm of the brain centre (the template's canonical origin in the image)
    scale: float  # image brain size / template brain size (brain radius ~ scale * template.radius_mm)
    metric: float  # final SimpleITK metric value of the kept start (lower is better: negative MI / correlation)
    seconds: float  # wall time of the whole call, all starts
    starts: int  # number of starts optimised
    info: dict = field(default_factory=dict)  # per-start metric values, start kind, settings


def cube_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube (signed permutation matrices, det +1): a start set spread over SO(3)."""
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[list(perm), range(3)] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.array(out)


def spread_rotations(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rotations spread over SO(3): the cube group for 24, else farthest-point picks from a seeded pool."""
    if n == 24:
        return cube_rotations()
    from scipy.spatial.transform import Rotation

    from .rotation import geodesic_deg

    pool = Rotation.random(4096, random_state=np.random.default_rng(seed)).as_matrix()
    picked = [np.eye(3)]
    dist = geodesic_deg(np.eye(3)[None], pool)
    for _ in range(n - 1):
        i = int(np.argmax(dist))
        picked.append(pool[i])
        dist = np.minimum(dist, geodesic_deg(pool[i][None], pool))
    return np.array(picked[:n])


def register(array_ijk, ijk_to_ras, template: Template, start="identity", n_starts: int = 24, seed: int = 0,
             *, centre=None, metric: Optional[str] = None, iterations: int = 100) -> RegistrationResult:
    """Similarity registration (rotation + isotropic scale + translation) of ``template`` (moving) to the image.

    ``start``: "identity" (template axes along the image's voxel axes, e_x flipped for mirrored storage, origin at
    the field-of-view centre); "moments" (principal axes of the intensity paired with the template's, the 4 proper
    sign choices, origin at the intensity centroid); "multistart" (``n_starts`` rotations spread over SO(3), the cube
    group for 24, at the intensity centroid); a 3x3 rotation (canonical axes in RAS) or a 4x4 canonical->RAS pose
    (e.g. another method's answer, to refine). ``centre`` (RAS mm) overrides the starting brain centre. Every start
    is optimised; the lowest final metric among the starts that did not fail wins (``info["failed"]`` is True when
    all failed: the template left the image or the scale ran outside SCALE_LIMITS; the pose is then that start's
    last one, never an exception, so a benchmark counts it as an error). ``metric``: "mattes" (mutual information,
    contrast-agnostic, the default) or "correlation". ``seed`` picks the start set when ``n_starts`` != 24 (the
    metric samples every voxel, so a run is deterministic). ``iterations``: per pyramid level.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    frames.check_grid(ijk_to_ras)
    a = np.asarray(array_ijk, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"expected a 3D (i, j, k) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("the image holds NaN or infinite values")
    metric = metric or METRIC
    g = np.asarray(ijk_to_ras, dtype=np.float64)
    fixed, fixed_grid = _working_image(a, g, WORK_SPACING_FACTOR * template.spacing_mm)
    t2c = template.ijk_to_canonical()
    moving = _template_sitk(np.asarray(template.image, dtype=np.float32), t2c)
    mask = _template_sitk(template.head_mask(), t2c)
    starts, kind = _starts(fixed, fixed_grid, g, a.shape, template, start, n_starts, seed, centre)
    runs = [_optimise(sitk, fixed, moving, mask, rot, com, metric, iterations, template.radius_mm)
            for rot, com in starts]
    best = min(range(len(runs)), key=lambda i: (runs[i].failed, runs[i].metric))
    run = runs[best]
    info = dict(start=kind, best_start=best, metrics=[r.metric for r in runs], metric_name=metric,
                failed=run.failed, start_failed=[r.failed for r in runs], reason=run.reason,
                work_spacing_mm=float(WORK_SPACING_FACTOR * template.spacing_mm))
    return RegistrationResult(rotation=run.rotation, translation=run.centre, scale=run.scale, metric=run.metric,
                              seconds=time.perf_counter() - t0, starts=len(runs), info=info)


def _proper(r) -> np.ndarray:
    """Nearest rotation (det +1) to a 3x3 matrix."""
    m = nearest_rotation(r)
    if np.linalg.det(m) < 0:
        raise ValueError("the start rotation has det < 0 (a reflection); pass a proper rotation")
    return m


def _working_image(a, g, spacing):
    """The image on an isotropic grid along its own voxel axes (Gaussian pre-filtered where coarser), / its p99.

    Why: the metric samples every fixed voxel, so a fine or anisotropic grid costs time without adding signal at
    the template's resolution.
    """
    import SimpleITK as sitk

    from .preprocess import _to_sitk, resampled_grid

    img = _to_sitk(a, g)
    sp = frames.voxel_sizes(g)
    sigma = 0.4 * np.sqrt(np.maximum(spacing ** 2 - sp ** 2, 0.0))
    if np.any(sigma > 0):
        img = sitk.SmoothingRecursiveGaussian(img, [float(max(s, 1e-3)) for s in sigma])
    grid, shape = resampled_grid(g, a.shape, spacing)
    origin, spacing_, direction = frames.sitk_geometry(grid)
    out = sitk.Resample(img, [int(s) for s in shape], sitk.Transform(), sitk.sitkLinear, origin, spacing_, direction,
                        0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(out)
    p = float(np.percentile(arr, 99))
    if p > 0:
        out = sitk.Cast(out / p, sitk.sitkFloat32)
    return out, grid


def _template_sitk(array, ijk_to_canonical):
    """The template as a SimpleITK image whose physical space is canonical mm (identity direction, no flip)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(frames.ijk_to_kji(array)))
    img.SetSpacing([float(ijk_to_canonical[0, 0])] * 3)
    img.SetOrigin([float(v) for v in ijk_to_canonical[:3, 3]])
    img.SetDirection([1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0])
    return img


def _moments(fixed, fixed_grid):
    """Intensity centroid (RAS) and principal axes (columns, RAS, by decreasing second moment) of the working image.

    Values below the median are dropped so the dark background does not pull the axes.
    """
    import SimpleITK as sitk

    arr = frames.kji_to_ijk(sitk.GetArrayFromImage(fixed)).astype(np.float64)
    w = np.clip(arr - np.median(arr), 0.0, None)
    return _weighted_moments(w, fixed_grid)


def _weighted_moments(w, grid):
    idx = np.nonzero(w > 0)
    ww = w[idx]
    pts = frames.apply(grid, np.stack(idx, 1).astype(np.float64))
    c = (ww[:, None] * pts).sum(0) / ww.sum()
    d = pts - c
    cov = (d * ww[:, None]).T @ d / ww.sum()
    evals, evecs = np.linalg.eigh(cov)
    return c, evecs[:, ::-1]


def _starts(fixed, fixed_grid, g, shape, template, start, n_starts, seed, centre):
    """[(rotation RAS, brain centre RAS)] to optimise from, and the start kind's name."""
    shape = np.asarray(shape, dtype=np.float64)
    fov_centre = frames.apply(g, (shape - 1) / 2.0)
    if isinstance(start, str):
        if start not in START_CHOICES:
            raise ValueError(f"start must be one of {START_CHOICES} or a 3x3/4x4 matrix, not {start!r}")
        if start == "identity":
            d = frames.direction_cosines(g)
            r0 = _proper(d @ np.diag([np.sign(np.linalg.det(d)), 1.0, 1.0]))
            c0 = fov_centre if centre is None else np.asarray(centre, float)
            return [(r0, c0)], start
        img_c, img_axes = _moments(fixed, fixed_grid)
        c0 = img_c if centre is None else np.asarray(centre, float)
        if start == "multistart":
            n = int(n_starts)
            if n < 1:
                raise ValueError("n_starts must be at least 1")
            return [(r, c0) for r in spread_rotations(n, seed)], f"multistart{n}"
        w = np.clip(template.image.astype(np.float64) - np.median(template.image), 0.0, None)
        tc, t_axes = _weighted_moments(w, template.ijk_to_canonical())
        if np.linalg.det(img_axes) * np.linalg.det(t_axes) < 0:
            t_axes = t_axes * np.array([1.0, 1.0, -1.0])  # eigenvectors carry no sign: make the pairing proper
        out = []
        for s in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):  # the 4 proper sign choices
            r = _proper(img_axes @ np.diag(s) @ t_axes.T)
            out.append((r, c0 - r @ tc if centre is None else c0))  # template centroid onto the image's
        return out, start
    m = np.asarray(start, dtype=np.float64)
    if m.shape == (3, 3):
        img_c = _moments(fixed, fixed_grid)[0] if centre is None else np.asarray(centre, float)
        return [(_proper(m), img_c)], "matrix"
    if m.shape == (4, 4):
        return [(_proper(m[:3, :3]), m[:3, 3].copy() if centre is None else np.asarray(centre, float))], "matrix"
    raise ValueError(f"start must be one of {START_CHOICES} or a 3x3/4x4 matrix, got an array of shape {m.shape}")


def _method(sitk, metric, mask, levels=True):
    """The ImageRegistrationMethod all starts share: full sampling (the head ball is small on the 3 mm grid)."""
    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=MI_BINS)
    elif metric == "correlation":
        reg.SetMetricAsCorrelation()
    else:
        raise ValueError(f"metric must be 'mattes' or 'correlation', not {metric!r}")
    reg.SetMetricMovingMask(mask)
    reg.SetMetricSamplingStrategy(reg.NONE)
    if not GRADIENT_FILTERS:
        reg.MetricUseFixedImageGradientFilterOff()
        reg.MetricUseMovingImageGradientFilterOff()
    reg.SetInterpolator(sitk.sitkLinear)
    if levels:
        reg.SetShrinkFactorsPerLevel(list(SHRINK))
        reg.SetSmoothingSigmasPerLevel(list(SMOOTH))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _similarity(sitk, rot, com, scale):
    """Similarity3DTransform p_LPS -> canonical for a pose (R, brain centre RAS, template scale), centred on it."""
    centre_lps = _F @ np.asarray(com, dtype=np.float64)
    tx = sitk.Similarity3DTransform()
    tx.SetCenter(centre_lps.tolist())
    tx.SetMatrix((np.asarray(rot).T @ _F).ravel().tolist(), 1e-8)  # Rt = R^T F: LPS -> canonical
    tx.SetTranslation((-centre_lps).tolist())  # the brain centre goes to the canonical origin
    tx.SetScale(1.0 / float(scale))
    return tx


def _pose(tx):
    """(R RAS, brain centre RAS, scale) of a fitted transform c = M p_LPS + o, read by mapping points."""
    o = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    m = np.stack([np.array(tx.TransformPoint(tuple(e))) - o for e in np.eye(3)], 1)
    s = float(np.cbrt(np.linalg.det(m)))
    rotation = _proper(_F @ _proper(m / s).T)
    return rotation, _F @ np.linalg.solve(m, -o), 1.0 / s


def _optimise(sitk, fixed, moving, mask, rot, com, metric, iterations, radius):
    """One multi-resolution run from (rotation RAS, brain centre RAS) -> ``_Run``.

    The starting scale is the best of SCALE_GRID at the start pose: the metric's basin in scale is narrow (about
    +-15 %) while brains differ 2x in size, so starting every head at the template's size fails for the smallest and
    largest (measured).
    """
    probe = _method(sitk, metric, mask, levels=False)
    values = []
    for sc in SCALE_GRID:
        probe.SetInitialTransform(_similarity(sitk, rot, com, sc))
        values.append(probe.MetricEvaluate(fixed, moving))
    scale0 = SCALE_GRID[int(np.argmin(values))]
    tx = _similarity(sitk, rot, com, scale0)
    reg = _method(sitk, metric, mask)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=LEARNING_RATE, minStep=0.01,
                                                 numberOfIterations=int(iterations), relaxationFactor=RELAXATION,
                                                 gradientMagnitudeTolerance=1e-8)
    # steps of comparable size in mm at the head's edge for every parameter (ITK divides the gradient by these);
    # the estimator from physical shift takes the whole field of view as lever arm, and rotation then barely moved
    # from a 15-degree start (measured: 13-17 degrees left after the fit)
    rh = HEAD_BALL * radius * scale0
    reg.SetOptimizerScales([rh ** 2] * 3 + [1.0] * 3 + [rh ** 2])
    reg.SetInitialTransform(tx, inPlace=True)
    try:
        reg.Execute(fixed, moving)
        value, reason = float(reg.GetMetricValue()), ""
    except RuntimeError as e:  # ITK: the template left the image ("all samples map outside ...")
        value, reason = float("inf"), frames._first_line(e)
    if reason or not np.all(np.isfinite(tx.GetParameters())):  # wherever it went, report where it started
        rotation, centre, scale = np.asarray(rot, dtype=np.float64), np.asarray(com, dtype=np.float64), scale0
        reason = reason or "the optimiser diverged (non-finite parameters)"
    else:
        rotation, centre, scale = _pose(tx)
        if not SCALE_LIMITS[0] <= scale <= SCALE_LIMITS[1]:
            reason = f"scale {scale:.2f} outside {SCALE_LIMITS}: the optimiser ran away"
    return _Run(rotation, centre, scale, value, bool(reason), reason)
