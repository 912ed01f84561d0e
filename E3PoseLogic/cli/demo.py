"""``e3pose demo``: the whole pipeline on the bundled synthetic sample with the bundled default model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


def register(sub):
    p = sub.add_parser("demo", help="run the pipeline on the bundled sample volume",
                       description="Run the whole pipeline on the bundled synthetic sample volume with the bundled "
                                   "default model, write the outputs and print the error against the known pose.")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--refine", default="auto", choices=("auto", "on", "off"),
                   help="refinement after the E3-CNN (default: auto, i.e. on with the bundled model)")
    p.set_defaults(func=run, unet=None, e3cnn=None, allow_pickle=False, refiner=None)


def run(args):
    import numpy as np

    from ..errors import InputError
    from ..outputs import write_outputs
    from ..rotation import geodesic_deg
    from ..volume_io import load_mask, load_volume
    from .infer import load_pipeline

    volume = SAMPLE_DIR / "sample_head.nii.gz"
    truth = json.loads((SAMPLE_DIR / "sample_head_pose.json").read_text())
    array, affine = load_volume(volume)
    pipe = load_pipeline(args)
    mask = None
    if not pipe.is_trained:
        # a random U-Net finds no brain: use the sample's true mask so the rest of the pipeline still runs
        mask = load_mask(SAMPLE_DIR / "sample_head_label.nii.gz", affine, array.shape)
        print("!!! random-weight model: using the sample's true brain mask instead of the U-Net; the rotation "
              "below is MEANINGLESS.", file=sys.stderr)
    print(f"input:  {volume} (synthetic fetal head, shape {array.shape})")
    progress = lambda stage, f: print(f"  [{f:4.0%}] {stage}", file=sys.stderr)  # noqa: E731
    try:
        result = pipe.run(array, affine, mask=mask, source=volume, progress=progress, refine=args.refine)
    except InputError as exc:
        if mask is not None:
            raise
        # the model's U-Net failed on the sample: say so, then show the rest of the pipeline on the true mask
        print(f"!!! the U-Net failed on the sample ({exc.reason}); running the rotation network on the sample's "
              "true brain mask instead.", file=sys.stderr)
        mask = load_mask(SAMPLE_DIR / "sample_head_label.nii.gz", affine, array.shape)
        result = pipe.run(array, affine, mask=mask, source=volume, progress=progress, refine=args.refine)
    paths = write_outputs(args.output, "sample_head", result, volume)
    rot_err = geodesic_deg(result.rotation, np.array(truth["rotation_ras"]))
    trans_err = float(np.linalg.norm(result.translation - np.array(truth["translation_ras"])))
    np.set_printoptions(precision=3, suppress=True)
    print(f"model:  U-Net {pipe.unet_info.get('trained_on', '?')} | E3-CNN {pipe.e3cnn_info.get('trained_on', '?')}")
    print(f"device: {pipe.device}; time {result.timings['total']:.2f} s "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items() if k != "total"))
    print(f"brain mask: {'the sample true mask (U-Net not used)' if mask is not None else 'from the U-Net'}, "
          f"{result.confidence['brain_volume_ml']:.0f} ml")
    print(f"translation (brain centre, RAS mm): {result.translation}")
    print(f"rotation (columns e_x, e_y, e_z in RAS):\n{result.rotation}")
    meaningless = "   <-- random weights: meaningless" if not pipe.is_trained else ""
    ref = result.confidence.get("refinement", {})
    if ref.get("applied"):
        net_err = geodesic_deg(result.network_rotation, np.array(truth["rotation_ras"]))
        net_terr = float(np.linalg.norm(result.network_translation - np.array(truth["translation_ras"])))
        print(f"error vs the known pose, E3-CNN alone: rotation {net_err:.1f} deg, translation {net_terr:.1f} mm")
        print(f"error vs the known pose, refined:      rotation {rot_err:.1f} deg, translation {trans_err:.1f} mm"
              f"  (refinement moved {ref['angle_moved_deg']:.1f} deg){meaningless}")
    else:
        print(f"error vs the known pose: rotation {rot_err:.1f} deg, translation {trans_err:.1f} mm"
              f"  (no refinement: {ref.get('reason', 'not run')}){meaningless}")
    print("outputs: " + ", ".join(str(p) for p in paths.values()))
    return 0
