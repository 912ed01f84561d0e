"""What ``e3pose train-refiner`` and ``e3pose train-residual`` share: both resample each annotated volume once around
its brain and then train on draws from those cubes, so they take the same data, budget and resume options and check
their inputs the same way."""
from __future__ import annotations


def add_arguments(p, threads: int, init_metavar: str, init_help: str) -> None:
    p.add_argument("train_img", help="images folder")
    p.add_argument("train_lab", help="labels folder")
    p.add_argument("annotations", help="annotation CSV")
    p.add_argument("outdir", help="output folder")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget (default 30)")
    p.add_argument("--steps", type=int, help="stop after this many steps instead (exactly reproducible)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-annealed (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/last.pt")
    p.add_argument("--init", metavar=init_metavar, help=init_help)
    p.add_argument("--trained-on", metavar="TEXT", default="", help="training-data description for the checkpoint")


def training_volumes(args, name: str, load_init):
    """Check the options and inputs; -> (images, labels by name, truth by name), or 2 after printing the problem
    (named by file) to stderr. ``load_init`` loads an ``--init`` checkpoint of the right kind or raises."""
    import sys
    from pathlib import Path

    import torch

    from ..errors import E3PoseError
    from ..evaluate import read_ground_truth
    from ..volume_io import iter_inputs, volume_name

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
        try:
            load_init(args.init)
        except E3PoseError as exc:
            print(f"{name}: --init: {exc}", file=sys.stderr)
            return 2
    return images, labels, truth


def resample(prepare, images):
    """Run ``prepare(progress)`` over the volumes with a progress bar on stderr; -> its cubes."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=len(images), unit="volume", desc="resampling", file=sys.stderr)
    try:
        return prepare(bar.update)
    finally:
        bar.close()


def train_kwargs(args):
    """The options every cube trainer's ``train`` takes the same way."""
    import sys
    from pathlib import Path

    return dict(seed=args.seed, batch=args.batch_size, lr=args.lr, max_steps=args.steps, init=args.init,
                resume=Path(args.outdir) / "last.pt" if args.resume else None,
                log=lambda m: print(m, file=sys.stderr))
