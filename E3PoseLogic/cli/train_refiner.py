"""``e3pose train-refiner``: train the refinement network (``refine``) from annotated volumes."""
from __future__ import annotations


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
    p.add_argument("train_img", help="images folder")
    p.add_argument("train_lab", help="labels folder")
    p.add_argument("annotations", help="annotation CSV")
    p.add_argument("outdir", help="output folder")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget (default 30)")
    p.add_argument("--steps", type=int, help="stop after this many steps instead (exactly reproducible)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-annealed (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/last.pt")
    p.add_argument("--init", metavar="REFINER_PT",
                   help="start from this refinement network's weights (e.g. the bundled refiner.pt)")
    p.add_argument("--plane-logit", action="store_true",
                   help="also learn whether the slabs lie along the mid-sagittal plane (half of each batch is slabs "
                        "along wrong planes); the refinement then ranks its plane hypotheses with it")
    p.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="scale half of the training slabs by LO to HI times the brain's true size (log-uniform; the "
                        "rest within about 8 %%), for heads whose brain volume the U-Net gets wrong (e.g. 0.55 1.15: "
                        "on real anatomy it often finds only part of the brain)")
    p.add_argument("--trained-on", metavar="TEXT", default="", help="training-data description for the checkpoint")
    p.set_defaults(func=run)


def run(args):
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from tqdm import tqdm

    from ..evaluate import read_ground_truth
    from ..networks.sagittal import SagittalConfig
    from ..training.refiner_trainer import prepare_cubes, train
    from ..volume_io import iter_inputs, volume_name

    if args.scale_range is not None and not 0 < args.scale_range[0] <= args.scale_range[1]:
        print("e3pose train-refiner: --scale-range needs 0 < LO <= HI", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("e3pose train-refiner: --steps must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    for path, what in ((args.train_img, "images folder"), (args.train_lab, "labels folder")):
        if not Path(path).is_dir():
            print(f"e3pose train-refiner: {path}: the {what} does not exist", file=sys.stderr)
            return 2
    try:
        truth = read_ground_truth(args.annotations)
    except OSError as exc:
        print(f"e3pose train-refiner: {args.annotations}: cannot read the annotations ({exc.strerror})",
              file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"e3pose train-refiner: {exc}", file=sys.stderr)
        return 2
    if args.init:
        from ..checkpoints import load_refiner
        from ..errors import E3PoseError

        try:
            load_refiner(args.init)
        except E3PoseError as exc:
            print(f"e3pose train-refiner: --init: {exc}", file=sys.stderr)
            return 2
    images = [p for p in iter_inputs([args.train_img]) if volume_name(p) in truth]
    labels = {volume_name(p): p for p in iter_inputs([args.train_lab])}
    images = [p for p in images if volume_name(p) in labels]
    if not images:
        print(f"e3pose train-refiner: no image in {args.train_img} has both a label in {args.train_lab} and a row "
              f"in {args.annotations}", file=sys.stderr)
        return 2
    cfg = SagittalConfig(plane_logit=args.plane_logit)
    rng = np.random.default_rng([args.seed, 1])
    bar = tqdm(total=len(images), unit="volume", desc="resampling", file=sys.stderr)
    cubes = prepare_cubes(images, labels, truth, cfg, rng, progress=bar.update)
    bar.close()
    trained_on = args.trained_on or f"{len(cubes)} annotated volumes from {args.train_img}"
    path = train(cubes, args.outdir, cfg, args.minutes, seed=args.seed, batch=args.batch_size, lr=args.lr,
                 resume=Path(args.outdir) / "last.pt" if args.resume else None, max_steps=args.steps,
                 log=lambda m: print(m, file=sys.stderr), provenance={"trained_on": trained_on},
                 init=args.init, scale_range=args.scale_range)
    print(f"e3pose train-refiner: wrote {path}")
    return 0
