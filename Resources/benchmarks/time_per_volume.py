"""Time per volume over a whole set, from the JSON files `e3pose infer` wrote (their `timings_s`).

Why: `e3pose benchmark` times the bundled sample, which is a confident pose, so neither the frame judge's search nor
the grid retry of doubtful poses runs there. On a set they run where the pose looks wrong, and on real anatomy that
is most volumes: the median and the tail of a set are what a user waits for. Timings are those of the run that wrote
the files (run it with nothing else on the machine).

    python Resources/benchmarks/time_per_volume.py PRED_DIR [PRED_DIR ...] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def summarise(folders):
    """-> dict: how many volumes, `Pipeline.run` seconds (median, 90th percentile, max), how many ran the grid retry
    and the judge's search, and on how many the second look was not allowed (`--second-look`)."""
    totals, retried, searched, no_look = [], 0, 0, 0
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            rec = json.loads(path.read_text())
            timings = rec.get("timings_s")
            if not isinstance(timings, dict) or "total" not in timings:
                continue
            totals.append(float(timings["total"]))
            refinement = (rec.get("confidence") or {}).get("refinement") or {}
            retried += "doubt_retry" in timings
            searched += bool((refinement.get("judge") or {}).get("searched"))
            no_look += (refinement.get("second_look") or {}).get("allowed") is False
    if not totals:
        raise SystemExit(f"no e3pose infer JSON with timings_s in {', '.join(map(str, folders))}")
    t = np.array(totals)
    return {"n": int(t.size), "median_s": float(np.median(t)), "p90_s": float(np.percentile(t, 90)),
            "max_s": float(t.max()), "mean_s": float(t.mean()), "grid_retry": int(retried),
            "judge_search_in_final_pose": int(searched), "second_look_not_allowed": int(no_look)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="e3pose infer output folders")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    s = summarise(args.folders)
    print(f"{s['n']} volumes: Pipeline.run median {s['median_s']:.2f} s, 90th percentile {s['p90_s']:.2f} s, "
          f"max {s['max_s']:.1f} s (mean {s['mean_s']:.2f} s); grid retry on {s['grid_retry']}, "
          f"judge's search in {s['judge_search_in_final_pose']} final poses, no second look allowed on "
          f"{s['second_look_not_allowed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
