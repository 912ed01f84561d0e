"""How equivariant is the rotation network *as the pipeline feeds it*? (issue 10)

For each volume: the U-Net's brain mask, then the network's pose from the crop of the U-Net grid, and again after the
head is turned on that grid, for the published box crop and the cube crop (``crop.py``):
  - grid: the 48 signed axis permutations of the grid (no resampling). An exactly equivariant chain gives
    R' = g R diag(det g, 1, 1) (the pseudovector picks up det g), i.e. 0 deg;
  - turned: ``--turns`` random rotations about the brain's centre of mass (linear resampling of image and mask), the
    poses the network meets in practice; interpolation alone keeps this above 0.
The number reported is the angle between the pose of the turned head and the turned pose. No ground truth is needed.

    python Resources/benchmarks/equivariance_check.py VOLUMES_DIR -o OUT [--e3cnn CKPT] [--n-volumes 100]

writes OUT/per_case.csv and OUT/summary.json and prints the summary (median / 95th percentile / max per crop).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

SHAPES = ("box", "cube")


def turn_on_grid(x, mask, q):
    """The U-Net-grid image and mask turned by rotation ``q`` (index space, isotropic grid) about the mask's centre
    of mass: output voxel v samples the input at q^T (v - c) + c."""
    from scipy import ndimage

    c = np.array(ndimage.center_of_mass(mask > 0))
    off = c - q.T @ c
    xt = ndimage.affine_transform(x, q.T, offset=off, order=1, mode="constant", cval=0.0)
    mt = ndimage.affine_transform(mask.astype(np.float32), q.T, offset=off, order=1, mode="constant") > 0.5
    return xt.astype(np.float32), mt.astype(np.uint8)


def network_pose(pipeline, x, mask, shape):
    from E3PoseLogic.crop import crop_for_e3cnn
    from E3PoseLogic.rotation import axes_to_rotation

    cfg = pipeline.e3cnn.config
    crop, _ = crop_for_e3cnn(x, mask, cfg.crop_scale, cfg.crop_size, shape)
    return axes_to_rotation(*pipeline.network_axes(crop))[0]


def check_volume(pipeline, x, mask, rng, turns=2, shapes=SHAPES):
    """-> {shape: {"grid": [48 angles], "turned": [turns angles]}} in degrees."""
    from scipy.spatial.transform import Rotation

    from E3PoseLogic.rotation import apply_grid_symmetry, geodesic_deg, grid_symmetries

    qs = [Rotation.random(random_state=int(rng.integers(2 ** 31))).as_matrix() for _ in range(turns)]
    out = {}
    for shape in shapes:
        base = network_pose(pipeline, x, mask, shape)
        grid = []
        for order, flips, g in grid_symmetries():
            r = network_pose(pipeline, apply_grid_symmetry(x, order, flips), apply_grid_symmetry(mask, order, flips),
                             shape)
            grid.append(float(geodesic_deg(r, g @ base @ np.diag([np.linalg.det(g), 1.0, 1.0]))))
        turned = []
        for q in qs:
            xt, mt = turn_on_grid(x, mask, q)
            turned.append(float(geodesic_deg(network_pose(pipeline, xt, mt, shape), q @ base)))
        out[shape] = {"grid": grid, "turned": turned}
    return out


def _stats(v):
    v = np.asarray(v, dtype=float)
    return {"n": int(v.size), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max()), "within_1deg": float(np.mean(v <= 1.0))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("volumes", help="folder of NIfTI volumes (e.g. a held-out set's images/)")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--unet", default=None, help="U-Net checkpoint (default: the bundled model's)")
    ap.add_argument("--e3cnn", default=None, help="rotation network (default: the bundled model's)")
    ap.add_argument("--n-volumes", type=int, default=100, help="the first N volumes in name order (default 100)")
    ap.add_argument("--turns", type=int, default=2, help="random rotations per volume (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from E3PoseLogic.atomic import save_json
    from E3PoseLogic.errors import E3PoseError
    from E3PoseLogic.pipeline import Pipeline
    from E3PoseLogic.preprocess import field_of_view, unet_input
    from E3PoseLogic.volume_io import load_volume

    pipeline = Pipeline.from_files(args.unet, args.e3cnn, device="cpu")
    files = sorted(Path(args.volumes).glob("*.nii*"))[: args.n_volumes]
    if not files:
        print(f"equivariance_check: no NIfTI volume in {args.volumes}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows, skipped = [], []
    for f in files:
        try:
            array, affine = load_volume(f)
            x, grid = unet_input(array, affine, pipeline.unet_spacing, pipeline.unet_size)
            fov = field_of_view(array.shape, affine, grid, x.shape)
            mask = pipeline.segment_multiscale(array, affine, x, grid, fov, str(f))[0]
        except (E3PoseError, OSError, ValueError) as exc:
            skipped.append(f"{f.name}: {exc}")
            continue
        res = check_volume(pipeline, x, mask, rng, args.turns)
        for shape, d in res.items():
            rows.append({"volume": f.name, "crop": shape, "grid_median_deg": float(np.median(d["grid"])),
                         "grid_max_deg": float(np.max(d["grid"])), "turned_deg": ";".join(f"{a:.3f}" for a in d["turned"]),
                         "_grid": d["grid"], "_turned": d["turned"]})
    if not rows:
        print("equivariance_check: no volume could be read or segmented:\n  " + "\n  ".join(skipped), file=sys.stderr)
        return 1
    summary = {"volumes": len({r["volume"] for r in rows}), "skipped": skipped, "turns_per_volume": args.turns,
               "e3cnn": args.e3cnn or "bundled", "crops": {}}
    for shape in SHAPES:
        sel = [r for r in rows if r["crop"] == shape]
        summary["crops"][shape] = {"grid": _stats([a for r in sel for a in r["_grid"]]),
                                   "turned": _stats([a for r in sel for a in r["_turned"]])}
    keys = ["volume", "crop", "grid_median_deg", "grid_max_deg", "turned_deg"]
    with open(out / "per_case.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    save_json(out / "summary.json", summary)
    print(f"{summary['volumes']} volumes ({len(skipped)} skipped); angle between the turned head's pose and the turned "
          "pose, deg: median / 95th pct. / max")
    for shape, d in summary["crops"].items():
        g, t = d["grid"], d["turned"]
        print(f"  {shape:4s}  grid symmetries {g['median']:.2f} / {g['p95']:.2f} / {g['max']:.1f}   "
              f"random turns {t['median']:.1f} / {t['p95']:.1f} / {t['max']:.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
