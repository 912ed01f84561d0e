"""``e3pose evaluate``: compare ``e3pose infer`` JSONs with an annotation CSV (rotation/translation errors, plots)."""
from __future__ import annotations

import argparse

PER_CASE_COLUMNS = ("frame_id", "status", "rotation_error_deg", "translation_error_mm", "err_ex_deg", "err_ey_deg",
                    "err_ez_deg", "gt_rotation_deg", "bin", "fold")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="pose errors of predictions against an annotation CSV",
        description="Read PRED_DIR/<frame_id>.json (e3pose infer output) for every row of GROUND_TRUTH.csv "
                    "(frame_id, rot_x, rot_y, rot_z[, com_r, com_a, com_s][, fold]) and write per_case.csv, "
                    "summary.json and rotation_error_by_magnitude.png: geodesic rotation error (degrees), "
                    "translation error (mm, when the CSV has com_*), median, 95th percentile, success rates at "
                    "10 and 30 degrees, and errors by ground-truth rotation magnitude. Missing predictions count "
                    "as failures.")
    p.add_argument("pred_dir", help="folder of <frame_id>.json predictions")
    p.add_argument("ground_truth", help="annotation CSV")
    p.add_argument("-o", "--output", help="output folder (default PRED_DIR/evaluation)")
    p.add_argument("--fold", help="evaluate only rows of this fold (e.g. validation)")
    p.add_argument("--no-plot", action="store_true", help="skip the box plot")
    p.set_defaults(func=run)


def _fmt(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.4f}"
    return "" if v is None else str(v)


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


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..atomic import save_json, write_text
    from ..evaluate import evaluate_cases, read_ground_truth, read_prediction, summary

    pred_dir, gt_path = Path(args.pred_dir), Path(args.ground_truth)
    if not pred_dir.is_dir():
        print(f"e3pose evaluate: {pred_dir}: not a folder", file=sys.stderr)
        return 2
    try:
        truth = read_ground_truth(gt_path)
    except (OSError, ValueError, KeyError) as e:
        print(f"e3pose evaluate: {gt_path}: cannot read the annotation CSV: {e}", file=sys.stderr)
        return 2
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
    s = summary(cases)
    s.update(pred_dir=str(pred_dir), ground_truth=str(gt_path), fold=args.fold, unreadable=unreadable)
    out = Path(args.output) if args.output else pred_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    lines = [",".join(PER_CASE_COLUMNS)] + [",".join(_fmt(c.get(k)) for k in PER_CASE_COLUMNS) for c in cases]
    write_text(out / "per_case.csv", "\n".join(lines) + "\n")
    save_json(out / "summary.json", s)
    if not args.no_plot:
        plot_by_bin(cases, out / "rotation_error_by_magnitude.png")

    r = s["rotation_error_deg"]
    print(f"{s['n_cases']} cases, {s['n_missing']} missing" + (f" ({len(unreadable)} unreadable)" if unreadable else ""))
    if r["n"]:
        print(f"rotation error: median {r['median']:.2f} deg, 95th percentile {r['p95']:.2f} deg, "
              f"success <=10 deg {100 * r['success_10']:.1f} %, <=30 deg {100 * r['success_30']:.1f} %")
    t = s["translation_error_mm"]
    if t and t["n"]:
        print(f"translation error: median {t['median']:.2f} mm, 95th percentile {t['p95']:.2f} mm")
    elif s.get("translation_note"):
        print(f"note: {s['translation_note']}")
    for b in s["by_rotation_magnitude"]:
        if b["n"] or b["n_missing"]:
            med = f"{b['median']:.2f}" if b["median"] is not None else "-"
            print(f"  {b['bin']:>8} deg: n={b['n']:<4} missing={b['n_missing']:<3} median {med} deg")
    if s["missing"]:
        shown = ", ".join(s["missing"][:10]) + (" ..." if len(s["missing"]) > 10 else "")
        print(f"missing predictions (counted as failures): {shown}")
    print(f"wrote {out}/per_case.csv, summary.json" + ("" if args.no_plot else ", rotation_error_by_magnitude.png"))
    return 0
