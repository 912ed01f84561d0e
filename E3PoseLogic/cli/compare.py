"""``e3pose compare``: E3Pose against template registration and a standard CNN on the same held-out volumes.

Builds what it needs when it is not given (the held-out synthetic volumes, the registration template from training
seeds), runs every method that can run here, and writes per-method per-case CSVs, one summary table (CSV, JSON,
Markdown) and plots of the error by rotation magnitude. Methods that cannot run are listed as skipped, with why.
"""
from __future__ import annotations

import argparse

DEFAULT_TEST_SEEDS = (41, 42)  # the model card's held-out set: standard, navigator-like
TEMPLATE_SEED = 1  # a training seed: the template is built from annotated training volumes, never test ones
METHODS = ("e3pose-network", "e3pose-refined", "registration-identity", "registration-moments",
           "registration-multistart", "standard-cnn", "ants", "ants-search", "fireants")
# rows run by an external package's worker in its own environment: name -> (tool, start, label)
WORKER_ROWS = {
    "ants": ("ants", "com", "ANTs (antspyx) similarity registration, from the centres of mass"),
    "ants-search": ("ants", "search", "ANTs similarity registration after its rotation search (8^3 starts)"),
    "fireants": ("fireants", "moments", "FireANTs rigid registration with scales, from its moments matching"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare E3Pose with template registration and a standard CNN on held-out volumes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run each pose method on the same annotated volumes and write OUTDIR/comparison.md (table),\n"
                    "comparison.csv / .json, OUTDIR/<method>/per_case.csv (the columns of e3pose evaluate) and\n"
                    "error_by_magnitude.png. Without --test-dir the held-out synthetic set is generated (e3pose synth\n"
                    "seeds 41 and navigator-like 42, the model card's test seeds). The registration template is\n"
                    "built from annotated training volumes (synth seed 1) unless --template is given.\n\n"
                    "Methods: e3pose-network (E3-CNN alone), e3pose-refined (with the refinement), registration-\n"
                    "identity / -moments / -multistart (SimpleITK similarity registration of the template, started\n"
                    "at the image centre, from the intensity's principal axes, or from 24 rotations), standard-cnn\n"
                    "(--standard-cnn CKPT, e.g. from e3pose train-e3cnn --arch standard), ants / ants-search (ANTs\n"
                    "similarity registration of the same template from the centres of mass / after ANTs' rotation\n"
                    "search, run by --ants-python: the Python of an environment of its own with antspyx, made by\n"
                    "Resources/benchmarks/make_ants_env.sh) and fireants (FireANTs rigid registration with scales\n"
                    "after its second-order moments matching, run by --fireants-python, made by\n"
                    "make_fireants_env.sh).\n"
                    "--generalisation E3CNN STANDARD adds the SO(3) experiment:\n"
                    "two networks trained with --pose-range 90, tested on rotations over all of SO(3).")
    p.add_argument("outdir", help="output folder")
    p.add_argument("--test-dir", help="annotated volumes: DIR/images/*.nii.gz and DIR/poses.csv (default: generate)")
    p.add_argument("--n-test", type=int, default=100,
                   help="volumes to generate when --test-dir is not given, half navigator-like (default 100)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of: {', '.join(METHODS)} (default all)")
    p.add_argument("--slow-volumes", type=int, default=20, metavar="N",
                   help="registration-multistart runs on N volumes spread over the set (about a minute each on 2 "
                        "cores; default 20, 0 = all)")
    p.add_argument("--moments-volumes", type=int, default=50, metavar="N",
                   help="registration-moments, ants-search and fireants run on N volumes spread over the set (5-30 s "
                        "each; default 50, 0 = all)")
    p.add_argument("--rerun", action="store_true",
                   help="run every method again (default: a method already measured in OUTDIR on the same "
                        "volumes is read back from OUTDIR/<method>/result.json)")
    p.add_argument("--template", help="registration template (.npz from a previous run; default: build it)")
    p.add_argument("--template-cases", type=int, default=16,
                   help="training volumes averaged into the template (default 16)")
    p.add_argument("--standard-cnn", metavar="CKPT", help="standard-CNN checkpoint (e3pose train-e3cnn --arch standard)")
    p.add_argument("--generalisation", nargs=2, metavar=("E3CNN", "STANDARD"),
                   help="checkpoints of the two networks trained on poses within +-90 deg (--pose-range 90)")
    p.add_argument("--ants-python", metavar="PYTHON",
                   help="Python of a separate environment with antspyx, for the ants rows (default: "
                        "$E3POSE_ANTS_PYTHON; Resources/benchmarks/make_ants_env.sh makes one)")
    p.add_argument("--fireants-python", metavar="PYTHON",
                   help="Python of a separate environment with fireants, for the fireants row (default: "
                        "$E3POSE_FIREANTS_PYTHON; Resources/benchmarks/make_fireants_env.sh makes one)")
    p.add_argument("--device", default="cpu", help="device for the networks (default cpu, as the timings state)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _test_set(args, out):
    """(images folder, poses.csv) of the test volumes, generated into OUTDIR/data/test when not given."""
    from pathlib import Path

    if args.test_dir:
        d = Path(args.test_dir)
        return d / "images", d / "poses.csv"
    from ..synth import AcquisitionConfig, SynthConfig
    from ..synth.dataset import CSV_COLUMNS, generate_dataset

    d = out / "data" / "test"
    csv = d / "poses.csv"
    if csv.is_file():
        return d / "images", csv
    n_nav = args.n_test // 2
    rows = []
    for seed, n, nav in ((DEFAULT_TEST_SEEDS[0], args.n_test - n_nav, False), (DEFAULT_TEST_SEEDS[1], n_nav, True)):
        if n:
            part = d / f"seed{seed}"
            cfg = SynthConfig(val_fraction=0.0, acquisition=AcquisitionConfig(navigator=nav))
            generate_dataset(part, n, seed=seed, cfg=cfg, progress=not args.quiet)
            (d / "images").mkdir(parents=True, exist_ok=True)
            for f in sorted((part / "images").glob("*.nii.gz")):
                f.replace(d / "images" / f.name)
            rows += (part / "poses.csv").read_text().splitlines()[1:]
    from ..atomic import write_text

    write_text(csv, ",".join(CSV_COLUMNS) + "\n" + "".join(r + "\n" for r in rows))
    return d / "images", csv


def _template(args, out):
    """The registration template: loaded, or built from annotated training volumes (synth seed 1)."""
    from ..registration import build_template, load_template, save_template

    if args.template:
        return load_template(args.template)
    path = out / "data" / "template.npz"
    if path.is_file():
        return load_template(path)
    import numpy as np

    from ..synth.dataset import make_case

    def cases():
        for i in range(args.template_cases):
            c = make_case(TEMPLATE_SEED, i)
            brain_ml = float((c.label == 1).sum() * abs(np.linalg.det(c.affine[:3, :3])) / 1000.0)
            yield c.image.astype(np.float32), c.affine, c.rotation_ras, c.com_ras, brain_ml

    template = build_template(cases())
    template.provenance.update(source=f"e3pose synth seed {TEMPLATE_SEED}, cases 0-{args.template_cases - 1} "
                                      "(training data, with their known poses)")
    save_template(template, path)
    return template


def _volumes(images, names):
    from ..volume_io import load_volume

    for fid, path in names:
        array, affine = load_volume(path)
        yield dict(frame_id=fid, array=array, affine=affine)


def _spread(ids, n):
    """``n`` ids evenly spread over the list (both protocols and all ages are represented)."""
    if n <= 0 or n >= len(ids):
        return set(ids)
    idx = [int(round(i * (len(ids) - 1) / (n - 1))) if n > 1 else 0 for i in range(n)]
    return {ids[i] for i in idx}


def run(args: argparse.Namespace) -> int:
    import sys
    from datetime import date
    from pathlib import Path

    from .. import comparison as cmp
    from ..atomic import save_json, write_text
    from ..errors import E3PoseError
    from ..evaluate import read_ground_truth
    from ..volume_io import volume_name
    from .benchmark import cpu_model, usable_cpus
    from .evaluate import _fmt, write_per_case

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown:
        print(f"e3pose compare: unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})",
              file=sys.stderr)
        return 2
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        images, csv = _test_set(args, out)
        truth = read_ground_truth(csv)
        files = {volume_name(f): f for f in sorted(Path(images).glob("*.nii*"))}
        names = [(fid, files[fid]) for fid in truth if fid in files]
        missing = [fid for fid in truth if fid not in files]
        if missing:
            print(f"e3pose compare: warning: {len(missing)} annotated volumes have no image (e.g. {missing[0]}); "
                  "they are left out", file=sys.stderr)
        truth = {fid: truth[fid] for fid, _ in names}
        methods = _methods(args, wanted, out)
    except (E3PoseError, OSError, ValueError) as exc:
        print(f"e3pose compare: {exc}", file=sys.stderr)
        return 2
    ids = [fid for fid, _ in names]
    subsets = {"registration-multistart": _spread(ids, args.slow_volumes),
               "registration-moments": _spread(ids, args.moments_volumes),
               "ants-search": _spread(ids, args.moments_volumes), "fireants": _spread(ids, args.moments_volumes)}
    keys = {m.name: m.key() for m in methods}
    cached = {} if args.rerun else {
        m.name: r for m in methods if not m.unavailable()
        and (r := cmp.load_result(out / m.name, csv, subsets.get(m.name, set(ids)), keys[m.name]))}
    if cached:
        print(f"e3pose compare: reusing the results in {out} of {', '.join(cached)} (--rerun to measure again)",
              file=sys.stderr)
    to_run = [m for m in methods if m.name not in cached]

    from tqdm import tqdm

    total = sum(len(subsets.get(m.name, ids)) for m in to_run if not m.unavailable())
    bar = tqdm(total=total, unit="run", disable=args.quiet, file=sys.stderr)
    fresh = cmp.run_methods(to_run, _volumes(images, names) if to_run else [], truth, subsets,
                            progress=lambda name, fid: (bar.set_postfix_str(f"{name} {fid}"), bar.update()))
    bar.close()
    by_name = {r.name: r for r in fresh}
    by_name.update(cached)
    results = [by_name[m.name] for m in methods]

    rows = []
    for res in results:
        rows.append(cmp.summary_row(res))
        if res.skipped:
            continue
        d = out / res.name
        d.mkdir(exist_ok=True)
        write_per_case(d / "per_case.csv", res.cases)
        if res.errors:
            save_json(d / "failures.json", res.errors)
        if res.name not in cached:
            cmp.save_result(d, res, csv, keys[res.name])
    machine = f"{cpu_model()}, {usable_cpus()} CPU cores, {args.device}"
    meta = dict(date=date.today().isoformat(), machine=machine, test_csv=str(csv), n_volumes=len(ids),
                slow_volumes=len(subsets["registration-multistart"]),
                moments_volumes=len(subsets["registration-moments"]))
    main = [r for r in results if r.name not in ("generalisation-e3cnn", "generalisation-standard")]
    gen = [r for r in results if r.name in ("generalisation-e3cnn", "generalisation-standard")]
    table = cmp.markdown_table([r for r in rows if r["method"] in {m.name for m in main}])
    text = (f"# Pose methods on the same {len(ids)} held-out volumes ({csv})\n\nMachine: {machine}; date "
            f"{meta['date']}. Rotation: geodesic error; a volume a method fails on counts as a failure.\n\n" + table)
    if gen:
        text += ("\n## SO(3) generalisation: networks trained on poses within +-90 deg, tested on all of SO(3)\n\n"
                 + cmp.markdown_table([r for r in rows if r["method"] in {m.name for m in gen}]))
        cmp.plot_by_magnitude(gen, out / "so3_generalisation.png",
                              "Trained on poses within +-90 deg, tested on SO(3): median error by magnitude")
    write_text(out / "comparison.md", text)
    save_json(out / "comparison.json", dict(meta, rows=rows))
    columns = sorted({k for r in rows for k in r},
                     key=lambda k: (k not in ("method", "label", "status", "note"), k))
    write_text(out / "comparison.csv", ",".join(columns) + "\n" + "".join(
        ",".join(_fmt(r.get(k)).replace(",", ";") for k in columns) + "\n" for r in rows))
    cmp.plot_by_magnitude(main, out / "error_by_magnitude.png",
                          f"{len(ids)} held-out volumes: median rotation error by rotation magnitude")
    print(text)
    print(f"wrote {out}/comparison.md, comparison.csv, comparison.json, error_by_magnitude.png"
          + (", so3_generalisation.png" if gen else ""))
    return 0


def _methods(args, wanted, out):
    """The method objects, in table order; those that cannot run here are ``SkippedMethod`` with the reason."""
    from .. import comparison as cmp
    from ..pipeline import Pipeline

    methods = []
    # the bundled model, for the E3Pose rows (the other networks' rows load their own)
    pipe = Pipeline.from_files(device=args.device) if any(m.startswith("e3pose") for m in wanted) else None
    if "e3pose-network" in wanted:
        methods.append(cmp.E3PoseMethod(pipe, False, "e3pose-network", "E3Pose: E3-CNN alone (bundled)"))
    if "e3pose-refined" in wanted:
        methods.append(cmp.E3PoseMethod(pipe, True, "e3pose-refined", "E3Pose: E3-CNN + refinement (bundled)"))
    regs = [m for m in wanted if m.startswith("registration-")]
    workers = [m for m in wanted if m in WORKER_ROWS]
    template = _template(args, out) if regs or workers else None  # one template for every registration row
    if regs:
        labels = {"identity": "registration from the image centre", "moments": "registration from principal axes",
                  "multistart": "registration, 24 starts"}
        for m in regs:
            start = m.split("-", 1)[1]
            methods.append(cmp.RegistrationMethod(template, start, m, labels[start]))
    if "standard-cnn" in wanted:
        if args.standard_cnn:
            std = Pipeline.from_files(e3cnn_path=args.standard_cnn, device=args.device)
            methods.append(cmp.E3PoseMethod(std, False, "standard-cnn", "standard 3D CNN (same U-Net and crop)"))
        else:
            methods.append(cmp.SkippedMethod("standard-cnn", "standard 3D CNN",
                                             "no checkpoint given (--standard-cnn; train one with "
                                             "e3pose train-e3cnn --arch standard)"))
    for name in workers:
        import os

        tool, start, label = WORKER_ROWS[name]
        python = getattr(args, f"{tool}_python") or os.environ.get(f"E3POSE_{tool.upper()}_PYTHON")
        methods.append(cmp.WorkerMethod(template, tool, python, start, name, label))
    if args.generalisation:
        for path, name, label in zip(args.generalisation, ("generalisation-e3cnn", "generalisation-standard"),
                                     ("E3-CNN trained within +-90 deg", "standard CNN trained within +-90 deg")):
            net = Pipeline.from_files(e3cnn_path=path, device=args.device)
            methods.append(cmp.E3PoseMethod(net, False, name, label))
    return methods
