"""Write the held-out accuracy of a model into its model_card.json from ``e3pose evaluate`` outputs.

    python card_accuracy.py CARD.json --set NAME EVAL_DIR [--set NAME EVAL_DIR ...] [--describe NAME TEXT ...]

Each EVAL_DIR is an ``e3pose evaluate -o`` folder (its summary.json); NAME is how the card names the set (e.g.
``synthetic_full_pipeline``, ``synthetic_true_mask``, ``transfer_full_pipeline``). For every set the card gets the
final (refined) and the network-only rotation statistics, the translation, the refinement's "made a good pose worse"
count, the brain mask's Dice and centre error (when evaluated with ``--labels``), and the same per subgroup (standard / navigator-like / under 25 weeks), rounded for reading.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("card")
    p.add_argument("--set", nargs=2, action="append", metavar=("NAME", "EVAL_DIR"), required=True)
    p.add_argument("--describe", nargs=2, action="append", metavar=("NAME", "TEXT"), default=[])
    args = p.parse_args(argv)
    card_path = Path(args.card)
    card = json.loads(card_path.read_text())
    held = {}
    old = card.get("held_out_test") or {}
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
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {len(held)} sets into {card_path}")


if __name__ == "__main__":
    main()
