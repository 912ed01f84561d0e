#!/usr/bin/env python
"""Transfer test set from real brain anatomy (MNI152 2009 sym), built outside ``e3pose synth`` (issue 11).

EVALUATION ONLY. These volumes are the project's independent check of what a model learned: never train, tune,
select checkpoints or pick thresholds on them (nor on anything else derived from the MNI templates).

Usage (run with the E3Pose venv; nilearn is NOT installed, only its wheel is read as a zip file)::

    .venv/bin/python Resources/benchmarks/make_transfer_set.py OUT --n 120 --seed 1
    .venv/bin/python Resources/benchmarks/make_transfer_set.py OUT_NAV --n 40 --seed 2 --navigator
    # then
    .venv/bin/e3pose infer OUT/images -o PRED
    .venv/bin/e3pose evaluate PRED OUT/poses.csv -o PRED_EVAL

Options: ``--nilearn-wheel PATH`` (else $E3POSE_NILEARN_WHEEL, /tmp/nl/<wheel>, the cache folder, and finally
``python -m pip download nilearn==0.14.1 --no-deps -d CACHE``); ``--cache DIR`` (default ~/.cache/e3pose/nilearn);
``--max-dim`` (largest grid size per axis, default 160); ``--voxel MM`` (force isotropic voxels: small tests);
``--fold`` (CSV fold, default "test"); ``--previews`` (one PNG of three mid-slices per volume in OUT/previews);
``--no-eyes``; ``--workers``. The three source members' sha256 are checked against the values of the PyPI wheel
(``--no-verify`` to skip) and recorded in OUT/transfer_config.json with the full recipe and every case's draw.

Source: nilearn 0.14.1 wheel, ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``:
1 mm MNI152 2009a *symmetric* T1 and grey/white-matter probability maps. The T1 is brain-extracted (no scalp,
skull or eyes in it), so everything outside the brain mask is built here from the mask's geometry.

Output (the layout ``e3pose evaluate`` and the trainers read, same conventions as ``e3pose synth``):

* ``OUT/images/<id>.nii.gz`` int16, ``OUT/labels/<id>.nii.gz`` uint8: 0 background, 1 brain (the template's
  brain mask: parenchyma, ventricles and sulcal CSF, brainstem down to the template's lower edge), 2 eyes (added
  by rule, see below; absent with --no-eyes). ids are ``mni<seed>_<index:05d>``.
* ``OUT/poses.csv``: the columns of ``E3PoseLogic.synth.dataset.CSV_COLUMNS``, written by its ``format_row``;
  rot_x/y/z = ``euler_from_rotation_voxel(rotation_voxel_from_world(R, affine))`` exactly as synth does (scipy
  extrinsic 'xyz' degrees of R_vc, voxel-axis frame -> canonical, mirrored affines included); com_r/a/s = centre
  of mass of label 1 in world RAS mm, measured on the written label; protocol standard / navigator; ga_weeks; fold.
* ``OUT/transfer_config.json``: recipe, source hashes, per-case draws.

Canonical frame of the MNI head: e_x = towards the subject's left = -MNI x, e_y = anterior = +MNI y,
e_z = inferior = -MNI z (C = diag(-1, 1, -1), a proper rotation); origin = brain (label 1) centre of mass. The
random non-linear deformation has its rigid part (translation and first-order rotation over the brain) removed,
so the MNI axes stay the head's axes; a small per-axis shape scaling (along these axes) changes nothing either.

Recipe per volume (independent generator per (seed, index), so cases do not depend on --n or --workers):

* size: gestational age U(20, 38) weeks -> brain volume interpolated in a table (60 ml at 20 weeks ... 400 ml at
  38 weeks) x U(0.9, 1.1); the MNI head is scaled isotropically to it, then per canonical axis by exp(N(0, 0.04)).
* anatomy: random smooth displacement field (random weights of Gaussian bumps 45-70 mm apart in MNI mm, summed
  separably), rigid part removed, 99th-percentile magnitude over the head = 2-5 % of the brain length, so
  the left and right hemispheres deform differently; the Jacobian is kept positive.
* contrast (fetal T2): inside the brain mask, grey matter -> cortex U(0.30, 0.45), white matter -> U(0.55, 0.75),
  the rest -> CSF U(0.85, 1.0) where T1 is low (ventricles, sulci) or deep grey U(0.38, 0.52) where T1 is high;
  the brainstem (a soft ellipsoid) is darker U(0.35, 0.5). Around the brain: extra-axial CSF U(1.5, 4) mm, skull
  U(1, 2.5) mm dark U(0.03, 0.15), scalp U(1.5, 3.5) mm medium U(0.35, 0.55), built as shells of the closed brain
  mask (signed distance); a face ellipsoid (soft tissue, smoothly joined to the scalp) with two eyes (vitreous
  bright, lens dark) placed below the orbito-frontal cortex at MNI (+-32, 52, z) with radius 13 MNI mm (fetal
  ocular diameter 9-16 mm), z chosen so that the eyes clear the intracranial CSF. The template has no eyes or
  face: these are placed by this rule, not found in the data (--no-eyes leaves them out).
* surroundings: amniotic fluid U(0.85, 1.0) in a random ellipsoid around the head, maternal wall (textured,
  U(0.25, 0.5)) and fat beyond it, air outside, a placenta cap, and a fetal body ellipsoid attached at the neck.
* acquisition: pose uniform on SO(3); field of view U(200, 320) mm per axis (standard) or U(360, 400) mm with
  U(5.5, 6.5) mm voxels (--navigator); voxels U(1.5, 3) mm isotropic or (p 0.35) in-plane U(1.2, 2) mm with
  U(3, 5) mm slices; stack orientation one of the 6 axis permutations, oblique (p 0.5, 5-40 degrees), mirrored
  (p 0.2, det < 0); random origin; head anywhere it fits. Partial volume: each voxel is the mean of a sub-grid of
  samples about 1 mm (fetal) apart (a box filter of the voxel's size), taken from a source pre-blurred to that
  sample spacing. Then a smooth multiplicative bias field (p 0.9), Rician (p 0.7) or Gaussian noise, sigma
  U(0.01, 0.05) (navigator U(0.05, 0.12)), and a random int16 scale like synth.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from E3PoseLogic.synth.dataset import (CSV_COLUMNS, euler_from_rotation_voxel, format_row,  # noqa: E402
                                       nifti_bytes, rotation_voxel_from_world)

F32 = np.float32
NILEARN_VERSION = "0.14.1"
WHEEL_NAME = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"  # PyPI file of nilearn 0.14.1
MEMBERS = {t: f"nilearn/datasets/data/mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz" for t in ("t1", "gm", "wm")}
MEMBER_SHA256 = {
    "t1": "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    "gm": "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    "wm": "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
}
DEFAULT_WHEEL_PLACES = (Path("/tmp/nl") / WHEEL_NAME,)
RECIPE_VERSION = 1

# canonical axes in MNI (RAS) coordinates: e_x = -x (left), e_y = +y (anterior), e_z = -z (inferior)
C_MNI = np.diag([-1.0, 1.0, -1.0])
# fetal brain volume (ml) by gestational age (weeks), interpolated linearly
GA_TABLE = ((20, 60.0), (22, 75.0), (24, 95.0), (26, 120.0), (28, 155.0), (30, 200.0), (32, 245.0), (34, 295.0),
            (36, 345.0), (38, 400.0))
INTENSITY = {
    "csf": (0.85, 1.0), "wm": (0.55, 0.75), "cortex": (0.30, 0.45), "deep_gm": (0.38, 0.52),
    "brainstem": (0.35, 0.50), "skull": (0.03, 0.15), "scalp": (0.35, 0.55), "vitreous": (0.80, 1.0),
    "lens": (0.05, 0.25), "amniotic": (0.85, 1.0), "maternal": (0.25, 0.50), "fat": (0.60, 0.85),
    "placenta": (0.45, 0.65), "body": (0.35, 0.55), "air": (0.0, 0.03),
}
EYE_MNI = (32.0, 52.0)  # |x|, y of the eye centres (MNI mm); z is fitted below the brain
EYE_RADIUS_MNI = 13.0
FACE_CENTRE_MNI = np.array([0.0, 48.0, -44.0])
FACE_AXES_MNI = np.array([52.0, 40.0, 34.0])
FACE_BLEND_MNI = 6.0  # smooth union of face and scalp (mm): no fluid-filled notch between them
BRAINSTEM_MNI = (np.array([0.0, -28.0, -42.0]), np.array([14.0, 15.0, 34.0]))
HULL_STEP = 2.0  # mm, grid of the head-shell signed distance
HULL_CLOSING_MM = 10.0
DISP_STEP = 4.0  # mm, grid of the displacement field
PAD_MM = 48.0  # room around the brain for skull, scalp, face and eyes at the smallest scale


# ------------------------------------------------------------------------------------------------------- source
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_wheel(path=None, cache=None, download=True) -> Path:
    """The nilearn wheel: PATH, $E3POSE_NILEARN_WHEEL, /tmp/nl, CACHE, else ``pip download`` into CACHE."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"make_transfer_set: no such wheel: {p}")
        return p
    env = os.environ.get("E3POSE_NILEARN_WHEEL")
    if env and Path(env).is_file():
        return Path(env)
    cache = Path(cache or Path.home() / ".cache" / "e3pose" / "nilearn")
    for p in DEFAULT_WHEEL_PLACES + (cache / WHEEL_NAME,):
        if p.is_file():
            return p
    if not download:
        raise SystemExit(f"make_transfer_set: {WHEEL_NAME} not found")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"nilearn=={NILEARN_VERSION}", "--no-deps", "-d", str(cache)]
    print("make_transfer_set: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    p = cache / WHEEL_NAME
    if not p.is_file():
        raise SystemExit(f"make_transfer_set: pip did not leave {p}")
    return p


def read_members(wheel: Path, verify=True) -> dict:
    """{'t1'|'gm'|'wm': .nii.gz bytes} from the wheel (a zip), checked against the PyPI wheel's members."""
    with zipfile.ZipFile(wheel) as z:
        data = {t: z.read(m) for t, m in MEMBERS.items()}
    if verify:
        bad = [t for t, b in data.items() if sha256(b) != MEMBER_SHA256[t]]
        if bad:
            raise SystemExit(f"make_transfer_set: {wheel}: members {bad} differ from nilearn {NILEARN_VERSION}'s "
                             "(sha256); pass --no-verify to use them anyway (the set will not be the same)")
    return data


def _nifti_from_gz(b: bytes):
    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(gzip.decompress(b))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


class Grid:
    """Axis-aligned MNI grid: index = (m - origin) / step."""

    def __init__(self, origin, step, shape):
        self.origin = np.asarray(origin, float)
        self.step = float(step)
        self.shape = tuple(int(s) for s in shape)

    def sample(self, volume, m, order=1, cval=0.0):
        """Trilinear (order 1) sample of ``volume`` at MNI points m (3, N)."""
        from scipy import ndimage

        idx = (m - self.origin[:, None].astype(m.dtype)) / m.dtype.type(self.step)
        return ndimage.map_coordinates(volume, idx, order=order, mode="constant", cval=cval, prefilter=False)

    def points(self):
        ax = [self.origin[a] + self.step * np.arange(self.shape[a]) for a in range(3)]
        return np.meshgrid(*ax, indexing="ij")


class Source:
    """The MNI maps (cropped to the brain), the brain mask, the head-shell distance map and the eye geometry."""

    def __init__(self, members: dict):
        from scipy import ndimage

        maps, aff = {}, None
        for t in ("t1", "gm", "wm"):
            arr, a = _nifti_from_gz(members[t])
            if aff is not None and not np.allclose(a, aff):
                raise SystemExit("make_transfer_set: the MNI maps are on different grids")
            aff = a
            maps[t] = arr / F32(255.0)
        if not np.allclose(aff[:3, :3], np.eye(3)):
            raise SystemExit(f"make_transfer_set: expected a 1 mm RAS grid, got {aff.tolist()}")
        brain = maps["t1"] > 0
        lab, n = ndimage.label(brain)
        if n > 1:
            brain = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        brain = ndimage.binary_fill_holes(brain)
        idx = np.argwhere(brain)
        lo = np.maximum(idx.min(0) - 3, 0)
        hi = np.minimum(idx.max(0) + 4, brain.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.grid = Grid(aff[:3, 3] + lo, 1.0, hi - lo)
        self.t1 = np.ascontiguousarray(maps["t1"][sl])
        self.gm = np.clip(maps["gm"][sl], 0, 1)
        self.wm = np.clip(maps["wm"][sl], 0, 1)
        s = self.gm + self.wm
        over = s > 1
        self.gm[over] /= s[over]
        self.wm[over] /= s[over]
        self.brain = np.ascontiguousarray(brain[sl])
        self.brain_ml = float(self.brain.sum()) / 1000.0
        pts = self.grid.points()
        self.com = np.array([float(p[self.brain].mean()) for p in pts])
        # soft brain label (sub-voxel edge) and brainstem weight
        self.brain_soft = ndimage.gaussian_filter(self.brain.astype(F32), 0.5)
        c, ax = BRAINSTEM_MNI
        r = np.sqrt(sum(((p - c[a]) / ax[a]) ** 2 for a, p in enumerate(pts)))
        self.brainstem = np.clip((1.15 - r) / 0.3, 0, 1).astype(F32)
        del pts, r
        # head shells: signed distance (mm) to the brain mask closed by a 10 mm ball, on a padded 2 mm grid
        pad = int(np.ceil(PAD_MM / HULL_STEP))
        f = int(HULL_STEP)
        shp = -(-np.asarray(self.brain.shape) // f) * f
        b = np.zeros(shp, bool)
        b[: self.brain.shape[0], : self.brain.shape[1], : self.brain.shape[2]] = self.brain
        coarse = b.reshape(shp[0] // f, f, shp[1] // f, f, shp[2] // f, f).mean(axis=(1, 3, 5)) >= 0.5
        coarse = np.pad(coarse, pad)
        self.hull_grid = Grid(self.grid.origin + (f - 1) / 2.0 - pad * HULL_STEP, HULL_STEP, coarse.shape)
        rc = HULL_CLOSING_MM / HULL_STEP
        dil = ndimage.distance_transform_edt(~coarse) <= rc
        hull = ndimage.distance_transform_edt(dil) > rc
        hull |= coarse
        sd = ndimage.distance_transform_edt(~hull) - ndimage.distance_transform_edt(hull)
        self.hull_sd = ndimage.gaussian_filter((sd * HULL_STEP).astype(F32), 1.0)
        hp = self.hull_grid.points()
        inside = self.hull_sd <= 0
        self.hull_radius = float(np.sqrt(sum((p[inside] - self.com[a]) ** 2 for a, p in enumerate(hp))).max())
        self.brain_length = float(idx[:, 1].max() - idx[:, 1].min() + 1)
        del hp
        # eyes: candidate heights (clearance above the eye = min signed distance over its upper half)
        u = _sphere_points(400)
        u = u[u[:, 2] > -0.2]
        self.eye_z = np.arange(-20.0, -75.0, -1.0)
        clear = []
        for z in self.eye_z:
            cs = [np.array([sx * EYE_MNI[0], EYE_MNI[1], z]) for sx in (-1, 1)]
            p = np.concatenate([cc[:, None] + EYE_RADIUS_MNI * u.T for cc in cs], axis=1).astype(F32)
            clear.append(float(self.hull_grid.sample(self.hull_sd, p, cval=1e3).min()))
        self.eye_clearance = np.asarray(clear)

    def eye_height(self, clearance_mm: float) -> float:
        """Highest eye-centre z (MNI) whose eyes clear the closed brain surface by ``clearance_mm``."""
        ok = np.nonzero(self.eye_clearance >= clearance_mm)[0]
        return float(self.eye_z[ok[0]] if len(ok) else self.eye_z[-1])


def _sphere_points(n):
    k = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * k / n)
    th = np.pi * (1 + 5 ** 0.5) * k
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)


# ------------------------------------------------------------------------------------------------------ helpers
def _occ(d, w):
    """Occupancy of {d < 0}: linear ramp one ``w`` wide (partial volume)."""
    return np.clip(F32(0.5) - d / F32(w), 0.0, 1.0)


def _lerp(a, b, t):
    return a + (b - a) * t


def _ellipsoid_d(p, centre, axes):
    """Approximate signed distance (mm) to an ellipsoid, p (3, N) in the ellipsoid's axes."""
    x = [(p[a] - F32(centre[a])) for a in range(3)]
    r = np.sqrt(x[0] ** 2 + x[1] ** 2 + x[2] ** 2) + F32(1e-4)
    rho = np.sqrt(sum((x[a] / F32(axes[a])) ** 2 for a in range(3))) + F32(1e-6)
    return r - r / rho


def _smooth_noise(rng, shape, n):
    """Smooth random field of ``shape`` with unit variance: N(0, 1) weights of n Gaussian bumps per axis (about
    n lobes across each axis), summed separably (a few array passes, no spline resampling of the whole grid)."""
    bases = []
    for N in shape:
        x = np.arange(N, dtype=np.float64)
        nodes = (np.arange(n) + 0.5) * N / n - 0.5
        B = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / (0.6 * N / n)) ** 2)
        bases.append((B / np.sqrt((B ** 2).sum(1, keepdims=True))).astype(F32))
    c = rng.normal(size=(n, n, n)).astype(F32)
    f = np.tensordot(c, bases[2], axes=([2], [1]))  # (n, n, Nz)
    f = np.einsum("abz,yb->ayz", f, bases[1])  # (n, Ny, Nz)
    return np.tensordot(bases[0], f, axes=([1], [0]))  # (Nx, Ny, Nz)


def brain_ml_for_ga(ga):
    g, v = zip(*GA_TABLE)
    return float(np.interp(ga, g, v))


# ------------------------------------------------------------------------------------------------------ drawing
def case_rng(seed, index):
    return np.random.default_rng([int(seed), int(index), 152])  # 152: not synth's streams


def case_id(seed, index):
    return f"mni{int(seed)}_{int(index):05d}"


def sample_grid(rng, navigator, head_radius, max_dim, voxel=None):
    if voxel is not None:
        spacing = np.full(3, float(voxel))
    elif navigator:
        spacing = np.full(3, rng.uniform(5.5, 6.5))
    elif rng.random() < 0.35:
        spacing = np.full(3, rng.uniform(1.2, 2.0))
        spacing[rng.integers(3)] = rng.uniform(3.0, 5.0)
    else:
        spacing = np.full(3, rng.uniform(1.5, 3.0))
    fov = np.full(3, rng.uniform(360.0, 400.0)) if navigator else rng.uniform(200.0, 320.0, size=3)
    need = 2.0 * head_radius + 2.0 * spacing
    n = np.maximum(np.round(fov / spacing), np.ceil(need / spacing))
    if np.any(np.ceil(need / spacing) > max_dim):
        raise ValueError(f"a {2 * head_radius:.0f} mm head does not fit in {max_dim} voxels of "
                         f"{spacing.min():.2f} mm: raise --max-dim or --voxel")
    n = np.minimum(n, max_dim).astype(int)
    perm = rng.permutation(3)
    D = np.eye(3)[:, perm] * rng.choice([-1.0, 1.0], size=3)
    if np.linalg.det(D) < 0:
        D[:, 0] *= -1.0
    oblique = 0.0
    if rng.random() < 0.5:
        from scipy.spatial.transform import Rotation

        axis = rng.normal(size=3)
        oblique = float(rng.uniform(5.0, 40.0))
        D = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(oblique)).as_matrix() @ D
    mirrored = bool(rng.random() < 0.2)
    if mirrored:
        D[:, rng.integers(3)] *= -1.0
    A = np.eye(4)
    A[:3, :3] = D * spacing
    A[:3, 3] = rng.normal(scale=40.0, size=3) - A[:3, :3] @ ((n - 1) / 2.0)
    A = A.astype(np.float32).astype(np.float64)  # what a NIfTI reader gets back
    return A, tuple(int(v) for v in n), dict(spacing=spacing.tolist(), shape=n.tolist(), oblique_deg=oblique,
                                                 mirrored=mirrored)


def displacement_field(rng, src: Source, amp_frac):
    """Random smooth displacement (MNI mm) on a 4 mm grid, rigid part removed, scaled to ``amp_frac`` of the brain
    length (99th percentile of the magnitude inside the head). Returns (grid, (3, ...) float32, info)."""
    hg = src.hull_grid
    ext = np.asarray(hg.shape) * hg.step
    shape = np.ceil(ext / DISP_STEP).astype(int) + 1
    grid = Grid(hg.origin, DISP_STEP, shape)
    node_mm = rng.uniform(45.0, 70.0)
    n = int(np.clip(np.round(ext.max() / node_mm), 3, 8)) + 1
    d = np.stack([_smooth_noise(rng, shape, n) for _ in range(3)])
    pts = grid.points()
    hs = grid.sample(src.hull_sd, np.stack([p.ravel() for p in pts]).astype(F32), cval=1e3).reshape(shape)
    inside = hs <= 0
    P = np.stack([p[inside] - src.com[a] for a, p in enumerate(pts)], 1)  # (K, 3)
    X = np.concatenate([np.ones((len(P), 1)), P], 1)
    Y = np.stack([c[inside] for c in d], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)  # Y ~ a + P L^T
    a, L = coef[0], coef[1:].T
    W = 0.5 * (L - L.T)  # first-order rotation
    for c in range(3):
        d[c] -= F32(a[c]) + sum(F32(W[c, k]) * (pts[k] - F32(src.com[k])) for k in range(3)).astype(F32)
    mag = np.sqrt((d ** 2).sum(0))
    target = amp_frac * src.brain_length
    d *= F32(target / max(np.percentile(mag[inside], 99), 1e-6))
    # keep it invertible: det(I + grad d) > 0.5 in the head
    g = np.stack([np.stack(np.gradient(d[c], DISP_STEP), 0) for c in range(3)])  # g[c, k] = dd_c / dm_k
    for _ in range(6):
        J = g + np.eye(3)[:, :, None, None, None]
        det = np.linalg.det(np.moveaxis(J, (0, 1), (-2, -1))[hs <= 20])
        if det.min() > 0.5:
            break
        d *= F32(0.7)
        g *= 0.7
        target *= 0.7
    return grid, d, dict(node_mm=float(node_mm), amplitude_mm=float(target), min_jacobian=float(det.min()),
                         removed_rotation_deg=float(np.rad2deg(np.linalg.norm([W[2, 1], W[0, 2], W[1, 0]]))))


def source_intensity(src: Source, it: dict, blur_vox: float):
    """Fetal-T2 rendition of the MNI tissue maps (cropped grid), CSF outside the brain; pre-blurred."""
    from scipy import ndimage

    gm, wm = src.gm, src.wm
    rest = np.clip(F32(1.0) - gm - wm, 0.0, 1.0)
    low_t1 = np.clip((F32(0.52) - src.t1) / F32(0.2), 0.0, 1.0)
    low_t1[~src.brain] = 1.0
    wm_i = _lerp(F32(it["wm"]), F32(it["brainstem"]), src.brainstem)
    img = gm * F32(it["cortex"]) + wm * wm_i + rest * (low_t1 * F32(it["csf"]) + (1 - low_t1) * F32(it["deep_gm"]))
    if blur_vox > 0.3:
        img = ndimage.gaussian_filter(img, blur_vox, truncate=3.0)
    return img.astype(F32)


# ------------------------------------------------------------------------------------------------------- render
def make_volume(src: Source, seed: int, index: int, navigator=False, max_dim=160, voxel=None, eyes=True,
                fine_mm=1.0, debug=None):
    """One volume: (int16 image, uint8 label, affine, R canonical->world, rotation_voxel, com_ras, info).
    ``debug``: a dict that receives the noise-free image and the surroundings (for inspection)."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    t_start = time.perf_counter()
    rng = case_rng(seed, index)
    ga = float(rng.uniform(20.0, 38.0))
    brain_ml = brain_ml_for_ga(ga) * float(rng.uniform(0.9, 1.1))
    s = (brain_ml / src.brain_ml) ** (1.0 / 3.0)  # fetal mm per MNI mm
    shape_f = np.exp(rng.normal(0.0, 0.04, size=3))
    shape_f /= np.prod(shape_f) ** (1.0 / 3.0)
    it = {k: float(rng.uniform(*r)) for k, r in INTENSITY.items()}
    csf_mm, skull_mm, scalp_mm = rng.uniform(1.5, 4.0), rng.uniform(1.0, 2.5), rng.uniform(1.5, 3.5)
    amp_frac = float(rng.uniform(0.02, 0.05))
    dgrid, disp, dinfo = displacement_field(rng, src, amp_frac)
    tex = _smooth_noise(rng, dgrid.shape, 12)  # soft-tissue texture (scalp, face), in MNI coordinates
    # shell boundaries in MNI mm (signed distance to the closed brain surface)
    T1 = csf_mm / s
    T2 = T1 + skull_mm / s
    T3 = T2 + scalp_mm / s
    eye_z = src.eye_height(T1 + 0.5 * (T2 - T1)) + float(rng.uniform(-2.0, 2.0))
    eye_c = [np.array([sx * EYE_MNI[0], EYE_MNI[1], eye_z]) for sx in (-1.0, 1.0)]
    eye_r = EYE_RADIUS_MNI * float(rng.uniform(0.92, 1.08))
    # head radius (fetal mm) about the brain COM, for the grid and the surroundings
    face_far = np.linalg.norm(FACE_CENTRE_MNI - src.com) + FACE_AXES_MNI.max()
    head_radius = (max(src.hull_radius + T3, face_far) + dinfo["amplitude_mm"] * 1.5) * s * shape_f.max() + 2.0
    A, shape, ginfo = sample_grid(rng, navigator, head_radius, max_dim, voxel)
    spacing = np.sqrt((A[:3, :3] ** 2).sum(0))
    # pose: canonical -> world, rotation uniform on SO(3); the MNI brain COM lands where the head fits
    R = Rotation.random(random_state=rng).as_matrix()
    n = np.asarray(shape, float)
    slack = np.maximum(0.0, (n - 1) * spacing / 2.0 - head_radius - spacing)
    centre_idx = (n - 1) / 2.0 + rng.uniform(-1.0, 1.0, size=3) * slack / spacing
    t = A[:3, :3] @ centre_idx + A[:3, 3]
    # index -> MNI (undeformed): m = com + C diag(1/(s f)) R^T (A idx + a - t)
    Mc = C_MNI @ np.diag(1.0 / (s * shape_f)) @ R.T
    M = Mc @ A[:3, :3]
    b = src.com + Mc @ (A[:3, 3] - t)

    # surroundings, one sample per voxel
    env, env_info = environment(rng, it, A, shape, R, t, head_radius, s)
    # head: sub-voxel samples about fine_mm apart, only in voxels near the head
    k = np.maximum(1, np.round(spacing / fine_mm)).astype(int)
    step_mm = float(np.max(spacing / k))
    img_src = source_intensity(src, it, 0.5 * step_mm / s)
    w = step_mm / s  # ramp width, MNI mm
    cen = np.linalg.solve(A, np.append(t, 1.0))[:3]
    half = head_radius / spacing + 1.0
    lo = np.clip(np.floor(cen - half).astype(int), 0, shape)
    hi = np.clip(np.ceil(cen + half).astype(int) + 1, 0, shape)
    vi = np.stack(np.meshgrid(*[np.arange(lo[a], hi[a]) for a in range(3)], indexing="ij"), 0).reshape(3, -1)
    mv = (M @ vi + b[:, None]).astype(F32)
    margin = float(np.linalg.norm(spacing)) / s + dinfo["amplitude_mm"] * 1.5 + w + FACE_BLEND_MNI
    near = src.hull_grid.sample(src.hull_sd, mv, cval=1e3) < T3 + margin
    near |= _ellipsoid_d(mv, FACE_CENTRE_MNI, FACE_AXES_MNI) < margin
    vi = vi[:, near]
    del mv, near
    offs = np.stack(np.meshgrid(*[(np.arange(k[a]) + 0.5) / k[a] - 0.5 for a in range(3)], indexing="ij"),
                    0).reshape(3, -1)
    K = offs.shape[1]
    head = np.zeros(shape, F32)
    occ_v = np.zeros(shape, F32)
    brain_v = np.zeros(shape, F32)
    eye_v = np.zeros(shape, F32)
    chunk = max(1, 1_500_000 // K)
    Mf = M.astype(F32)
    for c0 in range(0, vi.shape[1], chunk):
        v = vi[:, c0:c0 + chunk]
        p = (v[:, :, None] + offs[:, None, :]).reshape(3, -1).astype(F32)
        m = Mf @ p + b.astype(F32)[:, None]
        del p
        dsp = np.stack([dgrid.sample(disp[c], m) for c in range(3)])
        m += dsp
        del dsp
        sd = src.hull_grid.sample(src.hull_sd, m, cval=1e3)
        inner = src.grid.sample(img_src, m, cval=it["csf"])
        brain = src.grid.sample(src.brain_soft, m, cval=0.0)
        a_, b_ = sd - F32(T3), _ellipsoid_d(m, FACE_CENTRE_MNI, FACE_AXES_MNI)
        outer = np.minimum(a_, b_) - F32(FACE_BLEND_MNI) * np.log1p(np.exp(-np.abs(a_ - b_) / F32(FACE_BLEND_MNI)))
        occ = _occ(outer, w)
        del a_, b_, outer
        img = F32(it["scalp"]) * (F32(1.0) + F32(0.1) * dgrid.sample(tex, m))
        img = _lerp(img, F32(it["skull"]), _occ(sd - T2, w))
        img = _lerp(img, inner, _occ(sd - T1, w))
        eye = np.zeros_like(sd)
        if eyes:
            for ec in eye_c:
                de = np.sqrt(sum((m[a] - F32(ec[a])) ** 2 for a in range(3))) - F32(eye_r)
                eo = _occ(de, w)
                eye = np.maximum(eye, eo)
                img = _lerp(img, F32(it["vitreous"]), eo)
                lens_c = ec + np.array([0.0, 0.62 * eye_r, 0.0])
                dl = _ellipsoid_d(m, lens_c, (0.32 * eye_r, 0.18 * eye_r, 0.32 * eye_r))
                img = _lerp(img, F32(it["lens"]), _occ(dl, w))
            occ = np.maximum(occ, eye)
        brain = brain * _occ(sd - T1, w)
        ii, jj, kk = v
        sl = (ii, jj, kk)
        occ_v[sl] = occ.reshape(-1, K).mean(1)
        head[sl] = (img * occ).reshape(-1, K).mean(1)
        brain_v[sl] = brain.reshape(-1, K).mean(1)
        eye_v[sl] = eye.reshape(-1, K).mean(1)
    del vi
    clean = env * (F32(1.0) - occ_v) + head
    if debug is not None:
        debug.update(clean=clean, env=env, occ=occ_v, img_src=img_src)
    label = np.zeros(shape, np.uint8)
    label[brain_v >= 0.5] = 1
    label[(eye_v >= 0.5) & (label == 0)] = 2
    # scanner: bias field, noise, int16 scale
    art = {}
    v = clean
    if rng.random() < 0.9:
        amp = float(rng.uniform(0.1, 0.3))
        v = v * np.exp(F32(amp) * _smooth_noise(rng, shape, 4))
        art["bias_amplitude"] = amp
    sigma = float(rng.uniform(0.05, 0.12) if navigator else rng.uniform(0.01, 0.05))
    n1 = rng.normal(0.0, sigma, size=shape).astype(F32)
    if rng.random() < 0.7:
        n2 = rng.normal(0.0, sigma, size=shape).astype(F32)
        v = np.sqrt((v + n1) ** 2 + n2 ** 2)
        art["noise"] = "rician"
    else:
        v = np.clip(v + n1, 0.0, None)
        art["noise"] = "gaussian"
    art["noise_sigma"] = sigma
    scale = rng.uniform(800.0, 3000.0) / max(float(np.percentile(v, 99.9)), 1e-6)
    image = np.clip(np.round(v * scale), 0, 32767).astype(np.int16)
    if not (label == 1).any():
        raise RuntimeError(f"{case_id(seed, index)}: empty brain label")
    com_idx = np.asarray(ndimage.center_of_mass(label == 1))
    com = A[:3, :3] @ com_idx + A[:3, 3]
    rot_voxel = rotation_voxel_from_world(R, A)
    info = dict(frame_id=case_id(seed, index), ga_weeks=ga, brain_ml_target=brain_ml, head_radius_mm=head_radius,
                brain_ml_label=float((label == 1).sum() * np.prod(spacing) / 1000.0), scale_fetal_per_mni=s,
                shape_factors=shape_f.tolist(), shells_mm=dict(csf=csf_mm, skull=skull_mm, scalp=scalp_mm),
                eyes=bool(eyes), eye_centre_z_mni=eye_z, eye_radius_mni=eye_r, deformation=dinfo,
                intensity=it, grid=ginfo, affine=A.tolist(), rotation_ras=R.tolist(), mni_com_world=t.tolist(),
                com_ras=com.tolist(), environment=env_info, artefacts=art, subsamples=k.tolist(),
                protocol="navigator" if navigator else "standard", seconds=time.perf_counter() - t_start)
    return image, label, A, R, rot_voxel, com, info


def environment(rng, it, A, shape, R, t, head_radius, s):
    """Whole-grid surroundings: air, abdominal fat, textured maternal wall, placenta, amniotic fluid, fetal body."""
    from scipy.spatial.transform import Rotation

    axes = rng.uniform(head_radius + 15.0, head_radius + 60.0, size=3)
    slack = max(0.0, float(axes.min()) - head_radius - 6.0)
    off = rng.normal(size=3)
    off *= rng.uniform(0.0, slack) / max(np.linalg.norm(off), 1e-9)
    U = Rotation.random(random_state=rng).as_matrix()
    uc = t + off
    wall, fat = float(rng.uniform(15.0, 50.0)), float(rng.uniform(5.0, 20.0))
    pdir = rng.normal(size=3)
    pdir /= np.linalg.norm(pdir)
    pl_mm, pl_radius = float(rng.uniform(15.0, 35.0)), float(rng.uniform(50.0, 90.0))
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=F32) for n in shape], indexing="ij"), 0).reshape(3, -1)
    p = (U.T @ A[:3, :3]).astype(F32) @ idx + (U.T @ (A[:3, 3] - uc)).astype(F32)[:, None]
    w = float(np.mean(np.sqrt((A[:3, :3] ** 2).sum(0))))
    # uterus and abdominal wall: ellipsoids with smoothly wavy surfaces
    d_ut = _ellipsoid_d(p, (0, 0, 0), axes) + F32(6.0) * _smooth_noise(rng, shape, 5).ravel()
    d_ab = _ellipsoid_d(p, (0, 0, 0), axes + wall) + F32(10.0) * _smooth_noise(rng, shape, 4).ravel()
    # placenta: a crescent on the uterine wall, thickest at its centre
    pu = U.T @ pdir
    p0 = (pu / np.sqrt(np.sum((pu / axes) ** 2))).astype(F32)
    r0 = np.sqrt(((p - p0[:, None]) ** 2).sum(0)) / F32(pl_radius)
    del p
    tex = (F32(1.0) + F32(0.15) * _smooth_noise(rng, shape, 6) + F32(0.07) * _smooth_noise(rng, shape, 18)).ravel()
    img = np.full(idx.shape[1], F32(it["air"]))
    img = _lerp(img, F32(it["fat"]), _occ(d_ab, w))
    img = _lerp(img, F32(it["maternal"]) * tex, _occ(d_ab + F32(fat), w))
    o_ut = _occ(d_ut, w)
    img = _lerp(img, F32(it["amniotic"]), o_ut)
    depth = F32(pl_mm) * np.clip(F32(1.0) - r0 ** 2, 0.0, 1.0)
    img = _lerp(img, F32(it["placenta"]) * tex, o_ut * _occ(-d_ut - depth, w) * (r0 < 1))
    del d_ab, r0, depth
    # fetal body: ellipsoid from the neck (below the brainstem), flexed/tilted at random
    flex, lat = np.deg2rad(rng.uniform(-30.0, 40.0)), np.deg2rad(rng.uniform(-25.0, 25.0))
    base = np.array([0.0, -0.3, 1.0]) / np.hypot(0.3, 1.0)
    Rx = Rotation.from_rotvec([flex, 0, 0]).as_matrix()
    Ry = Rotation.from_rotvec([0, lat, 0]).as_matrix()
    long_axis = Rx @ Ry @ base
    neck = np.array([0.0, -10.0, 80.0]) * s  # canonical mm, below the brainstem
    half_len = float(rng.uniform(1.6, 2.2)) * head_radius
    bc = neck + long_axis * (half_len - 5.0)
    e1 = np.cross([0.0, 1.0, 0.0], long_axis)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(long_axis, e1)
    B = np.stack([e1, e2, long_axis], 1)  # canonical columns
    Mb = B.T @ R.T @ A[:3, :3]
    bb = B.T @ (R.T @ (A[:3, 3] - t) - bc)
    q = Mb.astype(F32) @ idx + bb.astype(F32)[:, None]
    baxes = np.array([0.65, 0.55, 1.0]) * np.array([head_radius, head_radius, half_len])
    d_b = _ellipsoid_d(q, (0, 0, 0), baxes)
    tex2 = (F32(1.0) + F32(0.2) * _smooth_noise(rng, shape, 10)).ravel()
    img = _lerp(img, F32(it["body"]) * tex2, _occ(d_b, w) * o_ut)
    info = dict(uterus_centre=uc.tolist(), uterus_axes=axes.tolist(), wall_mm=wall, fat_mm=fat,
                placenta_mm=pl_mm, placenta_radius_mm=pl_radius, body_half_length_mm=half_len,
                body_flexion_deg=float(np.rad2deg(flex)))
    return img.reshape(shape).astype(F32), info


# -------------------------------------------------------------------------------------------------------- output
def write_bytes(path: Path, data: bytes):
    tmp = path.with_name(f".tmp.{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def preview_png(path, image, label, A, com):
    """Three slices through the brain centre of mass along the voxel axes, brain outline in yellow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.round(np.linalg.solve(A, np.append(com, 1.0))[:3]).astype(int)
    c = np.clip(c, 0, np.asarray(image.shape) - 1)
    sp = np.sqrt((A[:3, :3] ** 2).sum(0))
    fig, ax = plt.subplots(1, 3, figsize=(13, 4.6), dpi=80)
    vmax = np.percentile(image, 99.5)
    for a in range(3):
        sl = np.take(image, c[a], axis=a).T
        lb = np.take(label, c[a], axis=a).T
        h, v = [x for x in range(3) if x != a]
        ax[a].imshow(sl, cmap="gray", vmin=0, vmax=vmax, origin="lower", aspect=sp[v] / sp[h])
        ax[a].contour(lb == 1, [0.5], colors=["yellow"], linewidths=0.7)
        if (lb == 2).any():
            ax[a].contour(lb == 2, [0.5], colors=["cyan"], linewidths=0.7)
        ax[a].set_title(f"voxel axis {a} = {c[a]}")
        ax[a].axis("off")
    fig.suptitle(path.stem)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_SRC = None
_SRC_KEY = None


def _worker_init(members):
    """Prepare the source once per process (kept while the members are the same)."""
    global _SRC, _SRC_KEY
    key = tuple(sha256(members[t]) for t in sorted(members))
    if _SRC is None or key != _SRC_KEY:
        _SRC, _SRC_KEY = Source(members), key


def _one(job):
    out, seed, index, navigator, max_dim, voxel, eyes, previews = job
    image, label, A, R, rot_voxel, com, info = make_volume(_SRC, seed, index, navigator, max_dim, voxel, eyes)
    out = Path(out)
    fid = info["frame_id"]
    write_bytes(out / "images" / f"{fid}.nii.gz", nifti_bytes(image, A, 1))
    write_bytes(out / "labels" / f"{fid}.nii.gz", nifti_bytes(label, A, 1))
    if previews:
        preview_png(out / "previews" / f"{fid}.png", image, label, A, com)
    rx, ry, rz = euler_from_rotation_voxel(rot_voxel)
    row = dict(frame_id=fid, rot_x=rx, rot_y=ry, rot_z=rz, com_r=com[0], com_a=com[1], com_s=com[2],
               ga_weeks=info["ga_weeks"], fold=None, protocol=info["protocol"])
    return row, info


def _run_jobs(jobs, members, workers, results):
    t0 = time.perf_counter()
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(members,)) as ex:
            for r in ex.map(_one, jobs):
                results.append(r)
                print(f"{r[1]['frame_id']}: {r[1]['seconds']:.1f} s", file=sys.stderr)
        return
    _worker_init(members)
    print(f"source prepared in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for job in jobs:
        r = _one(job)
        results.append(r)
        print(f"{r[1]['frame_id']}: {r[1]['seconds']:.1f} s", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Evaluation only: never train or tune on these volumes.")
    p.add_argument("out", help="output folder (images/, labels/, poses.csv, transfer_config.json)")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--navigator", action="store_true", help="~380 mm field of view with ~6 mm voxels, low SNR")
    p.add_argument("--max-dim", type=int, default=160, help="largest grid size per axis (default 160)")
    p.add_argument("--voxel", type=float, help="force isotropic voxels of this size (mm), e.g. for small tests")
    p.add_argument("--no-eyes", action="store_true", help="no face eyes (label 1 only)")
    p.add_argument("--fold", default="test", help="value of the CSV fold column (default test)")
    p.add_argument("--previews", action="store_true", help="write OUT/previews/<id>.png")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--nilearn-wheel", help=f"path to {WHEEL_NAME}")
    p.add_argument("--cache", help="where pip downloads the wheel (default ~/.cache/e3pose/nilearn)")
    p.add_argument("--no-verify", action="store_true", help="accept source files with other sha256")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")
    wheel = find_wheel(a.nilearn_wheel, a.cache)
    members = read_members(wheel, verify=not a.no_verify)
    out = Path(a.out)
    for sub in ("images", "labels") + (("previews",) if a.previews else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(str(out), a.seed, i, a.navigator, a.max_dim, a.voxel, not a.no_eyes, a.previews) for i in range(a.n)]
    results = []
    try:
        _run_jobs(jobs, members, a.workers, results)
    except ValueError as exc:
        print(f"make_transfer_set: {exc}", file=sys.stderr)
        return 2
    rows = []
    for row, _ in results:
        row["fold"] = a.fold
        rows.append(row)
    text = ",".join(CSV_COLUMNS) + "\n" + "".join(format_row(r) + "\n" for r in rows)
    write_bytes(out / "poses.csv", text.encode())
    script = Path(__file__).read_bytes()
    meta = dict(
        generator="Resources/benchmarks/make_transfer_set.py", recipe_version=RECIPE_VERSION,
        purpose="transfer test set (issue 11): evaluation only, never training or tuning",
        seed=a.seed, n=a.n, navigator=a.navigator, max_dim=a.max_dim, voxel=a.voxel, eyes=not a.no_eyes,
        fold=a.fold, script_sha256=sha256(script),
        source=dict(package=f"nilearn=={NILEARN_VERSION}", wheel=WHEEL_NAME, wheel_sha256=sha256(wheel.read_bytes()),
                    members={t: dict(path=MEMBERS[t], sha256=sha256(b)) for t, b in members.items()},
                    template="MNI152 2009a symmetric (ICBM152 nlin sym 09a), 1 mm, brain-extracted T1 + GM/WM maps"),
        conventions=dict(
            canonical="e_x = subject's left = -MNI x, e_y = anterior = +MNI y, e_z = inferior = -MNI z "
                      "(C = diag(-1, 1, -1)); origin = centre of mass of label 1",
            rotation="rot_x, rot_y, rot_z: scipy Rotation.from_euler('xyz', degrees) of R_vc, voxel-axis frame -> "
                     "canonical (rows e_x, e_y, e_z); written with E3PoseLogic.synth.dataset functions",
            com="brain (label 1) centre of mass, world RAS mm", labels="0 background, 1 brain, 2 eyes"),
        recipe=dict(ga_weeks=[20.0, 38.0], brain_ml_table=GA_TABLE, brain_ml_jitter=[0.9, 1.1],
                    shape_factor_log_sd=0.04, deformation=dict(amplitude_fraction_of_brain_length=[0.02, 0.05],
                                                               node_spacing_mm_mni=[45, 70], rigid_part_removed=True),
                    intensity=INTENSITY, shells_mm=dict(csf=[1.5, 4.0], skull=[1.0, 2.5], scalp=[1.5, 3.5]),
                    hull_closing_mm_mni=HULL_CLOSING_MM, eyes_mni=dict(abs_x=EYE_MNI[0], y=EYE_MNI[1],
                                                                        radius=EYE_RADIUS_MNI),
                    face_ellipsoid_mni=dict(centre=FACE_CENTRE_MNI.tolist(), axes=FACE_AXES_MNI.tolist()),
                    grid=dict(standard="fov U(200,320) mm per axis; iso U(1.5,3) mm or p=0.35 in-plane U(1.2,2) "
                                       "x slices U(3,5) mm", navigator="fov U(360,400), iso U(5.5,6.5) mm",
                              oblique_prob=0.5, oblique_deg=[5, 40], mirror_prob=0.2),
                    artefacts=dict(bias_prob=0.9, bias_amplitude=[0.1, 0.3], rician_prob=0.7,
                                   noise_sigma=dict(standard=[0.01, 0.05], navigator=[0.05, 0.12])),
                    partial_volume="box average of sub-samples ~1 mm apart, source pre-blurred (sigma = half the "
                                   "sample step)"),
        total_seconds=time.perf_counter() - t0,
        cases=[info for _, info in results],
    )
    write_bytes(out / "transfer_config.json", (json.dumps(meta, indent=1) + "\n").encode())
    print(f"wrote {len(rows)} volumes to {out} in {meta['total_seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
