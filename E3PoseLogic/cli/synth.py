"""``e3pose synth``: write a synthetic training set (images/, labels/, poses.csv) of fetal heads with known pose."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="generate synthetic fetal-head volumes with known pose (training layout)",
        description="Write OUTDIR/images/<id>.nii.gz, OUTDIR/labels/<id>.nii.gz (0 background, 1 brain, 2 eyes) and "
                    "OUTDIR/poses.csv (frame_id, rot_x, rot_y, rot_z, com_r, com_a, com_s, ga_weeks, fold, protocol: standard or navigator). "
                    "Rotations are scipy extrinsic 'xyz' Euler degrees from the voxel-axis frame to the canonical "
                    "frame; com_* is the brain centre of mass in world RAS mm. The same seed gives identical files.")
    p.add_argument("outdir", help="output folder (created)")
    p.add_argument("--n", type=int, default=10, help="number of volumes (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size-mm", type=float, nargs="+", metavar="MM",
                   help="field of view, one value (cube) or three; default random 200-320 mm (navigator ~380)")
    p.add_argument("--voxel-mm", type=float, nargs="+", metavar="MM",
                   help="voxel size, one value (isotropic) or three; default random 1.5-3 mm or thick slices")
    p.add_argument("--navigator", action="store_true", help="navigator-like volumes: ~6 mm voxels, ~380 mm, low SNR")
    p.add_argument("--ga-range", type=float, nargs=2, default=(20.0, 38.0), metavar=("MIN", "MAX"),
                   help="gestational age range in weeks (default 20 38)")
    p.add_argument("--mirror-prob", type=float, default=0.15, help="probability of a mirrored affine (det < 0)")
    p.add_argument("--oblique", type=float, default=0.5, help="probability of an oblique affine")
    p.add_argument("--anisotropic-prob", type=float, default=0.3, help="probability of thick slices")
    p.add_argument("--max-dim", type=int, default=160, help="largest array size per axis (default 160)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of cases in the validation fold")
    p.add_argument("--no-environment", action="store_true", help="head only, no maternal tissue / fluid / body")
    v = p.add_argument_group("variation for transfer (off by default; SynthSeg-style, see docs/README_training.md)")
    v.add_argument("--random-contrast", type=float, default=0.0, metavar="P",
                   help="probability per volume that every tissue's intensity is drawn U(0, 1) on its own "
                        "(inverted contrasts included)")
    v.add_argument("--deform", type=float, default=0.0, metavar="MM",
                   help="random smooth deformation of the anatomy, largest displacement U(0, MM) per volume")
    v.add_argument("--anatomy-variation", action="store_true",
                   help="CSF-filled sulci deepening with age, and deep grey nuclei")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (output does not depend on it)")
    p.set_defaults(func=run)


def _check(args) -> str:
    if args.n < 1:
        return "--n must be at least 1"
    for name in ("size_mm", "voxel_mm"):
        v = getattr(args, name)
        if v is not None and (len(v) not in (1, 3) or min(v) <= 0):
            return f"--{name.replace('_', '-')} takes one or three positive values"
    lo, hi = args.ga_range
    if not 15.0 <= lo <= hi <= 42.0:
        return "--ga-range must satisfy 15 <= MIN <= MAX <= 42 weeks"
    if not 0.0 <= args.deform <= 15.0:
        return "--deform must lie in [0, 15] mm"
    for name in ("mirror_prob", "oblique", "anisotropic_prob", "val_fraction", "random_contrast"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            return f"--{name.replace('_', '-')} must lie in [0, 1]"
    return ""


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    problem = _check(args)
    if problem:
        print(f"e3pose synth: {problem}", file=sys.stderr)
        return 2
    from ..synth import AcquisitionConfig, SynthConfig, Variation, generate_dataset

    acq = AcquisitionConfig(size_mm=args.size_mm, voxel_mm=args.voxel_mm, navigator=args.navigator,
                            oblique_prob=args.oblique, mirror_prob=args.mirror_prob,
                            anisotropic_prob=args.anisotropic_prob, max_dim=args.max_dim)
    cfg = SynthConfig(ga_range=tuple(args.ga_range), acquisition=acq, val_fraction=args.val_fraction,
                      environment=not args.no_environment,
                      variation=Variation(random_contrast=args.random_contrast, deform_mm=args.deform,
                                          anatomy=args.anatomy_variation))
    t0 = time.perf_counter()
    generate_dataset(args.outdir, args.n, seed=args.seed, cfg=cfg, workers=max(1, args.workers),
                     progress=sys.stderr.isatty())
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} volumes to {args.outdir} in {dt:.1f} s ({dt / args.n:.2f} s per volume)")
    return 0
