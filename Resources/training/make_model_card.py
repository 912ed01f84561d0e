"""Assemble a bundled model folder: the best checkpoints, their curves and metrics, and model_card.json.

    python make_model_card.py RUNS EVAL EVAL_GT PRED OUT_DIR --notes notes.json

RUNS holds unet/ and e3cnn/ training folders (and refiner/, residual/ and judge/, whose .pt files are copied when
present);
EVAL / EVAL_GT are ``e3pose evaluate`` outputs of the whole pipeline and of the E3-CNN with the true brain mask; PRED
is the pipeline's prediction folder (for the timings). Held-out numbers are split by acquisition (frame-id prefix) as well
as pooled. Each network's card entry is its checkpoint's provenance, plus the training command as run (from the run's
train_config.json), the epochs run and scheduled (the provenance's ``epochs`` is the epoch the checkpoint was saved
at, i.e. the best one), and the sha256 of its --init file. ``notes.json`` adds free-form fields (test set
description, hardware, training history, commands, the warning shown to users).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch

KEEP = ("trained_on", "n_train", "n_val", "epochs", "steps_per_epoch", "batch_size", "optimizer", "lr", "lr_schedule",
        "init", "rotation_deg", "seed", "training_time_s", "best_epoch", "best_val", "loss", "augmentation",
        "git_commit")


def brief(ckpt, run=None):
    prov = ckpt["provenance"]
    out = {"config": ckpt["config"], **{k: prov.get(k) for k in KEEP}}
    if run is not None:
        # what actually ran: the last command line (train_config.json), the epochs run (metrics.csv rows) against the
        # epochs of the schedule, and which file --init read (the provenance keeps only its path)
        cfg = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").is_file() else {}
        if cfg.get("argv"):
            out["command"] = shlex.join(["e3pose", *cfg["argv"][1:]])
        with open(run / "metrics.csv") as f:
            out["epochs_run"] = sum(1 for _ in csv.DictReader(f))
        out["epochs_scheduled"] = cfg.get("options", {}).get("epochs")
        init = Path(prov["init"]) if prov.get("init") else None
        if init is not None and init.is_file():
            out["init_sha256"] = hashlib.sha256(init.read_bytes()).hexdigest()
    return out


def brief_refiner(ckpt):
    prov = ckpt["provenance"]
    return {"config": ckpt["config"], **{k: v for k, v in prov.items() if k != "history"}}


def held_out(per_case_csv, groups):
    rows = list(csv.DictReader(open(per_case_csv)))
    out = {}
    for name, prefix in [("all", "")] + list(groups.items()):
        sel = [r for r in rows if r["frame_id"].startswith(prefix)]
        ok = [r for r in sel if r["status"] == "ok"]
        # a refused volume counts as a failure in the success rates
        rot = np.array([float(r["rotation_error_deg"]) for r in ok])
        trans = np.array([float(r["translation_error_mm"]) for r in ok])
        out[name] = {
            "n_cases": len(sel), "n_failed": len(sel) - len(ok),
            "rotation_median_deg": round(float(np.median(rot)), 1) if len(rot) else None,
            "rotation_p95_deg": round(float(np.percentile(rot, 95)), 1) if len(rot) else None,
            "success_10deg": round(float(np.sum(rot <= 10) / max(1, len(sel))), 3),
            "success_30deg": round(float(np.sum(rot <= 30) / max(1, len(sel))), 3),
            "translation_median_mm": round(float(np.median(trans)), 2) if len(trans) else None,
            "translation_p95_mm": round(float(np.percentile(trans, 95)), 2) if len(trans) else None,
            "median_axis_errors_deg": {ax: round(float(np.median([float(r[f"err_{ax}_deg"]) for r in ok])), 1)
                                       for ax in ("ex", "ey", "ez")} if ok else None,
        }
    return out


def timings(pred_dir):
    per_stage = {}
    for f in sorted(Path(pred_dir).glob("*.json")):
        for k, v in json.loads(f.read_text()).get("timings_s", {}).items():
            per_stage.setdefault(k, []).append(float(v))
    out = {k: round(float(np.median(v)), 3) for k, v in per_stage.items()}
    if "total" in per_stage:
        out["p95_total"] = round(float(np.percentile(per_stage["total"], 95)), 3)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("runs", "eval", "eval_gt", "pred", "out"):
        p.add_argument(name, type=Path)
    p.add_argument("--notes", type=Path)
    p.add_argument("--groups", default='{"standard": "syn41_", "navigator_like": "syn42_"}',
                   help="held-out groups: name -> frame-id prefix (default: the recipe's test set, seeds 41 and 42)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    notes = json.loads(a.notes.read_text()) if a.notes else {}
    groups = json.loads(a.groups)
    cards = {}
    for kind in ("unet", "e3cnn"):
        run = a.runs / kind
        shutil.copy(run / "best.pt", a.out / f"{kind}.pt")
        shutil.copy(run / "metrics.csv", a.out / f"{kind}_metrics.csv")
        shutil.copy(run / "learning_curve.png", a.out / f"{kind}_learning_curve.png")
        cards[kind] = brief(torch.load(a.out / f"{kind}.pt", map_location="cpu", weights_only=True), run)
    nets = ["unet", "e3cnn"]
    if (a.runs / "refiner" / "refiner.pt").is_file():
        shutil.copy(a.runs / "refiner" / "refiner.pt", a.out / "refiner.pt")
        cards["refiner"] = brief_refiner(torch.load(a.out / "refiner.pt", map_location="cpu", weights_only=True))
        nets.append("refiner")
    if (a.runs / "residual" / "residual.pt").is_file():
        shutil.copy(a.runs / "residual" / "residual.pt", a.out / "residual.pt")
        cards["residual"] = brief_refiner(torch.load(a.out / "residual.pt", map_location="cpu", weights_only=True))
        nets.append("residual")
    if (a.runs / "judge" / "residual.pt").is_file():  # the frame judge: a residual network reading a wider view
        shutil.copy(a.runs / "judge" / "residual.pt", a.out / "judge.pt")
        cards["judge"] = brief_refiner(torch.load(a.out / "judge.pt", map_location="cpu", weights_only=True))
        nets.append("judge")
    shutil.copy(a.eval / "summary.json", a.out / "heldout_summary_full_pipeline.json")
    shutil.copy(a.eval_gt / "summary.json", a.out / "heldout_summary_gt_mask.json")
    card = {
        "name": a.out.name,
        **{k: notes[k] for k in ("variant", "training_data") if k in notes},
        "synthetic": True,
        **cards,
        "held_out_test": {
            "test_set": notes.get("test_set"),
            "full_pipeline": held_out(a.eval / "per_case.csv", groups),
            "e3cnn_with_ground_truth_brain_mask": held_out(a.eval_gt / "per_case.csv", groups),
            "inference_time_s_median_per_volume": timings(a.pred),
            "inference_hardware": notes.get("inference_hardware"),
        },
        **{k: v for k, v in notes.items() if k not in ("variant", "training_data", "test_set", "inference_hardware")},
        "files": {f"{k}.pt": (a.out / f"{k}.pt").stat().st_size for k in nets},
    }
    (a.out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card["held_out_test"], indent=1))


if __name__ == "__main__":
    main()
