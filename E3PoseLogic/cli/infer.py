"""``e3pose infer``: the pipeline over files and folders, one bad input reported and the rest carried on."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub):
    p = sub.add_parser("infer", help="estimate the fetal head pose in NIfTI volumes",
                       description="Estimate the fetal head pose in each input volume. Per input NAME writes "
                                   "NAME.npy (published matrix), NAME.json, NAME_mask.nii.gz and NAME.tfm. "
                                   "Inputs whose names would give the same NAME (a/scan.nii.gz and "
                                   "b/scan.nii.gz, or scan.nii beside scan.nii.gz) are refused before anything "
                                   "is computed: run them with separate -o folders. An output folder that "
                                   "cannot be created or written is reported before the models load. "
                                   "A set of outputs replaces an earlier run's only once it is complete. "
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
    add_refine_arguments(p)


def add_refine_arguments(p):
    p.add_argument("--refine", default="auto", choices=("auto", "on", "off"),
                   help="refinement after the E3-CNN (mirror plane + mid-sagittal network): auto = when the model "
                        "has a refinement network (the bundled one has), on = required, off = network pose only. "
                        "The JSON keeps the network-only pose beside the refined one (default: auto)")
    from ..judge import SECOND_LOOK_CHOICES

    p.add_argument("--second-look", default="auto", choices=SECOND_LOOK_CHOICES,
                   help="a second look at a pose that looks wrong (the frame judge's search over all rotations and "
                        "the retry on finer U-Net grids; 5-20 s on 2 CPU cores where they run): auto = on "
                        "navigator-like volumes (voxels of 4 mm or more) only, where it rescues failures; always "
                        "(on finer volumes of real anatomy it turned more poses wrong than it rescued); off = about "
                        "1 s per volume, more failures on navigator-like volumes. Doubtful poses are flagged "
                        "either way (README, 'Second look'; default: auto)")
    p.add_argument("--refiner", metavar="R",
                   help="refinement network weights (native .pt from e3pose train-refiner); default: the bundled "
                        "model's, when the bundled E3-CNN is used")
    p.add_argument("--residual", metavar="N",
                   help="residual network weights, the refinement's last step (native .pt from e3pose "
                        "train-residual); default: the bundled model's, when the bundled E3-CNN is used")
    p.add_argument("--judge", metavar="J",
                   help="frame judge weights (a residual network with the pose logit, usually a wider view: "
                        "e3pose train-residual --pose-logit --fov 6); default: the bundled model's, when the "
                        "bundled E3-CNN is used")


def load_pipeline(args):
    from ..pipeline import Pipeline

    pipe = Pipeline.from_files(args.unet, args.e3cnn, device=args.device, allow_pickle=args.allow_pickle,
                               refiner_path=getattr(args, "refiner", None),
                               residual_path=getattr(args, "residual", None),
                               judge_path=getattr(args, "judge", None))
    if pipe.refine_mode(getattr(args, "refine", "auto")) == "auto" and pipe.refiner is None:  # "on": raises
        print(f"note: this model has no refinement network ({pipe.no_refiner_why}): the poses are the E3-CNN's "
              "alone (--refine auto)", file=sys.stderr)
    for warning in pipe.warnings:
        banner = "!" * 100
        print(f"{banner}\n!!! MODEL WARNING: {warning}\n{banner}", file=sys.stderr)
    return pipe


def run(args):
    from tqdm import tqdm

    from ..errors import E3PoseError, InputError
    from ..outputs import name_clashes, prepare_output_folder, remove_empty_folders, write_outputs
    from ..residual import doubt_details, frame_choice
    from ..volume_io import find_nifti, iter_inputs, load_mask, load_volume, volume_name

    inputs, missing = [], []
    for item in args.inputs:
        if not Path(item).exists():
            missing.append(item)
    inputs = list(iter_inputs([i for i in args.inputs if Path(i).exists()]))
    failures = [(m, "no such file or folder") for m in missing]
    if not inputs and not failures:
        print("e3pose infer: no .nii/.nii.gz files in the inputs", file=sys.stderr)
        return 1
    inputs = _drop_repeats(inputs)
    clashes = name_clashes(inputs)
    if clashes:  # one result would silently overwrite another: refuse before computing anything
        print(f"e3pose infer: inputs with the same name would write the same output files in {args.output}; "
              "nothing was computed:", file=sys.stderr)
        for name, paths in clashes.items():
            print(f"  {name}.*: {', '.join(map(str, paths))}", file=sys.stderr)
        print("  run inputs that share a name with separate -o folders (or rename them)", file=sys.stderr)
        return min(len(inputs) + len(failures), 125)
    try:
        created = prepare_output_folder(args.output)  # before the models load: fail in seconds, not after a batch
    except E3PoseError as exc:
        print(f"e3pose infer: {exc}; nothing was computed", file=sys.stderr)
        return min(len(inputs) + len(failures), 125) or 1
    try:
        pipe = load_pipeline(args)
    except E3PoseError as exc:
        remove_empty_folders(created)
        print(f"e3pose infer: {exc}", file=sys.stderr)
        return min(len(inputs) + len(failures), 125) or 1
    done, doubtful = 0, []
    bar = tqdm(inputs, unit="volume", disable=args.quiet, file=sys.stderr)
    for path in bar:
        name = volume_name(path)
        bar.set_postfix_str(name)
        try:
            array, affine = load_volume(path)
            mask = None
            if args.mask_dir:
                mpath = find_nifti(args.mask_dir, name)
                if mpath is None:
                    raise InputError(path, f"no mask named {name}.nii.gz or {name}.nii in {args.mask_dir}")
                mask = load_mask(mpath, affine, array.shape)
            result = pipe.run(array, affine, mask=mask, source=path, refine=args.refine,
                              second_look=args.second_look)
            if mask is not None:
                result.provenance["mask_source"] = str(mpath)
            write_outputs(args.output, name, result, path, args.scanner_space, args.input_to_canonical)
            done += 1
            choice = frame_choice(result.confidence.get("refinement"))
            if choice.get("doubtful"):  # residual.mark_doubt (README, "Doubtful results")
                doubtful.append(name)
                look = (result.confidence.get("refinement") or {}).get("second_look") or {}
                note = "; not looked at again: --second-look" if look.get("allowed") is False else ""
                tqdm.write(f"CHECK {path}: doubtful pose ({doubt_details(choice)}{note})", file=sys.stderr)
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
        except Exception as exc:  # a defect of ours on one odd input must not cost the rest of the batch
            msg = f"unexpected error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); " \
                  "please report it with this input's header"
            failures.append((path, msg))
            tqdm.write(f"FAILED {path}: {msg}", file=sys.stderr)
    if not done:
        remove_empty_folders(created)
    print(f"e3pose infer: {done} done, {len(failures)} failed; outputs in {args.output}", file=sys.stderr)
    if doubtful:
        print(f"  doubtful (check these first): {', '.join(doubtful)}", file=sys.stderr)
    for path, reason in failures:
        if not str(reason).startswith(str(path)):
            print(f"  failed: {path}: {reason}", file=sys.stderr)
        else:
            print(f"  failed: {reason}", file=sys.stderr)
    return min(len(failures), 125)


def _drop_repeats(inputs):
    """The same file given twice under the same name (by name and in its folder, say) is done once."""
    from ..volume_io import volume_name

    seen, out = set(), []
    for path in inputs:
        try:
            st = os.stat(path)
            key = (volume_name(path), st.st_dev, st.st_ino)
        except OSError:
            key = (volume_name(path), os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out
