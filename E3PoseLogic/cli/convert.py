"""``e3pose convert``: a published checkpoint (or any supported one) to the native single-file format."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("convert", help="save a published checkpoint in the native format (weights_only-loadable)",
                       description="Load a U-Net (.ckpt) or E3-CNN (.pth) checkpoint and write it as one native file "
                                   "holding the weights, the architecture configuration and provenance.")
    p.add_argument("kind", choices=("unet", "e3cnn"))
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--trained-on", default=None, help="what the weights were trained on (kept in the file)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a checkpoint that needs full unpickling")
    p.add_argument("--crop-shape", choices=("box", "cube"), default=None,
                   help="e3cnn: set how the pipeline crops the network's input (box: published; cube: about the "
                        "brain's centre of mass); the weights are unchanged and a native source keeps its "
                        "training provenance")
    p.set_defaults(func=run)


def run(args):
    from ..checkpoints import load_e3cnn, load_unet, save_native
    from ..errors import E3PoseError

    if args.crop_shape is not None and args.kind != "e3cnn":
        print("e3pose convert: --crop-shape applies to e3cnn checkpoints only", file=sys.stderr)
        return 2
    try:
        model, info = (load_unet if args.kind == "unet" else load_e3cnn)(args.input, args.allow_pickle)
    except E3PoseError as exc:
        print(f"e3pose convert: {exc}", file=sys.stderr)
        return 1
    provenance = {"converted_from": info["path"], "source_sha256": info["sha256"], "source_format": info["format"],
                  "trained_on": args.trained_on or info.get("trained_on")}
    if args.crop_shape is not None:
        if info["format"] == "native":  # the same network read another way: keep how it was trained
            provenance = {**_native_provenance(args.input), **provenance}
        provenance["crop_shape_changed"] = {"from": model.config.crop_shape, "to": args.crop_shape}
        model.config.crop_shape = args.crop_shape
    kind = getattr(model, "checkpoint_kind", args.kind)  # "e3cnn" also loads the standard-CNN baseline
    save_native(args.output, model, kind, provenance)
    print(f"wrote {args.output} ({kind}, from {info['format']})")
    return 0


def _native_provenance(path) -> dict:
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True).get("provenance") or {})
