"""``e3pose train-refiner``: train the refinement network (``refine``) from annotated volumes."""
from __future__ import annotations

from . import cube_training


def register(sub):
    p = sub.add_parser(
        "train-refiner", help="train the refinement network (mirror plane + mid-sagittal 2D CNN)",
        description="Train the refinement network from annotated volumes: IMG_DIR/<id>.nii[.gz], LAB_DIR/<id>.nii[.gz] "
                    "(label 1 = brain: its centre of mass and volume place and scale the slabs) and ANNOTATIONS.csv "
                    "(frame_id, rot_x, rot_y, rot_z as for train-e3cnn). Each volume is resampled once around its "
                    "brain in its canonical frame; training slabs are drawn on the fly with random in-plane "
                    "rotation, side, tilt, warp and contrast. Writes OUTDIR/refiner.pt (native, for "
                    "e3pose infer --refiner or a model folder), last.pt (for --resume) and history.json. "
                    "Deterministic per seed for a given number of steps (use --steps for an exact rebuild).")
    cube_training.add_arguments(p, threads=1, init_metavar="REFINER_PT",
                                init_help="start from this refinement network's weights (e.g. the bundled refiner.pt)")
    p.add_argument("--plane-logit", action="store_true",
                   help="also learn whether the slabs lie along the mid-sagittal plane (half of each batch is slabs "
                        "along wrong planes); the refinement then ranks its plane hypotheses with it")
    p.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="scale half of the training slabs by LO to HI times the brain's true size (log-uniform; the "
                        "rest within about 8 %%), for heads whose brain volume the U-Net gets wrong (e.g. 0.55 1.15: "
                        "on real anatomy it often finds only part of the brain)")
    p.set_defaults(func=run)


def run(args):
    import sys

    import numpy as np

    from ..checkpoints import load_refiner
    from ..networks.sagittal import SagittalConfig
    from ..training.refiner_trainer import prepare_cubes, train

    name = "e3pose train-refiner"
    if args.scale_range is not None and not 0 < args.scale_range[0] <= args.scale_range[1]:
        print(f"{name}: --scale-range needs 0 < LO <= HI", file=sys.stderr)
        return 2
    found = cube_training.training_volumes(args, name, load_refiner)
    if found == 2:
        return 2
    images, labels, truth = found
    cfg = SagittalConfig(plane_logit=args.plane_logit)
    rng = np.random.default_rng([args.seed, 1])
    cubes = cube_training.resample(lambda progress: prepare_cubes(images, labels, truth, cfg, rng, progress=progress),
                                   images)
    trained_on = args.trained_on or f"{len(cubes)} annotated volumes from {args.train_img}"
    path = train(cubes, args.outdir, cfg, args.minutes, provenance={"trained_on": trained_on},
                 scale_range=args.scale_range, **cube_training.train_kwargs(args))
    print(f"{name}: wrote {path}")
    return 0
