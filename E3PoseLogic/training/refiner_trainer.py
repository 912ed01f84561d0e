"""Training of the refinement network (``networks.sagittal``) from annotated volumes.

Each training volume is resampled once into a cube aligned with its known canonical frame (``refine.local_cube``);
samples are then drawn on the fly: a mirror plane tilted and shifted by the errors the plane search makes, a random
angle within the plane and a random side (so the network must find e_y and e_z from the anatomy and their
handedness), a random smooth warp and scale of the anatomy, and a random contrast: a random intensity curve (any
tissue order, inverted contrast included), bias field, blur and noise. The aim is the mid-sagittal anatomy of any
head, not the look of one generator.
"""
from __future__ import annotations


import numpy as np

from .. import frames
from ..refine import equivalent_radius, local_cube, sample_slabs, slab_basis, slab_points


def prepare_cubes(images, labels, truth, cfg, rng, centre_sd_mm=3.0, progress=None):
    """[(cube, spacing, radius, centre error)] in the canonical frame of each annotated volume (label 1 = brain).

    The cube is centred ``centre error`` (canonical mm, drawn with ``centre_sd_mm``, like the U-Net's) away from the
    true brain centre of mass, which the network learns to point at.
    """
    from ..volume_io import load_volume, volume_name

    out = []
    for img_path in images:
        fid = volume_name(img_path)
        if fid not in truth:
            continue
        arr, aff = load_volume(img_path)
        lab, laff = load_volume(labels[fid])
        brain = np.asarray(lab) == 1
        if not brain.any():
            continue
        err = rng.normal(0.0, centre_sd_mm, 3)
        cube, sp, radius = canonical_cube(arr, aff, brain, laff, truth[fid]["rotation_voxel"], cfg, err)
        out.append((cube, sp, radius, err))
        if progress:
            progress()
    return out


def canonical_cube(array, ijk_to_ras, brain, brain_ijk_to_ras, rotation_voxel, cfg, err):
    """(cube, spacing, radius) of one annotated volume: ``refine.local_cube`` in its canonical frame about the brain
    centre of mass moved by ``err`` (canonical mm). Also what the GPU trainer makes of a phantom in memory
    (``Resources/training/gpu_residual_stream.py``), so both train on the same cubes."""
    from ..rotation import world_rotation

    brain_ml = float(np.count_nonzero(brain)) * float(np.prod(frames.voxel_sizes(brain_ijk_to_ras))) / 1000.0
    com = frames.apply(brain_ijk_to_ras, np.array(np.nonzero(brain)).mean(1))
    rot = world_rotation(rotation_voxel, frames.direction_cosines(ijk_to_ras))
    radius = equivalent_radius(brain_ml)
    cube, sp = local_cube(array, ijk_to_ras, com + rot @ np.asarray(err, np.float64), rot, radius, cfg)
    return cube, sp, radius


def _rot_about(axis, angle):
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.asarray(axis, float) / np.linalg.norm(axis) * angle).as_matrix()


def wrong_plane_normal(rng, min_deg=20.0, tilt_sd_deg=10.0):
    """A plane normal at least ``min_deg`` from e_x: half of them near e_y or e_z (the coronal and axial planes,
    the mirror search's usual wrong answers), the rest anywhere."""
    x = np.array([1.0, 0.0, 0.0])
    while True:
        if rng.random() < 0.5:
            axis = np.eye(3)[1 + int(rng.integers(2))]
            n = _rot_about(np.cross(axis, rng.normal(size=3)), np.radians(rng.normal(0.0, tilt_sd_deg))) @ axis
        else:
            n = rng.normal(size=3)
            n /= np.linalg.norm(n)
        if np.degrees(np.arccos(min(1.0, abs(float(n @ x))))) >= min_deg:
            return n


def slab_radius(radius, rng, scale_sd=0.08, scale_range=None):
    """The radius a training slab is scaled by (see ``draw_sample``)."""
    if scale_range is not None and rng.random() < 0.5:
        return radius * float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
    return radius * float(np.exp(rng.normal(0.0, scale_sd)))


def draw_sample(cube, sp, radius, err, cfg, rng, tilt_sd_deg=4.0, offset_sd_mm=1.5, shift_sd_mm=2.0, warp_sd=0.04,
                scale_sd=0.08, wrong_plane=False, scale_range=None):
    """One training slab [C, S, S] and its target [6]: e_y, e_z and the brain centre, in slab coordinates.

    The slabs are scaled by a radius near the true one (log-normal, ``scale_sd``); with ``scale_range`` (lo, hi), half
    of them anywhere from lo to hi times it instead (log-uniform): the refinement scales its slabs by the U-Net's
    brain volume, which on real anatomy is often too small (transfer set: 64 % of the true volume in the median),
    and the other half keeps the precision where the volume is right.

    ``wrong_plane``: the slabs lie along a plane that is not the mid-sagittal one (``wrong_plane_normal``), a
    negative for the plane logit; its e_y, e_z targets are then the axes' projections and are not trained on.
    """
    from scipy import ndimage

    x = np.array([1.0, 0.0, 0.0])
    tangent = np.cross(x, rng.normal(size=3))
    n = wrong_plane_normal(rng) if wrong_plane else \
        _rot_about(tangent, np.radians(rng.normal(0.0, tilt_sd_deg))) @ x
    if rng.random() < 0.5:
        n = -n
    u, v = slab_basis(n)
    turn = _rot_about(n, rng.uniform(0.0, 2.0 * np.pi))
    u, v = turn @ u, turn @ v
    r = slab_radius(radius, rng, scale_sd, scale_range)
    warp = None
    if warp_sd > 0:
        coarse = rng.normal(0.0, warp_sd * r, size=(2, 4, 4))
        warp = np.stack([ndimage.zoom(c, cfg.size / 4.0, order=1) for c in coarse])
    shift = rng.normal(0.0, shift_sd_mm, 2)
    pts = slab_points(n, rng.normal(0.0, offset_sd_mm), u, v, r, cfg, warp) + shift[0] * u + shift[1] * v
    slab = sample_slabs(cube, sp, pts)
    target = []
    for axis in (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])):
        t = np.array([axis @ u, axis @ v])
        target.append(t / max(np.linalg.norm(t), 1e-9))
    to_com = -np.asarray(err) - (shift[0] * u + shift[1] * v)  # slab centre -> true centre, cube mm
    target.append(np.array([to_com @ u, to_com @ v]) / r)
    return slab, np.concatenate(target).astype(np.float32)


def contrast_curve(x, rng):
    """Any tissue contrast: a random monotone-or-not intensity curve (half the time), inverted (15 %) or the
    original, then a random power; shared by the refinement and residual trainers."""
    x = np.clip(x, 0.0, 1.5)
    p = rng.random()
    if p < 0.5:
        knots = np.linspace(0.0, 1.5, 7)
        x = np.interp(x, knots, rng.uniform(0.0, 1.0, size=7))
    elif p < 0.65:
        x = 1.5 - x
    return np.abs(x) ** float(np.exp(rng.normal(0.0, 0.3)))


def random_contrast(slab, rng):
    """Any tissue contrast (``contrast_curve``), then bias field, blur and noise; rescaled so the 99th percentile
    is 1."""
    from scipy import ndimage

    x = contrast_curve(slab, rng)
    s = x.shape[-1]
    bias = ndimage.zoom(rng.normal(0.0, 0.25, size=(3, 3)), s / 3.0, order=1)[:s, :s]
    x = x * np.exp(bias)[None]
    if rng.random() < 0.4:
        x = ndimage.gaussian_filter(x, (0, rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)))
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.06), size=x.shape)
    q = np.percentile(x, 99)
    return (x / q if q > 0 else x).astype(np.float32)


def init_from(net, path):
    """Start from a trained refinement network: every weight whose shape matches, and the first rows of an output
    layer that gained the plane logit (its new row keeps its fresh initialisation)."""
    from ..checkpoints import load_refiner

    return copy_matching_weights(net, load_refiner(path)[0].state_dict())


def copy_matching_weights(net, src):
    """Copy into ``net`` every weight of the state dict ``src`` whose shape matches, and the first rows of an output
    layer that has more rows in ``net`` (a new output keeps its fresh initialisation)."""
    import torch

    dst = net.state_dict()
    with torch.no_grad():
        for k, v in dst.items():
            if k not in src:
                continue
            w = src[k]
            if w.shape == v.shape:
                v.copy_(w)
            elif w.dim() >= 1 and w.shape[1:] == v.shape[1:] and w.shape[0] < v.shape[0]:
                v[: w.shape[0]].copy_(w)
    return net


PLANE_LOSS_WEIGHT = 1.0  # binary cross-entropy of the plane logit, next to the regression loss (about 1 at start)


def train(cubes, out_dir, cfg, minutes, seed=0, batch=32, lr=1e-3, resume=None, log=print, provenance=None,
          max_steps=None, init=None, wrong_plane_fraction=0.5, scale_range=None):
    """Adam on the squared error of the unit targets; checkpoint (native 'refiner') every few minutes.

    The learning rate is cosine-annealed over ``max_steps`` when given (reproducible), else over the time budget.
    With ``cfg.plane_logit``, a share ``wrong_plane_fraction`` of each batch is slabs along wrong planes: they train
    the plane logit only (binary cross-entropy), the mid-sagittal ones train everything. ``init``: a refinement
    checkpoint to start from (``init_from``). ``scale_range``: see ``draw_sample``.
    """
    import torch

    from ..networks.sagittal import SagittalNet
    from . import step_loop

    torch.manual_seed(seed)
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0, 4.0])  # centre in radii: 0.5 radius ~ 17 mm weighs like 1 unit
    net = SagittalNet(cfg)
    if init is not None:
        init_from(net, init)
    n_wrong = int(round(batch * wrong_plane_fraction)) if cfg.plane_logit else 0

    def draw_one(cube, i, rng):
        slab, target = draw_sample(*cube, cfg, rng, wrong_plane=i < n_wrong, scale_range=scale_range)
        return random_contrast(slab, rng), target

    def draw_batch(rng):
        x, y = step_loop.draw_stack(cubes, batch, rng, draw_one)
        return torch.from_numpy(x), torch.from_numpy(y)

    def loss_of(out, y):
        loss = ((out[n_wrong:, :6] - y[n_wrong:]) ** 2 * weights).sum(1).mean()
        if cfg.plane_logit:
            label = torch.cat([torch.zeros(n_wrong), torch.ones(batch - n_wrong)])
            loss = loss + PLANE_LOSS_WEIGHT * torch.nn.functional.binary_cross_entropy_with_logits(out[:, 6], label)
        return loss, {}

    provenance = dict(provenance or {}, batch_size=batch, n_volumes=len(cubes), init=str(init) if init else None,
                      wrong_plane_fraction=n_wrong / batch,
                      scale_range=list(scale_range) if scale_range is not None else None)
    return step_loop.train(net, "refiner", out_dir, draw_batch, loss_of, minutes=minutes, seed=seed, lr=lr,
                           provenance=provenance, max_steps=max_steps, resume=resume, log=log, log_every=200)
