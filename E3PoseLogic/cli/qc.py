"""``e3pose qc``: QC pictures (three slice views + 3D, mask and canonical axes) for the results of ``e3pose infer``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HELP = "render QC pictures of `e3pose infer` results (needs `pip install slicer-core`)"


def register(subparsers):
    p = subparsers.add_parser("qc", help=HELP, description=HELP)
    p.add_argument("results", help="output folder of `e3pose infer` (holds <name>.json and <name>_mask.nii.gz)")
    p.add_argument("--inputs", default=None,
                   help="folder with the input volumes, when they moved since `e3pose infer` ran")
    p.add_argument("-o", "--output", required=True, help="folder for the QC pictures (created)")
    p.add_argument("--size", type=int, default=360, help="pixels per view (default 360)")
    p.set_defaults(func=run)
    return p


def _find_input(rec, json_path, inputs_dir):
    original = Path(rec.get("input") or "")
    candidates = []
    if inputs_dir is not None:
        d = Path(inputs_dir)
        stem = json_path.stem
        candidates += [d / original.name] + [d / f"{stem}{ext}" for ext in (".nii.gz", ".nii", ".nrrd", ".mha")]
    candidates.append(original)
    for c in candidates:
        if str(c) and c.is_file():
            return c
    raise FileNotFoundError(f"{json_path}: input volume not found (tried {', '.join(map(str, candidates))}); "
                            "pass --inputs DIR")


def load_result(json_path, inputs_dir=None):
    """(array_ijk, ijk_to_ras, PoseResult, input path) from one `e3pose infer` JSON and its mask.

    Volumes are read with ``volume_io`` (the reader of `e3pose infer`), so a truncated, corrupt or otherwise
    unusable file raises ``InputError`` naming it, like any other per-file problem.
    """
    from ..errors import InputError
    from ..result import PoseResult
    from ..volume_io import load_volume

    json_path = Path(json_path)
    try:
        rec = json.loads(json_path.read_text())
        rotation = np.asarray(rec["rotation_ras"], float)
        translation = np.asarray(rec["translation_ras"], float)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(json_path, f"not an `e3pose infer` result record ({type(exc).__name__}: {exc})") from None
    src = _find_input(rec, json_path, inputs_dir)
    arr, affine = load_volume(src)
    brain = eyes = None
    mask_path = json_path.with_name(f"{json_path.stem}_mask.nii.gz")
    if mask_path.is_file():
        m, mask_affine = load_volume(mask_path, labels=True)
        if m.shape != arr.shape or not np.allclose(mask_affine, affine, atol=1e-4):
            raise InputError(mask_path, f"the mask is not on the grid of its input {src} (shape {m.shape} vs "
                                        f"{arr.shape}): was the input replaced after `e3pose infer` ran?")
        brain = ((m > 0) & (m != 2)).astype(np.uint8)
        eyes = (m == 2).astype(np.uint8) if np.any(m == 2) else None
    result = PoseResult(
        rotation=rotation, translation=translation,
        brain_mask=brain, eye_mask=eyes, ijk_to_ras=affine,
        confidence={k: v for k, v in (rec.get("confidence") or {}).items()
                    if isinstance(v, (int, float)) or k in ("refinement", "network_turned_readings")},
        provenance={"model": rec.get("model"), "device": rec.get("device")},
    )
    return arr, affine, result, src


def run(args) -> int:
    try:
        from ..qc import _require

        _require()
    except ImportError as exc:
        print(f"e3pose qc: {exc}", file=sys.stderr)
        return 2
    from ..errors import E3PoseError
    from ..qc import contact_sheet, doubt_of, render_qc

    results = Path(args.results)
    jsons = sorted(p for p in results.glob("*.json") if not p.name.startswith("."))
    if not jsons:
        print(f"e3pose qc: no <name>.json results in {results}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pngs, names, doubts, failed = [], [], [], 0
    for j in jsons:
        try:
            arr, aff, result, src = load_result(j, args.inputs)
            png = render_qc(arr, aff, result, out / f"{j.stem}_qc.png", title=j.stem, size=args.size)
            pngs.append(png)
            names.append(j.stem)
            doubts.append(doubt_of(result.confidence))
            print(f"{j.stem}: {png}" + ("" if doubts[-1] is None else f"  (CHECK: doubtful pose, {doubts[-1]})"),
                  flush=True)
        except (E3PoseError, OSError, KeyError, ValueError) as exc:
            failed += 1
            print(f"{j.stem}: FAILED: {exc}", file=sys.stderr, flush=True)
        except Exception as exc:  # one picture that cannot be made must not cost the others theirs
            failed += 1
            print(f"{j.stem}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if pngs:
        sheet = contact_sheet(pngs, out / "contact_sheet.png", out / "index.html", titles=names, doubts=doubts)
        n_doubt = sum(d is not None for d in doubts)
        print(f"contact sheet: {sheet} and {out / 'index.html'}"
              + (f" ({n_doubt} doubtful, shown first)" if n_doubt else ""))
    return 1 if failed else 0
