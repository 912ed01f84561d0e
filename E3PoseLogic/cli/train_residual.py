"""``e3pose train-residual``: train the residual network (``residual``, the refinement's last step)."""
from __future__ import annotations


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
    p.add_argument("train_img", help="images folder")
    p.add_argument("train_lab", help="labels folder")
    p.add_argument("annotations", help="annotation CSV")
    p.add_argument("outdir", help="output folder")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget (default 30)")
    p.add_argument("--steps", type=int, help="stop after this many steps instead (exactly reproducible)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-annealed (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/last.pt")
    p.add_argument("--init", metavar="RESIDUAL_PT", help="start from this residual network's weights")
    p.add_argument("--pose-logit", action="store_true",
                   help="also learn whether the frame is near the head's (a quarter of each batch is frames turned "
                        "far off); the refinement then ranks its hypotheses with it")
    p.add_argument("--trained-on", metavar="TEXT", default="", help="training-data description for the checkpoint")
    p.set_defaults(func=run)


def run(args):
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from tqdm import tqdm

    from ..evaluate import read_ground_truth
    from ..networks.residual import ResidualConfig
    from ..training.residual_trainer import prepare, train
    from ..volume_io import iter_inputs, volume_name

    name = "e3pose train-residual"
    if args.steps is not None and args.steps < 1:
        print(f"{name}: --steps must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    for path, what in ((args.train_img, "images folder"), (args.train_lab, "labels folder")):
        if not Path(path).is_dir():
            print(f"{name}: {path}: the {what} does not exist", file=sys.stderr)
            return 2
    try:
        truth = read_ground_truth(args.annotations)
    except OSError as exc:
        print(f"{name}: {args.annotations}: cannot read the annotations ({exc.strerror})", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    images = [p for p in iter_inputs([args.train_img]) if volume_name(p) in truth]
    labels = {volume_name(p): p for p in iter_inputs([args.train_lab])}
    images = [p for p in images if volume_name(p) in labels]
    if not images:
        print(f"{name}: no image in {args.train_img} has both a label in {args.train_lab} and a row in "
              f"{args.annotations}", file=sys.stderr)
        return 2
    if args.init:
        from ..checkpoints import load_residual
        from ..errors import E3PoseError

        try:
            load_residual(args.init)
        except E3PoseError as exc:
            print(f"{name}: --init: {exc}", file=sys.stderr)
            return 2
    rng = np.random.default_rng([args.seed, 1])
    bar = tqdm(total=len(images), unit="volume", desc="resampling", file=sys.stderr)
    cubes = prepare(images, labels, truth, rng, progress=bar.update)
    bar.close()
    trained_on = args.trained_on or f"{len(cubes)} annotated volumes from {args.train_img}"
    path = train(cubes, args.outdir, ResidualConfig(pose_logit=args.pose_logit), args.minutes, init=args.init,
                 seed=args.seed, batch=args.batch_size, lr=args.lr,
                 resume=Path(args.outdir) / "last.pt" if args.resume else None, max_steps=args.steps,
                 log=lambda m: print(m, file=sys.stderr), provenance={"trained_on": trained_on})
    print(f"{name}: wrote {path}")
    return 0
