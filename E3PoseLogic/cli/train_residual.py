"""``e3pose train-residual``: train the residual network (``residual``, the refinement's last step)."""
from __future__ import annotations

from . import cube_training


def register(sub):
    p = sub.add_parser(
        "train-residual", help="train the residual network (the refinement's last step, a small 3D CNN)",
        description="Train the residual network from annotated volumes: IMG_DIR/<id>.nii[.gz], LAB_DIR/<id>.nii[.gz] "
                    "(label 1 = brain: its centre of mass and volume place and scale the input cube) and "
                    "ANNOTATIONS.csv (frame_id, rot_x, rot_y, rot_z as for train-e3cnn). Each volume is resampled "
                    "once around its brain in its canonical frame; training inputs are drawn on the fly, turned "
                    "by a random residual rotation (mostly within 10 deg, a share up to 45), shifted, scaled, "
                    "warped, mirrored and given a random contrast. Writes OUTDIR/residual.pt (native, for e3pose "
                    "infer --residual or a model folder), last.pt (for --resume) and history.json. Deterministic "
                    "per seed for a given number of steps (use --steps for an exact rebuild).")
    cube_training.add_arguments(p, threads=2, init_metavar="RESIDUAL_PT",
                                init_help="start from this residual network's weights")
    p.add_argument("--pose-logit", action="store_true",
                   help="also learn whether the frame is near the head's (a quarter of each batch is frames turned "
                        "far off); the refinement then ranks its hypotheses with it")
    p.add_argument("--fov", type=float, default=3.2, metavar="RADII",
                   help="input cube side in brain radii (default 3.2, the residual network; the frame judge reads "
                        "6: skull, face, neck and the body's direction)")
    p.set_defaults(func=run)


def run(args):
    import sys

    import numpy as np

    from ..checkpoints import load_residual
    from ..networks.residual import ResidualConfig
    from ..training.residual_trainer import prepare, train

    name = "e3pose train-residual"
    if not 1.0 <= args.fov <= 12.0:
        print(f"{name}: --fov must be between 1 and 12 brain radii, not {args.fov}", file=sys.stderr)
        return 2
    found = cube_training.training_volumes(args, name, load_residual)
    if found == 2:
        return 2
    images, labels, truth = found
    rng = np.random.default_rng([args.seed, 1])
    cfg = ResidualConfig(fov=args.fov, pose_logit=args.pose_logit)
    cubes = cube_training.resample(lambda progress: prepare(images, labels, truth, rng, progress=progress, cfg=cfg),
                                   images)
    trained_on = args.trained_on or f"{len(cubes)} annotated volumes from {args.train_img}"
    path = train(cubes, args.outdir, cfg, args.minutes,
                 provenance={"trained_on": trained_on}, **cube_training.train_kwargs(args))
    print(f"{name}: wrote {path}")
    return 0
