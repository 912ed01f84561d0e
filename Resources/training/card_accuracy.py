"""Write the held-out accuracy of a model into its model_card.json from ``e3pose evaluate`` outputs.

    python card_accuracy.py CARD.json --set NAME EVAL_DIR [--set NAME EVAL_DIR ...] [--describe NAME TEXT ...]

Each EVAL_DIR is an ``e3pose evaluate -o`` folder (its summary.json); NAME is how the card names the set (e.g.
``synthetic_full_pipeline``, ``synthetic_true_mask``, ``transfer_full_pipeline``, and ``*_pooled`` for every held-out
set of a kind run with the model, which the warning prefers); sets the card has and the command does not name are
kept. For every set the card gets the
final (refined) and the network-only rotation statistics, the translation, the refinement's "made a good pose worse"
count, the brain mask's Dice and centre error (when evaluated with ``--labels``), and the same per subgroup (standard / navigator-like / under 25 weeks), rounded for reading. The
card's ``warning`` (what users are shown) is rewritten from these numbers (``warning_from``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROT_KEYS = ("median", "p95", "success_5", "success_10", "success_30", "above_30", "failure_60", "n", "n_missing")
TRANS_KEYS = ("median", "p95", "n")
MASK_KEYS = ("n", "dice_median", "dice_p10", "centre_error_median_mm", "centre_error_p95_mm", "share_centre_above_4mm")


def _pick(stats, keys):
    if not stats:
        return None
    return {k: (round(stats[k], 3) if isinstance(stats.get(k), float) else stats.get(k)) for k in keys if k in stats}


def block(summary):
    out = {"n_cases": summary.get("n_cases"), "n_refused": summary.get("n_missing"),
           "rotation_deg": _pick(summary.get("rotation_error_deg"), ROT_KEYS),
           "network_only_rotation_deg": _pick(summary.get("network_rotation_error_deg"), ROT_KEYS),
           "translation_mm": _pick(summary.get("translation_error_mm"), TRANS_KEYS)}
    if summary.get("brain_mask"):  # e3pose evaluate --labels: the mask the pose was made from
        out["brain_mask"] = _pick(summary["brain_mask"], MASK_KEYS)
    ref = summary.get("refinement")
    if ref:
        out["refinement_made_good_pose_worse"] = {k: ref.get(k) for k in
                                                  ("within_deg", "worse_by_deg", "n_network_within", "n_worse")}
    return out


def _pct(x):
    """Whole per cent, but one decimal below 10 % (one volume in 200 is 0.5 %, not "0 %")."""
    v = 100 * x
    return f"{v:.0f} %" if v >= 10 or v == 0 else f"{round(v, 1):g} %"


def warning_from(card):
    """The warning every output and the Slicer module show, with its numbers read from the card's held-out blocks
    (``synthetic_full_pipeline[_pooled]``, and ``transfer_full_pipeline[_pooled]`` when present), so the two cannot
    drift apart.
    None when the card has no synthetic block."""
    held = card.get("held_out_test") or {}
    # the pooled sets (all held-out sets run with this model) when the card has them: more volumes, steadier tails
    syn = held.get("synthetic_full_pipeline_pooled") or held.get("synthetic_full_pipeline")
    if not syn:
        return None

    def rot(entry, group="all"):
        return (entry.get(group) or {}).get("rotation_deg") or {}

    def count(entry):
        n = rot(entry).get("n")
        return f"{n} " if n else ""

    text = (f"trained on synthetic data only, small networks: on {count(syn)}held-out synthetic volumes the refined "
            f"median rotation error is {rot(syn)['median']:.1f} degrees "
            f"({rot(syn, 'standard')['median']:.1f} on standard volumes, {rot(syn, 'navigator')['median']:.1f} on "
            f"navigator-like ones; {_pct(rot(syn)['failure_60'])} off by more than 60 degrees, refused volumes "
            "included)")
    trans = (syn.get("all") or {}).get("translation_mm") or {}
    if trans.get("median") is not None:
        text += f" and the median translation error {trans['median']:.1f} mm"
    tra = held.get("transfer_full_pipeline_pooled") or held.get("transfer_full_pipeline")
    if tra:
        text += (f"; on {count(tra)}volumes of real brain anatomy (MNI-based transfer sets) "
                 f"{rot(tra)['median']:.1f} degrees median "
                 f"({rot(tra, 'navigator')['median']:.1f} on navigator-like volumes) with "
                 f"{_pct(rot(tra)['failure_60'])} off by more than 60")
    return text + "; check every result; not validated on real fetal MRI; research use, not clinical"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("card")
    p.add_argument("--set", nargs=2, action="append", metavar=("NAME", "EVAL_DIR"), required=True)
    p.add_argument("--describe", nargs=2, action="append", metavar=("NAME", "TEXT"), default=[])
    args = p.parse_args(argv)
    card_path = Path(args.card)
    card = json.loads(card_path.read_text())
    old = card.get("held_out_test") or {}
    held = dict(old)  # sets not named here stay as they are
    # a set keeps the description it already has unless --describe gives a new one
    texts = {name: entry.get("description", "") for name, entry in old.items() if isinstance(entry, dict)}
    texts.update(dict(args.describe))
    for name, folder in args.set:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        entry = {"description": texts.get(name, ""), "all": block(summary)}
        for group, sub in (summary.get("by_subgroup") or {}).items():
            entry[group] = block(sub)
        held[name] = entry
    card["held_out_test"] = held
    card["warning"] = warning_from(card) or card.get("warning")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {len(held)} sets into {card_path}")


if __name__ == "__main__":
    main()
