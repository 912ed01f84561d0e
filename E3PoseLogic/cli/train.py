"""``e3pose train-unet`` and ``e3pose train-e3cnn``: train the two networks on the published data layout.

Light at import time: the trainers (torch, e3nn) are imported when a command runs.
"""
from __future__ import annotations

import argparse


def _common(p, unet_defaults):
    """-> the "training" argument group (for options of one trainer only)."""
    g = training = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100, help="number of epochs (default 100)")
    g.add_argument("--steps-per-epoch", type=int, default=100,
                   help="optimiser steps per epoch; each step draws --batch-size random augmented cases (default 100)")
    g.add_argument("--batch-size", type=int, default=unet_defaults["batch"], help="cases per step (per process)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=unet_defaults["optimizer"],
                   help=f"default {unet_defaults['optimizer']} (published)")
    g.add_argument("--lr", type=float, default=unet_defaults["lr"], help=f"learning rate (default {unet_defaults['lr']})")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant (default, published) or cosine annealing to 0 over --epochs")
    g.add_argument("--weight-decay", type=float, default=unet_defaults["wd"])
    g.add_argument("--clip-grad", type=float, default=10.0, help="gradient-norm clipping (default 10)")
    g.add_argument("--rotation-deg", type=float, default=180.0,
                   help="rotation augmentation: Euler angles U(+-DEG) per axis; 180 (default) = uniform over SO(3); "
                        "0 = none")
    g.add_argument("--no-augment", action="store_true",
                   help="no augmentation at all (rotation and intensity): for debugging and overfitting checks")
    g.add_argument("--no-intensity-augment", action="store_true",
                   help="rotations only (--rotation-deg or --pose-range), the intensity chain off: on a CPU budget "
                        "the chain kept the E3-CNN at chance (the bundled E3-CNN trained with --no-augment)")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, draws, augmentation)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--amp", action="store_true", help="mixed precision on GPU (bf16 autocast, fp16 if no bf16)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes for augmentation")
    g.add_argument("--prep-workers", type=int, default=1, help="processes for the one-off preprocessing")
    g.add_argument("--resume", action="store_true", help="continue from OUTDIR/last.pt (same options)")
    g.add_argument("--init", metavar="CKPT",
                   help="start from the weights of this checkpoint (native or published, same architecture "
                        "options): fine-tune the bundled model on your own data")
    g.add_argument("--time-limit", type=float, metavar="MIN", help="stop after the epoch that passes MIN minutes")
    g.add_argument("--max-cases", type=int, help="use only the first N training cases")
    g.add_argument("--max-val", type=int, help="use only the first N validation cases")
    g.add_argument("--trained-on", metavar="TEXT",
                   help="training-data description stored in the checkpoints (default: detected; 'synthetic ...' "
                        "for e3pose synth data)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("U-Net grid (the inference preprocessing)")
    g.add_argument("--unet-size", type=int, default=128, help="U-Net grid side in voxels (default 128)")
    g.add_argument("--unet-spacing", type=float, default=3.0, help="U-Net grid spacing in mm (default 3)")
    return training


def register(subparsers) -> None:
    desc = ("Data: IMG_DIR/<id>.nii[.gz] and LAB_DIR/<id>.nii[.gz] with the same names (labels 0 background, "
            "1 brain, 2 eyes), any grid: every volume is preprocessed exactly as at inference. Writes OUTDIR/best.pt "
            "(lowest validation loss; train-unet: or --select dice), last.pt (for --resume), metrics.csv, learning_curve.png, train_config.json. "
            "Several GPUs: torchrun --nproc_per_node N -m E3PoseLogic train-... (DistributedDataParallel).")
    p = subparsers.add_parser("train-unet", help="train the segmentation U-Net (brain, eyes)",
                              description="Train the segmentation U-Net. " + desc)
    for name in ("train_img", "train_lab", "val_img", "val_lab"):
        p.add_argument(name, help=name.replace("_", " ").replace("img", "images folder").replace("lab", "labels folder"))
    p.add_argument("outdir", help="output folder")
    training = _common(p, dict(batch=4, optimizer="adam", lr=1e-4, wd=0.0))
    training.add_argument(
        "--select", choices=("loss", "dice"), default="loss",
        help="which epoch becomes best.pt: loss (default: lowest validation loss) or dice (highest validation brain "
             "Dice; for runs with the intensity chain, whose loss on clean validation volumes can rise while the "
             "masks improve)")
    g = p.add_argument_group("architecture")
    g.add_argument("--n-feat", type=int, default=16, help="features at the first level (default 16)")
    g.add_argument("--bn-recalibrate", type=int, default=64, metavar="N",
                   help="before each validation, re-estimate BatchNorm statistics on N un-augmented training cases "
                        "(default 64; 0 = keep the running statistics of the augmented draws)")
    g.add_argument("--levels", type=int, default=4, help="U-Net levels (default 4)")
    p.set_defaults(func=run_unet)

    p = subparsers.add_parser("train-e3cnn", help="train the E(3)-equivariant rotation network",
                              description="Train the E3-CNN on crops made from the ground-truth brain mask. "
                                          "ANNOTATIONS.csv: frame_id, rot_x, rot_y, rot_z[, fold] (scipy extrinsic "
                                          "'xyz' degrees, voxel-axis frame -> canonical). " + desc)
    for name in ("train_img", "train_lab", "val_img", "val_lab"):
        p.add_argument(name, help=name.replace("_", " ").replace("img", "images folder").replace("lab", "labels folder"))
    p.add_argument("annotations", help="annotation CSV covering the training and validation cases")
    p.add_argument("outdir", help="output folder")
    _common(p, dict(batch=1, optimizer="sgd", lr=0.01, wd=3e-5))
    g = p.add_argument_group("architecture")
    g.add_argument("--arch", choices=("e3cnn", "standard"), default="e3cnn",
                   help="e3cnn (default): the E(3)-equivariant CNN; standard: a plain 3D CNN baseline (conv + norm + "
                        "ReLU, stride-2 down-sampling, average pool to 3^3, 6D rotation head; not equivariant), "
                        "trained with the geodesic loss; its checkpoints load wherever an E3-CNN's do (--e3cnn)")
    g.add_argument("--mult", type=int, default=2, help="E3-CNN: irreps multiplicity at level 0 (default 2)")
    g.add_argument("--n-downsample", type=int, default=4,
                   help="number of 2x down-samplings (poolings; stride-2 convolutions for --arch standard) "
                        "(default 4)")
    g.add_argument("--lmax", type=int, default=4, help="E3-CNN: spherical-harmonics order of the filters (default 4)")
    g.add_argument("--width", type=int, default=6,
                   help="standard CNN: channels at level 0, doubling per level (default 6: with --n-downsample 2 "
                        "about the parameter count of the bundled E3-CNN)")
    g.add_argument("--n-conv", type=int, default=2, help="standard CNN: convolution blocks per level (default 2)")
    g.add_argument("--norm", choices=("instance", "batch"), default="instance",
                   help="standard CNN: normalisation (default instance, per sample as the E3-CNN)")
    g.add_argument("--crop-size", type=int, default=64,
                   help="largest side of the rotation network's input (default 64)")
    g.add_argument("--crop-shape", choices=("box", "cube"), default="box",
                   help="rotation network's input: box (published: the brain's bounding box, aspect kept; default) "
                        "or cube (crop-size^3 about the brain's centre of mass: turns and mirrors with the head)")
    g.add_argument("--published-pooling", action="store_true",
                   help="E3-CNN: published pooling of 0o scalars (not mirror-exact); default: parity-exact pooling")
    g.add_argument("--loss", choices=("axes", "geodesic"), default=None,
                   help="axes (published, per voxel on the unpooled map; default for --arch e3cnn) or geodesic "
                        "(pooled rotation angle; the only choice, and default, for --arch standard)")
    g.add_argument("--centre-jitter", type=float, metavar="MM", default=0.0,
                   help="cube crops: move each training crop's centre by N(0, MM) per axis (cut at 3 sd), as a "
                        "U-Net mask's centre of mass is off at inference (works with --no-augment; default 0)")
    g.add_argument("--scale-jitter", type=float, metavar="SD", default=0.0,
                   help="cube crops: scale each training crop's side by exp(N(0, SD)) (cut at 3 sd), as a U-Net "
                        "mask's extent is off at inference (default 0)")
    g.add_argument("--unet-crops", metavar="CKPT",
                   help="cube crops: a U-Net (e.g. the bundled one) whose brain mask places some training crops, "
                        "exactly as inference places them from that U-Net's mask (its grid must be --unet-size / "
                        "--unet-spacing); the rest are the true mask's (moved by the jitter above, if any)")
    g.add_argument("--unet-crop-fraction", type=float, metavar="P", default=0.5,
                   help="with --unet-crops: the share of draws that take the U-Net's crop (default 0.5)")
    g = p.add_argument_group("pose range (SO(3) generalisation experiments)")
    g.add_argument("--pose-range", type=float, metavar="DEG", default=None,
                   help="train only on heads near one orientation: every crop is turned so that its target pose has "
                        "Euler angles U(+-DEG) about each array axis relative to the reference orientation "
                        "(replaces --rotation-deg; >= 180 = uniform over SO(3)); validation reports the validation "
                        "cases turned into that range (val_*, which choose best.pt) and at their own poses "
                        "(val_any_pose_*). Default: off")
    p.set_defaults(func=run_e3cnn)


def _check(args):
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if args.lr <= 0:
        return "--lr must be positive"
    if args.unet_size < 8 or args.unet_spacing <= 0:
        return "--unet-size must be >= 8 and --unet-spacing positive"
    if args.workers < 0 or args.prep_workers < 1:
        return "--workers must be >= 0 and --prep-workers >= 1"
    return ""


def _run(args, module):
    import importlib
    import sys

    problem = _check(args)
    if problem:
        print(f"e3pose {args.command}: {problem}", file=sys.stderr)
        return 2
    from ..errors import E3PoseError

    try:
        return importlib.import_module(f"E3PoseLogic.training.{module}").run(args)
    except (E3PoseError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"e3pose {args.command}: {exc}", file=sys.stderr)
        return 1


def run_unet(args: argparse.Namespace) -> int:
    if (args.unet_size >> (args.levels - 1)) << (args.levels - 1) != args.unet_size:
        import sys

        print(f"e3pose train-unet: --unet-size must be divisible by 2^(levels-1) = {2 ** (args.levels - 1)}",
              file=sys.stderr)
        return 2
    return _run(args, "unet_trainer")


def _check_e3cnn(args):
    if args.arch == "standard":
        if args.width < 1 or args.n_conv < 1 or args.n_downsample < 0:
            return "--width and --n-conv must be at least 1, --n-downsample at least 0"
        if args.norm == "instance" and -(-args.crop_size // 2 ** args.n_downsample) < 2:
            return (f"--crop-size {args.crop_size} with --n-downsample {args.n_downsample} leaves one voxel at the "
                    "last level, where instance norm is undefined: fewer down-samplings or a larger crop")
    if args.centre_jitter < 0 or args.scale_jitter < 0:
        return "--centre-jitter and --scale-jitter must be >= 0"
    if (args.centre_jitter > 0 or args.scale_jitter > 0) and (args.crop_shape != "cube" or args.pose_range is not None):
        return "--centre-jitter and --scale-jitter need --crop-shape cube and do not combine with --pose-range"
    if args.pose_range is not None:
        if args.pose_range < 0:
            return "--pose-range must be >= 0 degrees"
        if args.no_augment:
            return ("--pose-range is a rotation augmentation: it cannot be combined with --no-augment "
                    "(--no-intensity-augment keeps the rotations and drops the intensity chain)")
    return ""


def run_e3cnn(args: argparse.Namespace) -> int:
    problem = _check_e3cnn(args)
    if not problem:
        from ..training.e3cnn_trainer import resolve_loss

        try:  # resolved here, so train_config.json records the loss used
            args.loss = resolve_loss(args)
        except ValueError as exc:  # --loss axes for --arch standard
            problem = str(exc)
    if problem:
        import sys

        print(f"e3pose {args.command}: {problem}", file=sys.stderr)
        return 2
    return _run(args, "e3cnn_trainer")
