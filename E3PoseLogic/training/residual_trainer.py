"""Training of the residual network (``networks.residual``) from annotated volumes.

Each training volume is resampled once into a cube aligned with its known canonical frame, wider and finer than the
network's input (``TRAIN_CUBE``). Samples are then drawn on the fly: the input cube seen from a frame turned by a
random residual rotation (mostly within 10 degrees, a share up to 45, the errors the plane fit makes), shifted and
scaled by the errors of the brain centre and size, warped, mirrored left-right half of the time (a mirrored head is
still a head), and given a random contrast (any tissue order, bias field, blur, noise): the aim is the anatomy of
any head, not the look of one generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..residual import CENTRE_UNIT, ROTVEC_UNIT, input_ball, normalise_input


@dataclass
class _CubeGeometry:  # what refine.local_cube reads
    cube_side: float = 4.4  # radii: the input ball (1.6 radii) turned, shifted and scaled stays inside
    cube_voxels_per_radius: float = 16.0


TRAIN_CUBE = _CubeGeometry()


def train_cube(cfg=None):
    """The training cube for a network input ``cfg.fov`` radii wide: 1.375 fov wide (the input ball turned, shifted
    and scaled stays inside), about 70 voxels a side whatever the fov (``TRAIN_CUBE`` for the default 3.2)."""
    if cfg is None or cfg.fov == 3.2:
        return TRAIN_CUBE
    return _CubeGeometry(cube_side=1.375 * cfg.fov, cube_voxels_per_radius=16.0 * 3.2 / cfg.fov)


def prepare(images, labels, truth, rng, progress=None, cfg=None):
    """[(cube, spacing, radius, centre error)]: see ``refiner_trainer.prepare_cubes``."""
    from .refiner_trainer import prepare_cubes

    return prepare_cubes(images, labels, truth, train_cube(cfg), rng, centre_sd_mm=2.0, progress=progress)


def random_rotvec(rng, small_sd_deg=8.0, large_deg=45.0, large_fraction=0.4):
    """A residual rotation vector (rad): |N(0, sd)| or, for a share, uniform up to ``large_deg``; uniform axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    if rng.random() < large_fraction:
        angle = rng.uniform(0.0, large_deg)
    else:
        angle = abs(rng.normal(0.0, small_sd_deg))
    return axis * np.radians(angle)


def wrong_rotation(rng, min_deg=60.0):
    """A frame far from the head's: half a turn about a canonical axis (within about 10 deg; the symmetric mistakes),
    or any rotation of at least ``min_deg``."""
    from scipy.spatial.transform import Rotation

    if rng.random() < 0.5:
        flip = Rotation.from_rotvec(np.pi * np.eye(3)[int(rng.integers(3))])
        return (flip * Rotation.from_rotvec(np.radians(rng.normal(0.0, 6.0, 3)))).as_rotvec()
    while True:
        r = Rotation.random(random_state=int(rng.integers(2 ** 31)))
        if r.magnitude() >= np.radians(min_deg):
            return r.as_rotvec()


def draw_sample(cube, sp, radius, err, cfg, rng, shift_sd_mm=2.0, scale_sd=0.1, warp_sd=0.03, wrong=False):
    """One input cube [S, S, S] and its target [6] (rotation vector and centre step, network units).

    The input at estimated-frame point p is the canonical cube at q = D p + s (D the residual, s a shift), so the
    truth is R_true = R_est D^T and the brain centre is at D^T (-err - s) from the input's centre. ``wrong``: D is
    far from identity (``wrong_rotation``), a negative for the pose logit (its other targets are not trained on).
    """
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    s_in = cfg.size
    rotvec = wrong_rotation(rng) if wrong else random_rotvec(rng)
    d = Rotation.from_rotvec(rotvec).as_matrix()
    r_est = radius * float(np.exp(rng.normal(0.0, scale_sd)))
    step = cfg.fov * r_est / s_in
    t = (np.arange(s_in) - (s_in - 1) / 2.0) * step
    p = np.stack(np.meshgrid(t, t, t, indexing="ij"), -1)
    if warp_sd > 0:
        coarse = rng.normal(0.0, warp_sd * radius, size=(3, 4, 4, 4))
        p = p + np.stack([ndimage.zoom(c, s_in / 4.0, order=1) for c in coarse], -1)
    shift = rng.normal(0.0, shift_sd_mm, 3)
    q = p.reshape(-1, 3) @ d.T + shift
    c = (cube.shape[0] - 1) / 2.0
    x = ndimage.map_coordinates(cube, (q / sp + c).T, order=1, mode="constant", cval=0.0).reshape(s_in, s_in, s_in)
    centre = d.T @ (-np.asarray(err) - shift) / r_est
    if rng.random() < 0.5:  # mirrored left-right: D -> M D M (a pseudovector: rotvec -> (x, -y, -z)), centre -> M c
        x = x[::-1]
        rotvec = rotvec * np.array([1.0, -1.0, -1.0])
        centre = centre * np.array([-1.0, 1.0, 1.0])
    target = np.concatenate([rotvec / ROTVEC_UNIT, centre / CENTRE_UNIT]).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), target


def random_contrast(x, rng, ball):
    """Any tissue contrast (a random intensity curve, inverted, or the original), a power, a bias field, blur and
    noise; the 99th percentile in the ball is 1, outside the ball 0."""
    from scipy import ndimage

    from .refiner_trainer import contrast_curve

    x = contrast_curve(x, rng)
    s = x.shape[0]
    bias = ndimage.zoom(rng.normal(0.0, 0.25, size=(3, 3, 3)), s / 3.0, order=1)[:s, :s, :s]
    x = x * np.exp(bias)
    if rng.random() < 0.4:
        x = ndimage.gaussian_filter(x, rng.uniform(0.3, 1.5, size=3))
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.08), size=x.shape)
    return normalise_input(x, ball)


def init_from(net, path):
    """Start from a trained residual network: every weight whose shape matches, and the first rows of an output
    layer that gained the pose logit."""
    from ..checkpoints import load_residual
    from .refiner_trainer import copy_matching_weights

    return copy_matching_weights(net, load_residual(path)[0].state_dict())


WRONG_FRACTION = 0.25  # of each batch, with the pose logit: frames far from the head's


def train(cubes, out_dir, cfg, minutes, seed=0, batch=32, lr=1e-3, resume=None, log=print, provenance=None,
          max_steps=None, init=None):
    """Adam on the smooth-L1 error of the targets (+ the pose logit's cross-entropy, ``cfg.pose_logit``); checkpoint
    (native 'residual') every two minutes; cosine-annealed learning rate over ``max_steps`` when given
    (reproducible), else over the time budget. ``init``: a residual checkpoint to start from (``init_from``)."""
    import torch

    from ..networks.residual import ResidualNet
    from . import step_loop

    torch.manual_seed(seed)
    ball = input_ball(cfg)
    net = ResidualNet(cfg)
    if init is not None:
        init_from(net, init)
    n_wrong = int(round(batch * WRONG_FRACTION)) if cfg.pose_logit else 0

    def draw_one(cube, i, rng):
        x, y = draw_sample(*cube, cfg, rng, wrong=i < n_wrong)
        return random_contrast(x, rng, ball), y

    def draw_batch(rng):
        x, y = step_loop.draw_stack(cubes, batch, rng, draw_one)
        return torch.from_numpy(x)[:, None], torch.from_numpy(y)

    def loss_of(out, y):
        loss = torch.nn.functional.smooth_l1_loss(out[n_wrong:, :6], y[n_wrong:])
        if cfg.pose_logit:
            label = torch.cat([torch.zeros(n_wrong), torch.ones(batch - n_wrong)])
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out[:, 6], label)
        # residual left, in degrees, if the prediction were applied (small-angle: the rotation vectors' difference)
        left = np.degrees(ROTVEC_UNIT * (out[n_wrong:, :3] - y[n_wrong:, :3]).detach().norm(dim=1).median())
        return loss, {"median_residual_deg": float(left)}

    provenance = dict(provenance or {}, batch_size=batch, n_volumes=len(cubes), init=str(init) if init else None,
                      wrong_fraction=n_wrong / batch)
    return step_loop.train(net, "residual", out_dir, draw_batch, loss_of, minutes=minutes, seed=seed, lr=lr,
                           provenance=provenance, max_steps=max_steps, resume=resume, log=log, log_every=100,
                           describe=lambda m: f" residual {m['median_residual_deg']:.1f} deg")
