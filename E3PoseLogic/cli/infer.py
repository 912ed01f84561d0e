"""``e3pose infer``: the pipeline over files and folders, one bad input reported and the rest carried on."""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub):
    p = sub.add_parser("infer", help="estimate the fetal head pose in NIfTI volumes",
                       description="Estimate the fetal head pose in each input volume. Per input NAME writes "
                                   "NAME.npy (published matrix), NAME.json, NAME_mask.nii.gz and NAME.tfm. "
                                   "The exit code is the number of inputs that failed (at most 125).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI files (.nii, .nii.gz) or folders of them")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    add_model_arguments(p)
    p.add_argument("--mask-dir", metavar="DIR",
                   help="brain masks with the same file names, used instead of the U-Net (any grid: resampled "
                        "nearest-neighbour through world coordinates)")
    p.add_argument("--scanner-space", action="store_true",
                   help="NAME.npy maps canonical mm -> world RAS mm (default: canonical -> input voxel indices)")
    p.add_argument("--input-to-canonical", action="store_true", help="write the inverse matrix in NAME.npy")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_model_arguments(p):
    p.add_argument("--unet", metavar="U", help="U-Net weights (published .ckpt or native .pt); default: bundled")
    p.add_argument("--e3cnn", metavar="E", help="E3-CNN weights (published .pth or native .pt); default: bundled")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto (GPU if any)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")


def load_pipeline(args):
    from ..pipeline import Pipeline

    pipe = Pipeline.from_files(args.unet, args.e3cnn, device=args.device, allow_pickle=args.allow_pickle)
    for warning in pipe.warnings:
        banner = "!" * 100
        print(f"{banner}\n!!! MODEL WARNING: {warning}\n{banner}", file=sys.stderr)
    return pipe


def find_mask(mask_dir, name):
    for suffix in (".nii.gz", ".nii"):
        p = Path(mask_dir) / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def run(args):
    from tqdm import tqdm

    from ..errors import E3PoseError, InputError
    from ..outputs import write_outputs
    from ..volume_io import iter_inputs, load_mask, load_volume, volume_name

    inputs, missing = [], []
    for item in args.inputs:
        if not Path(item).exists():
            missing.append(item)
    inputs = list(iter_inputs([i for i in args.inputs if Path(i).exists()]))
    failures = [(m, "no such file or folder") for m in missing]
    if not inputs and not failures:
        print("e3pose infer: no .nii/.nii.gz files in the inputs", file=sys.stderr)
        return 1
    try:
        pipe = load_pipeline(args)
    except E3PoseError as exc:
        print(f"e3pose infer: {exc}", file=sys.stderr)
        return min(len(inputs) + len(failures), 125) or 1
    done = 0
    bar = tqdm(inputs, unit="volume", disable=args.quiet, file=sys.stderr)
    for path in bar:
        name = volume_name(path)
        bar.set_postfix_str(name)
        try:
            array, affine = load_volume(path)
            mask = None
            if args.mask_dir:
                mpath = find_mask(args.mask_dir, name)
                if mpath is None:
                    raise InputError(path, f"no mask named {name}.nii.gz or {name}.nii in {args.mask_dir}")
                mask = load_mask(mpath, affine, array.shape)
            result = pipe.run(array, affine, mask=mask, source=path)
            if mask is not None:
                result.provenance["mask_source"] = str(mpath)
            write_outputs(args.output, name, result, path, args.scanner_space, args.input_to_canonical)
            done += 1
        except E3PoseError as exc:
            failures.append((path, str(exc)))
            tqdm.write(f"FAILED {exc}", file=sys.stderr)
        except OSError as exc:  # disk full, no permission: report, keep going (earlier outputs are intact)
            failures.append((path, f"cannot write the outputs: {exc}"))
            tqdm.write(f"FAILED {path}: cannot write the outputs: {exc}", file=sys.stderr)
        except MemoryError:
            failures.append((path, "out of memory"))
            tqdm.write(f"FAILED {path}: out of memory", file=sys.stderr)
        except RuntimeError as exc:  # e.g. CUDA out of memory
            msg = str(exc).splitlines()[0]
            if "out of memory" in msg.lower():
                msg += " (try --device cpu)"
            failures.append((path, msg))
            tqdm.write(f"FAILED {path}: {msg}", file=sys.stderr)
    print(f"e3pose infer: {done} done, {len(failures)} failed; outputs in {args.output}", file=sys.stderr)
    for path, reason in failures:
        if not str(reason).startswith(str(path)):
            print(f"  failed: {path}: {reason}", file=sys.stderr)
        else:
            print(f"  failed: {reason}", file=sys.stderr)
    return min(len(failures), 125)
