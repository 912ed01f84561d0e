"""``e3pose evaluate``: compare ``e3pose infer`` JSONs with an annotation CSV (rotation/translation errors, plots)."""
from __future__ import annotations

import argparse

# The first ten columns keep their order (Resources/training/make_model_card.py reads them); new ones go last.
PER_CASE_COLUMNS = ("frame_id", "status", "rotation_error_deg", "translation_error_mm", "err_ex_deg", "err_ey_deg",
                    "err_ez_deg", "gt_rotation_deg", "bin", "fold", "network_rotation_error_deg", "protocol",
                    "ga_weeks", "doubtful", "brain_dice", "mask_centre_error_mm")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="pose errors of predictions against an annotation CSV",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read PRED_DIR/<frame_id>.json (e3pose infer output) for every row of GROUND_TRUTH.csv\n"
                    "(frame_id, rot_x, rot_y, rot_z[, com_r, com_a, com_s][, fold][, ga_weeks][, protocol or\n"
                    "navigator]) and write per_case.csv, summary.json and rotation_error_by_magnitude.png.\n\n"
                    "Reported for all cases and, when the CSV has the columns, per subgroup (protocol: standard /\n"
                    "navigator, or a yes/no navigator column; gestational age below / from 25 weeks): geodesic\n"
                    "rotation error (degrees) median and 95th percentile, success at 5, 10 and 30 degrees, the\n"
                    "share above 30 degrees, the failure rate above 60 degrees (the E(3)-Pose paper's failure), and\n"
                    "translation error (mm, when the CSV has com_*). When the predictions carry\n"
                    "network_rotation_voxel, the network-only pose is reported beside the final one, with the\n"
                    "number of cases whose network pose was within 10 degrees and whose final pose is worse by\n"
                    "more than 2 degrees. A missing or unreadable prediction counts as a failure.\n\n"
                    "The CSV is checked first (UTF-8, a byte-order mark is fine): an empty, non-numeric, NaN or\n"
                    "infinite angle (or one beyond 1e6 degrees), com_* or ga_weeks stops the run (exit 2) with the\n"
                    "file, line and frame_id of each bad row. A frame_id repeated with different values is an\n"
                    "error naming the ids; repeated with identical values it is counted once with a warning.\n\n"
                    "--labels LABEL_DIR (LABEL_DIR/<frame_id>.nii[.gz], 1 = brain) also scores the brain mask each\n"
                    "pose was made from (PRED_DIR/<frame_id>_mask.nii.gz): Dice and centre-of-mass distance, per\n"
                    "case and per subgroup. A case without either file is listed and the others are scored.")
    p.add_argument("pred_dir", help="folder of <frame_id>.json predictions")
    p.add_argument("ground_truth", help="annotation CSV")
    p.add_argument("-o", "--output", help="output folder (default PRED_DIR/evaluation)")
    p.add_argument("--fold", help="evaluate only rows of this fold (e.g. validation)")
    p.add_argument("--no-plot", action="store_true", help="skip the box plot")
    p.add_argument("--labels", metavar="LABEL_DIR",
                   help="annotated label maps (1 = brain): score the predicted brain masks too")
    p.set_defaults(func=run)


def _fmt(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.4f}"
    return "" if v is None else str(v)


def write_per_case(path, cases) -> None:
    """``per_case.csv``: one row of PER_CASE_COLUMNS per ``evaluate_cases`` row (also ``e3pose compare``'s)."""
    from ..atomic import write_text

    lines = [",".join(PER_CASE_COLUMNS)] + [",".join(_fmt(c.get(k)) for k in PER_CASE_COLUMNS) for c in cases]
    write_text(path, "\n".join(lines) + "\n")


def plot_by_bin(cases, path) -> None:
    """Box plot of rotation error per ground-truth magnitude bin (matplotlib Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluate import MAGNITUDE_BINS, bin_label

    labels = [bin_label(i) for i in range(len(MAGNITUDE_BINS) - 1)]
    data = [[c["rotation_error_deg"] for c in cases if c["bin"] == b and c["status"] == "ok"] for b in labels]
    missing = [sum(1 for c in cases if c["bin"] == b and c["status"] != "ok") for b in labels]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    pos = [i + 1 for i, d in enumerate(data) if d]
    if pos:
        ax.boxplot([d for d in data if d], positions=pos, widths=0.6, showfliers=True)
    for i, d in enumerate(data):
        ax.text(i + 1, 1.0, f"n={len(d)}" + (f"\n+{missing[i]} missing" if missing[i] else ""),
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    for t, style in ((10, ":"), (30, "--")):
        ax.axhline(t, color="grey", ls=style, lw=0.8)
        ax.text(len(labels) + 0.45, t, f"{t} deg", va="center", ha="left", fontsize=7, color="grey")
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels(labels)
    ax.set_xlim(0.5, len(labels) + 0.9)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("ground-truth rotation magnitude (degrees)")
    ax.set_ylabel("geodesic rotation error (degrees)")
    ax.set_title("Rotation error by rotation magnitude", pad=22)
    fig.tight_layout()
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _deg(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_group(g: dict, indent: str = "") -> list:
    """Text lines of one ``group_summary``: final rotation, network-only rotation, refinement check, translation."""
    out = []
    for key, name in (("rotation_error_deg", "rotation error"), ("network_rotation_error_deg", "network alone")):
        r = g.get(key)
        if r is None:
            continue
        out.append(f"{indent}{name}: median {_deg(r['median'])} deg, 95th percentile {_deg(r['p95'])} deg, "
                   f"success <=5 deg {_pct(r['success_5'])}, <=10 {_pct(r['success_10'])}, "
                   f"<=30 {_pct(r['success_30'])}; above 30 {_pct(r['above_30'])}, "
                   f"failures >60 deg {_pct(r['failure_60'])}")
    f = g.get("refinement")
    if f:
        out.append(f"{indent}final pose worse than the network by >{f['worse_by_deg']:g} deg: {f['n_worse']} of "
                   f"{f['n_network_within']} cases with the network within {f['within_deg']:g} deg"
                   + (f" ({', '.join(f['worse'][:10])}{' ...' if len(f['worse']) > 10 else ''})" if f["worse"]
                      else ""))
    dq = g.get("doubtful")
    if dq:
        out.append(f"{indent}flagged doubtful: {dq['n_above_flagged']} of {dq['n_above']} poses off by more than "
                   f"{dq['above_deg']:g} deg, {dq['n_others_flagged']} of the {dq['n_others']} others")
    t = g.get("translation_error_mm")
    if t and t["n"]:
        out.append(f"{indent}translation error: median {t['median']:.2f} mm, 95th percentile {t['p95']:.2f} mm")
    m = g.get("brain_mask")
    if m:
        out.append(f"{indent}brain mask ({m['n']} scored): Dice median {m['dice_median']:.3f}, 10th percentile "
                   f"{m['dice_p10']:.3f}; centre of mass off by median {m['centre_error_median_mm']:.2f} mm, 95th "
                   f"percentile {m['centre_error_p95_mm']:.2f} mm, above 4 mm {_pct(m['share_centre_above_4mm'])}")
    return out


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..atomic import save_json, write_text
    from ..evaluate import add_mask_scores, evaluate_cases, read_ground_truth, read_prediction, summary

    pred_dir, gt_path = Path(args.pred_dir), Path(args.ground_truth)
    if not pred_dir.is_dir():
        print(f"e3pose evaluate: {pred_dir}: not a folder", file=sys.stderr)
        return 2
    warnings = []
    try:
        truth = read_ground_truth(gt_path, warnings_out=warnings)
    except (OSError, ValueError, KeyError) as e:  # the message names the file (UnicodeDecodeError is a ValueError)
        msg = str(e) if str(gt_path) in str(e) else f"{gt_path}: {e}"
        print(f"e3pose evaluate: cannot use the annotation CSV: {msg}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"e3pose evaluate: warning: {w}", file=sys.stderr)
    if args.fold:
        truth = {k: v for k, v in truth.items() if v.get("fold") == args.fold}
    if not truth:
        print(f"e3pose evaluate: {gt_path}: no annotated cases" + (f" in fold {args.fold!r}" if args.fold else ""),
              file=sys.stderr)
        return 2
    preds, unreadable = {}, []
    for fid in truth:
        f = pred_dir / f"{fid}.json"
        if f.is_file():
            try:
                preds[fid] = read_prediction(f)
            except (ValueError, OSError) as e:
                unreadable.append(f"{f.name}: {e}")
    cases = evaluate_cases(preds, truth)
    mask_problems = []
    if args.labels:
        if not Path(args.labels).is_dir():
            print(f"e3pose evaluate: {args.labels}: not a folder (--labels)", file=sys.stderr)
            return 2
        mask_problems = add_mask_scores(cases, pred_dir, args.labels)
    s = summary(cases)
    s.update(pred_dir=str(pred_dir), ground_truth=str(gt_path), fold=args.fold, unreadable=unreadable,
             warnings=warnings, labels=args.labels, mask_problems=mask_problems)
    out = Path(args.output) if args.output else pred_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    write_per_case(out / "per_case.csv", cases)
    save_json(out / "summary.json", s)
    if not args.no_plot:
        plot_by_bin(cases, out / "rotation_error_by_magnitude.png")

    print(f"{s['n_cases']} cases, {s['n_missing']} missing" + (f" ({len(unreadable)} unreadable)" if unreadable else ""))
    for line in format_group(s):
        print(line)
    if not s["translation_error_mm"] and s.get("translation_note"):
        print(f"note: {s['translation_note']}")
    for b in s["by_rotation_magnitude"]:
        if b["n"] or b["n_missing"]:
            print(f"  {b['bin']:>8} deg: n={b['n']:<4} missing={b['n_missing']:<3} median {_deg(b['median'])} deg")
    for name, g in s["by_subgroup"].items():
        print(f"{name}: {g['n_cases']} cases, {g['n_missing']} missing")
        for line in format_group(g, indent="  "):
            print(line)
    for msg in mask_problems[:10]:
        print(f"e3pose evaluate: mask not scored: {msg}", file=sys.stderr)
    if len(mask_problems) > 10:
        print(f"e3pose evaluate: ... {len(mask_problems) - 10} more masks not scored (summary.json lists them)",
              file=sys.stderr)
    if s["missing"]:
        shown = ", ".join(s["missing"][:10]) + (" ..." if len(s["missing"]) > 10 else "")
        print(f"missing predictions (counted as failures): {shown}")
    print(f"wrote {out}/per_case.csv, summary.json" + ("" if args.no_plot else ", rotation_error_by_magnitude.png"))
    return 0
