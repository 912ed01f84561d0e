"""``e3pose train-e3cnn``: the equivariant rotation network on crops built from the ground-truth brain mask.

Each volume goes through ``preprocess.unet_input`` (the grid of the U-Net it will be paired with: ``--unet-size``,
``--unet-spacing``) and ``crop.crop_for_e3cnn`` with the true brain mask, exactly as inference does with the
predicted mask. New models use parity-exact pooling unless ``--published-pooling``.

``--arch standard`` trains the non-equivariant baseline (``networks.standard_cnn``) on the same data, crops,
augmentation and schedule; it has no per-voxel output, so its loss is the geodesic one. ``--pose-range DEG`` (either
architecture) turns every training crop to a pose within DEG (Euler angles per axis) of the reference orientation
(``data.pose_in_range``) instead of rotating it relative to its own pose; validation then reports both the
validation cases turned into that range (``val_loss``, ``val_median_rot_deg``, ...: the training distribution, which
picks ``best.pt``) and the cases at their own poses (``val_any_pose_*``). ``--centre-jitter`` and
``--scale-jitter`` (cube crops) place every training crop as an imperfect U-Net mask would (``data.CropJitter``);
validation then reports a fixed jittered draw (``val_*``, which picks ``best.pt``) and the exact crops
(``val_exact_*``).
"""
from __future__ import annotations

import contextlib

import sys

import numpy as np
import torch

from ..networks.config import E3CNNConfig
from ..networks.e3cnn import E3CNN
from ..networks.standard_cnn import StandardCNN, StandardCNNConfig
from . import data
from .common import base_provenance
from .losses import frame_geodesic_loss, geodesic_loss, no_autocast, rotation_errors_deg, voxel_axes_loss


# the validation cases turned into --pose-range: a fixed draw, the same for every run and training seed
POSE_RANGE_VAL_SEED = 20_260_417
# the validation crops moved by the crop jitter: a fixed draw as well
JITTER_VAL_SEED = 20_261_202


def crop_jitter_of(args) -> "data.CropJitter":
    unet = getattr(args, "unet_crops", None)
    return data.CropJitter(float(getattr(args, "centre_jitter", 0.0) or 0.0),
                           float(getattr(args, "scale_jitter", 0.0) or 0.0),
                           float(getattr(args, "unet_crop_fraction", 0.5)) if unet else 0.0,
                           str(unet) if unet else None)


def arch_of(args):
    return getattr(args, "arch", "e3cnn") or "e3cnn"


def resolve_loss(args):
    """--loss default: axes (published) for the E3-CNN, geodesic for the standard CNN, which has no unpooled map
    for the per-voxel loss (asking for that is an error)."""
    loss = getattr(args, "loss", None)
    if arch_of(args) == "standard":
        if loss == "axes":
            raise ValueError("--loss axes supervises the unpooled per-voxel map, which the standard CNN does not "
                             "have: use --loss geodesic (the default for --arch standard)")
        return "geodesic"
    return loss or "axes"


class Objective:
    """What one architecture and --loss train and validate on (``E3CNNTask.objective``).

    ``pool``: the training forward returns the pooled head (else the unpooled per-voxel map), and ``loss`` takes
    that output; ``outputs`` gives both for validation (an unwrapped model); ``float32``: the forward runs outside
    --amp's autocast.
    """

    def __init__(self, description, pool, loss, outputs, float32=True):
        self.description, self.pool, self.float32 = description, pool, float32
        self._loss, self._outputs = loss, outputs

    def loss(self, out, r):
        return self._loss(out, r)

    def train_loss(self, net, x, r):
        return self._loss(net(x, pool=self.pool), r)

    def outputs(self, model, x):
        """(unpooled map or None, pooled head) of one forward."""
        return self._outputs(model, x)

    def validation_loss(self, unpooled, pooled, r):
        return self._loss(pooled if self.pool else unpooled, r)


def _e3cnn_outputs(model, x):
    unpooled = model(x, pool=False)
    return unpooled, model.net.pool(unpooled).flatten(1)


OBJECTIVES = {
    "standard": Objective("geodesic (Gram-Schmidt frame of the 6D head, as is)", True,
                          frame_geodesic_loss,
                          lambda model, x: (None, model(x, pool=True).float()), float32=False),
    "geodesic": Objective("geodesic (pooled)", True, geodesic_loss, _e3cnn_outputs),
    "axes": Objective("0.5 |p x e_x| + |a - e_y| + |b - e_z| per voxel (unpooled)", False, voxel_axes_loss,
                      _e3cnn_outputs),
}


class E3CNNTask:
    kind = "e3cnn"  # class defaults (the E3-CNN); __init__ sets them per --arch
    title = "E3-CNN training"
    find_unused = True
    arch = "e3cnn"
    metric_keys = ("val_median_rot_deg", "val_p95_rot_deg")

    def __init__(self, args, train_cache, val_cache, trained_on):
        self.args = args
        args.loss = resolve_loss(args)
        self.arch = arch_of(args)
        if self.arch == "standard":
            self.cfg = StandardCNNConfig(n_downsample=args.n_downsample, width=getattr(args, "width", 6),
                                         n_conv=getattr(args, "n_conv", 2), norm=getattr(args, "norm", "instance"),
                                         crop_size=args.crop_size, crop_shape=crop_shape_of(args))
            self.model = StandardCNN(self.cfg)
            self.kind, self.title, self.find_unused = "standard_cnn", "standard CNN training", False
        else:
            self.cfg = E3CNNConfig(n_downsample=args.n_downsample, mult=args.mult, lmax=args.lmax,
                                   crop_size=args.crop_size, crop_shape=crop_shape_of(args),
                                   parity_exact_pool=not args.published_pooling)
            self.model = E3CNN(self.cfg)
            # find_unused: the published zero-size bias never receives a gradient
            self.kind, self.title, self.find_unused = "e3cnn", "E3-CNN training", True
        self.jitter = crop_jitter_of(args)
        self.val_jittered = None
        if self.jitter.active:  # GridCase caches: validate on a fixed jittered draw and on the exact crops
            self.val_jittered = [data.jittered_crop(c, np.random.default_rng([JITTER_VAL_SEED, i]), self.jitter)
                                 for i, c in enumerate(val_cache)]
            val_cache = [data.jittered_crop(c) for c in val_cache]
        self.train_cache, self.val_cache, self.trained_on = train_cache, val_cache, trained_on
        self.pose_range = getattr(args, "pose_range", None)
        self.val_in_range = None
        if self.pose_range is not None and self.jitter.active:
            raise ValueError("--pose-range and the crop jitter (--centre-jitter, --scale-jitter) do not combine")
        if self.val_jittered is not None:
            self.metric_keys = self.metric_keys + ("val_exact_median_rot_deg",)
        if self.pose_range is not None:
            self.val_in_range = [data.pose_in_range(c, np.random.default_rng([POSE_RANGE_VAL_SEED, i]),
                                                    self.pose_range) for i, c in enumerate(val_cache)]
            self.metric_keys = self.metric_keys + ("val_any_pose_median_rot_deg",)

    def train_dataset(self, n_items, rank, world):
        aug = not self.args.no_augment
        rot = self.args.rotation_deg if aug else 0.0
        intensity = aug and not getattr(self.args, "no_intensity_augment", False)
        pose_range, jitter = self.pose_range, self.jitter

        def make(case, rng):
            if jitter.active:
                case = data.jittered_crop(case, rng, jitter)
            return data.augment_crop(case, rng, rot, intensity=intensity, pose_range=pose_range)

        return data.DrawDataset(self.train_cache, n_items, make, self.args.seed, rank, world)

    @staticmethod
    def collate(batch):
        """A list of (x [1, 1, X, Y, Z], R_target [1, 3, 3]): crops clipped at the field-of-view edge are not
        cubic, so a batch is only stacked when all shapes agree (see ``_groups``)."""
        return [(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None],
                 torch.as_tensor(np.asarray(r), dtype=torch.float32)[None]) for x, r in batch]

    @staticmethod
    def _groups(batch):
        """Stack samples of equal shape (one forward each group); the network is per-sample (instance norm)."""
        groups = {}
        for x, r in batch:
            groups.setdefault(tuple(x.shape), []).append((x, r))
        return [(torch.cat([x for x, _ in g]), torch.cat([r for _, r in g])) for g in groups.values()]

    @property
    def objective(self) -> Objective:
        return OBJECTIVES["standard" if self.arch == "standard" else self.args.loss]

    def _loss(self, net, x, r):
        # The E3-CNN always runs in float32, also under --amp: in bf16 its norm-based gates and normalisation gave
        # non-finite outputs within a few steps (seen in this project's tests). --amp still speeds up the U-Net
        # and the standard CNN (whose rotation maths, in the loss, is float32 regardless).
        with no_autocast(x) if self.objective.float32 else contextlib.nullcontext():
            return self.objective.train_loss(net, x, r)

    def train_loss(self, net, batch, device):
        total, n = 0.0, 0
        for x, r in self._groups(batch):
            x, r = x.to(device, non_blocking=True), r.to(device, non_blocking=True)
            total = total + self._loss(net, x, r) * len(x)
            n += len(x)
        return total / n

    def _validate_cases(self, model, device, cases, prefix):
        losses, errors = [], []
        for case in cases:
            x = torch.from_numpy(np.ascontiguousarray(case.x, np.float32))[None, None].to(device)
            r = torch.as_tensor(case.r_vc, dtype=torch.float32)[None].to(device)
            with no_autocast(x):  # float32, as in training
                unpooled, pooled = self.objective.outputs(model, x)
            losses.append(float(self.objective.validation_loss(unpooled, pooled, r)))
            errors.append(float(rotation_errors_deg(pooled, r)[0]))
        e = np.asarray(errors) if errors else np.array([np.nan])
        return {f"{prefix}loss": float(np.mean(losses)) if losses else float("nan"),
                f"{prefix}median_rot_deg": float(np.median(e)), f"{prefix}p95_rot_deg": float(np.percentile(e, 95)),
                f"{prefix}success_10deg": float(np.mean(e <= 10)), f"{prefix}success_30deg": float(np.mean(e <= 30))}

    def validate(self, model, device):
        """Loss (the training loss, unaugmented) and geodesic error of the pooled prediction, in degrees. With
        --pose-range: on the validation cases turned into the range (the training distribution), and, as
        ``val_any_pose_*``, on the cases at their own poses."""
        if self.val_jittered is not None:
            return {**self._validate_cases(model, device, self.val_jittered, "val_"),
                    **self._validate_cases(model, device, self.val_cache, "val_exact_")}
        if self.val_in_range is None:
            return self._validate_cases(model, device, self.val_cache, "val_")
        return {**self._validate_cases(model, device, self.val_in_range, "val_"),
                **self._validate_cases(model, device, self.val_cache, "val_any_pose_")}

    def provenance(self, args, epochs_done, elapsed_s, device, best_epoch, best_row):
        return base_provenance(args, self.kind, self.trained_on, len(self.train_cache), len(self.val_cache),
                               epochs_done, elapsed_s, device, best_epoch, best_row, extra={
                                   "arch": self.arch, "equivariant": self.arch != "standard",
                                   "loss": self.objective.description,
                                   "augmentation": data.augmentation_record(args, data.E3CNN_AUG),
                                   "pose_range_deg": None if self.pose_range is None else float(self.pose_range),
                                   "crop_jitter": self.jitter.to_dict() if self.jitter.active else None,
                                   "rotation_sampling": (
                                       "none" if args.no_augment else
                                       f"training poses drawn within +-{self.pose_range:g} deg (Euler angles per "
                                       "axis) of the reference orientation; --rotation-deg unused; validation "
                                       "metrics on the validation cases turned into that range (fixed draw), "
                                       "val_any_pose_* at their own poses"
                                       if self.pose_range is not None else
                                       f"each crop rotated relative to its own pose, Euler angles U(+-"
                                       f"{args.rotation_deg:g}) per axis (>= 180: uniform over SO(3))"),
                                   "annotations": str(args.annotations),
                                   "unet_grid": {"size": args.unet_size, "spacing_mm": args.unet_spacing},
                               })


def crop_shape_of(args) -> str:
    return getattr(args, "crop_shape", "box")


def check_unet_crops(args) -> str:
    """--unet-crops must name a U-Net on the grid the crops are cut from (else its masks would be on another grid)."""
    path = getattr(args, "unet_crops", None)
    if not path:
        return ""
    if not 0.0 < float(args.unet_crop_fraction) <= 1.0:
        return "--unet-crop-fraction must be in (0, 1]"
    from ..checkpoints import load_unet

    try:
        _, info = load_unet(path)
    except Exception as exc:  # the loader's own message names the problem
        return f"--unet-crops {path}: {exc}"
    cfg = info.get("config") or {}
    size, spacing = cfg.get("input_size"), cfg.get("spacing_mm")
    if size != args.unet_size or spacing is None or abs(float(spacing) - float(args.unet_spacing)) > 1e-6:
        return (f"--unet-crops {path}: that U-Net works on a {size}^3 grid at {spacing} mm, but this run cuts its "
                f"crops from {args.unet_size}^3 at {args.unet_spacing} mm (--unet-size, --unet-spacing)")
    return ""


def run(args) -> int:
    from .common import start_run, train_and_report

    ann = data.read_annotations(args.annotations)
    dist, trained_on, train_cases, val_cases = start_run(args)
    if dist.main:
        name = "standard CNN" if arch_of(args) == "standard" else "E3-CNN"
        print(f"{name}: {len(train_cases)} training, {len(val_cases)} validation cases; U-Net grid "
              f"{args.unet_size}^3 at {args.unet_spacing} mm, crop {args.crop_size} ({crop_shape_of(args)}); trained_on: {trained_on}",
              file=sys.stderr)
    prep = (args.unet_spacing, args.unet_size, E3CNNConfig().crop_scale, args.crop_size, crop_shape_of(args))
    problem = check_unet_crops(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # one progress bar in a torchrun job: rank 0's
    jitter = crop_jitter_of(args)
    train_cache = data.cache_e3cnn(train_cases, ann, *prep, workers=args.prep_workers, desc="train data",
                                   progress=dist.main, jitter=jitter)
    val_cache = data.cache_e3cnn(val_cases, ann, *prep, workers=args.prep_workers, desc="val data",
                                 jitter=jitter) if dist.main else []
    if not train_cache:
        print("error: no usable training case (check the annotation CSV frame_ids)", file=sys.stderr)
        return 2
    task = E3CNNTask(args, train_cache, val_cache, trained_on)
    return train_and_report(task, args, dist, len(train_cache), len(val_cache),
                            lambda best: f"median rotation error {best['val_median_rot_deg']:.1f} deg")
