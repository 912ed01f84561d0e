"""Fine-tune the residual network or the frame judge on a GPU on phantoms made on the fly (written in session 33;
not yet run on a GPU: no lease since session 27).

Why: the refined pose's remaining tails (issue 8: the 95th percentile) are navigator-like heads under about 28
weeks, and its failures on unusual contrasts come from the refinement's networks (sessions 32-33). The residual
network and the judge decide those, and each trained on the CPU on about 600 phantoms. Here CPU worker processes run
``e3pose synth``'s generator with a recipe weighted to those heads, resample each phantom into the cube
``train-residual`` resamples from files (``phantom_cube``: its canonical frame, about the brain centre moved by a
U-Net-like error) and draw from it as that trainer draws (``residual_trainer.draw_sample`` + ``random_contrast``: a
random residual turn, centre and size error, warp, mirror, any contrast; far-off frames for the pose logit). The
GPU trains on a buffer of the newest phantoms' draws; every improvement of the selection loss is saved at once, so a
run stopped early leaves its best weights. The network's kind and view come from ``--init``: the bundled
``residual.pt`` (3.2 radii) or ``judge.pt`` (6 radii, pose logit).

    M=E3PoseLogic/data/models/default
    E3POSE_SEED_BASE=7500 python Resources/training/gpu_residual_stream.py --init $M/residual.pt \\
        --out runs/residual_gpu --minutes 6

Seeds 7500-7504 (training) and 7590-7593 (selection) were never used by any other run of this project.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_unet_stream as unet_stream  # noqa: E402  (synth_config, recipe_draws, the pool and its buffer)

SEED_BASE = int(os.environ.get("E3POSE_SEED_BASE", "7500"))
_VARIED = dict(deform=5.0, anatomy=True)
# (share, SynthConfig options): weighted to where the refined pose fails (navigator-like, young, unusual contrast)
RECIPES = (
    (0.15, dict()),
    (0.15, dict(navigator=True)),
    (0.20, dict(_VARIED, random_contrast=0.5)),
    (0.25, dict(_VARIED, navigator=True, random_contrast=0.5)),
    (0.25, dict(_VARIED, navigator=True, random_contrast=0.5, ga=(20.0, 28.0))),
)
VAL_SETS = ((7590, 24, dict()), (7591, 24, dict(navigator=True)), (7592, 24, dict(_VARIED, random_contrast=0.5)),
            (7593, 24, dict(_VARIED, navigator=True, random_contrast=0.5, ga=(20.0, 28.0))))
CENTRE_SD_MM = 2.0  # the cube's centre error, as ``residual_trainer.prepare``


# ------------------------------------------------------------------------------------------------ cases
def phantom_cube(case, cfg, err):
    """(cube, spacing, radius, err) of one ``synth.make_case`` phantom: what ``residual_trainer.prepare`` makes of
    the same phantom read from its files, with the same centre error ``err`` (canonical mm); None without a brain."""
    from E3PoseLogic.training.refiner_trainer import canonical_cube
    from E3PoseLogic.training.residual_trainer import train_cube

    brain = np.rint(case.label) == 1
    if brain.sum() < 8:
        return None
    aff = np.asarray(case.affine, np.float64)
    cube, sp, radius = canonical_cube(np.asarray(case.image, np.float32), aff, brain, aff, case.rotation_voxel,
                                      train_cube(cfg), err)
    return cube, sp, radius, np.asarray(err, np.float64)


def residual_case(job):
    """One phantom -> (right inputs float16 [K, S, S, S], their targets [K, 6], far-off-frame inputs [W, S, S, S],
    tag), or None when the phantom has no brain. Deterministic per (seed, index)."""
    seed, index, opts, cfg_dict, n_right, n_wrong = job
    from E3PoseLogic.networks.residual import ResidualConfig
    from E3PoseLogic.residual import input_ball
    from E3PoseLogic.synth import make_case
    from E3PoseLogic.training.residual_trainer import draw_sample, random_contrast

    cfg = ResidualConfig(**cfg_dict)
    rng = np.random.default_rng([int(seed), int(index)])
    cube = phantom_cube(make_case(int(seed), int(index), unet_stream.synth_config(opts)), cfg,
                        rng.normal(0.0, CENTRE_SD_MM, 3))
    if cube is None:
        return None
    ball = input_ball(cfg)

    def draws(n, wrong):
        out = [draw_sample(*cube, cfg, rng, wrong=wrong) for _ in range(n)]
        xs = np.stack([random_contrast(x, rng, ball) for x, _ in out]).astype(np.float16)
        return xs, np.stack([y for _, y in out]).astype(np.float32)

    right_x, right_y = draws(n_right, False)
    wrong_x, _ = draws(n_wrong, True) if n_wrong else (np.zeros((0,) + right_x.shape[1:], np.float16), None)
    return right_x, right_y, wrong_x, f"{seed}_{index}"


def _config_of(path):
    from dataclasses import asdict

    from E3PoseLogic.checkpoints import load_residual

    return asdict(load_residual(path)[0].config)


# ------------------------------------------------------------------------------------------------ training
def batch_of(buffer, rng, batch, n_wrong, device):
    """A batch as the CPU trainer's: ``n_wrong`` far-off frames first, then right draws, from random buffered
    phantoms."""
    import torch

    xs, ys = [], []
    for k in rng.integers(len(buffer), size=n_wrong):
        w = buffer[k][2]
        xs.append(w[rng.integers(len(w))])
    for k in rng.integers(len(buffer), size=batch - n_wrong):
        j = rng.integers(len(buffer[k][0]))
        xs.append(buffer[k][0][j])
        ys.append(buffer[k][1][j])
    x = torch.from_numpy(np.stack(xs).astype(np.float32))[:, None].to(device)
    y = torch.from_numpy(np.stack(ys)).to(device)
    return x, y


def loss_of(out, y, n_wrong, pose_logit):
    """The CPU trainer's loss (``residual_trainer.train``): smooth L1 on the right draws' targets, plus the pose
    logit's cross-entropy (far-off frames 0, right ones 1)."""
    import torch

    loss = torch.nn.functional.smooth_l1_loss(out[n_wrong:, :6], y)
    if pose_logit:
        label = torch.cat([torch.zeros(n_wrong), torch.ones(out.shape[0] - n_wrong)]).to(out.device)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out[:, 6], label)
    return loss


def evaluate(net, val, pose_logit, device):
    """Selection: the loss over every selection draw (right and far-off), the median rotation left on the right
    draws (deg) and, with the pose logit, the share of draws on the wrong side of 0."""
    import torch

    from E3PoseLogic.residual import ROTVEC_UNIT

    net.eval()
    left, logits, labels, losses = [], [], [], []
    with torch.no_grad():
        for right_x, right_y, wrong_x, _ in val:
            x = torch.from_numpy(np.concatenate([wrong_x, right_x]).astype(np.float32))[:, None].to(device)
            out = net(x).float()
            y = torch.from_numpy(right_y).to(device)
            losses.append(float(loss_of(out, y, len(wrong_x), pose_logit)))
            left += (np.degrees(ROTVEC_UNIT * (out[len(wrong_x):, :3] - y[:, :3]).norm(dim=1).cpu().numpy())).tolist()
            if pose_logit:
                logits += out[:, 6].cpu().tolist()
                labels += [0] * len(wrong_x) + [1] * len(right_x)
    net.train()
    r = {"loss": float(np.mean(losses)), "median_left_deg": float(np.median(left)),
         "p90_left_deg": float(np.percentile(left, 90))}
    if pose_logit:
        r["logit_wrong_side"] = float(np.mean((np.asarray(logits) > 0) != (np.asarray(labels) > 0)))
    return r


def provenance_of(a, info, seen, steps, device, start_val, best_val):
    import torch

    recipe = "; ".join(f"{int(s * 100)} % {o or 'plain'}" for s, o in RECIPES)
    sel = ", ".join(f"{s}{'n' if o.get('navigator') else ''} ({n})" for s, n, o in VAL_SETS)
    return {
        "trained_on": (f"synthetic fetal heads drawn on the fly (e3pose synth's generator, seeds {SEED_BASE}-"
                       f"{SEED_BASE + len(RECIPES) - 1}, one per recipe: {recipe}); {seen} phantoms, {a.draws} "
                       f"draws each (+ {a.wrong_draws} far-off frames); selection: seeds {sel}, by the loss"),
        "init": str(a.init), "init_trained_on": info.get("trained_on"), "steps": steps, "batch_size": a.batch,
        "optimizer": "adam", "lr": a.lr, "lr_schedule": f"cosine over {a.minutes} min", "buffer_phantoms": a.buffer,
        "phantoms_seen": seen, "start_val": start_val, "best_val": best_val,
        "hardware": {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                     "torch": str(torch.__version__), "cpu_workers": a.workers},
        "draws": "residual_trainer.draw_sample + random_contrast (the CPU trainer's)",
        "git_commit": os.environ.get("E3POSE_COMMIT", ""), "script": "Resources/training/gpu_residual_stream.py",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def train(a):
    pool, cfg = unet_stream.pool_reading(a.workers, _config_of, a.init)
    draws = (cfg, a.draws, a.wrong_draws if cfg.get("pose_logit") else 0)  # far-off frames train the pose logit
    val_jobs = [(s, i, o) + draws
                for s, n, o in VAL_SETS for i in range(min(n, a.val_per_set) if a.val_per_set else n)]
    val_res = pool.map_async(residual_case, val_jobs, chunksize=2)
    jobs = ((s, i, o) + draws for s, i, o in unet_stream.recipe_draws(SEED_BASE, RECIPES))
    stream = pool.imap_unordered(residual_case, jobs, chunksize=1)

    import torch

    from E3PoseLogic.checkpoints import load_residual, save_native

    net, info = load_residual(a.init)
    pose_logit = bool(net.config.pose_logit)
    n_wrong = int(round(a.batch * a.wrong_fraction)) if pose_logit else 0
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    val = [c for c in val_res.get() if c is not None]
    cases = unet_stream.StreamBuffer(stream, a.buffer)
    cases.fill(a.start_cases)
    start = evaluate(net, val, pose_logit, device)
    print(f"start ({len(val)} selection phantoms, {len(cases.items)} phantoms after {time.perf_counter() - t0:.0f} s):"
          f" {start}", flush=True)
    best = (0, start)
    save_native(out / "residual.pt", net, "residual", provenance_of(a, info, cases.seen, 0, device, start, start))
    log = open(out / "log.csv", "w")
    log.write("step,seconds,phantoms_seen,train_loss," + ",".join(start) + "\n")
    rng = np.random.default_rng(a.seed)
    budget, losses = a.minutes * 60.0, []
    t_train, step, last_val = time.perf_counter(), 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t_train
        done = elapsed >= budget or (a.max_steps and step >= a.max_steps)
        if done or time.perf_counter() - last_val >= a.val_every:
            r = evaluate(net, val, pose_logit, device)
            better = r["loss"] < best[1]["loss"]
            if better:  # atomic: a stop leaves a whole file
                best = (step, r)
                save_native(out / "residual.pt", net, "residual",
                            provenance_of(a, info, cases.seen, step, device, start, r))
            print(f"step {step} {elapsed:.0f} s, {cases.seen} phantoms, train loss "
                  f"{np.mean(losses) if losses else float('nan'):.4f}{' *' if better else ''}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
            log.write(f"{step},{elapsed:.1f},{cases.seen},{np.mean(losses) if losses else float('nan'):.5f},"
                      + ",".join(f"{r.get(k, float('nan')):.5f}" for k in start) + "\n")
            log.flush()
            losses, last_val = [], time.perf_counter()
            if done:
                break
        cases.pull()
        for g in opt.param_groups:
            g["lr"] = a.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / budget)))
        x, y = batch_of(cases.items, rng, a.batch, n_wrong, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            o = net(x)
        loss = loss_of(o.float(), y, n_wrong, pose_logit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    pool.terminate()
    summary = {"start_val": start, "best_step": best[0], "best_val": best[1], "steps": step,
               "phantoms_seen": cases.seen}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{step} steps, {cases.seen} phantoms; best: {summary}", flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", required=True, help="the residual network or frame judge to start from (native)")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--wrong-fraction", type=float, default=0.25, help="far-off frames per batch (pose logit only)")
    p.add_argument("--draws", type=int, default=16, help="right draws per phantom")
    p.add_argument("--wrong-draws", type=int, default=6, help="far-off-frame draws per phantom (pose logit only)")
    p.add_argument("--buffer", type=int, default=600, help="phantoms kept (the newest)")
    p.add_argument("--start-cases", type=int, default=32)
    p.add_argument("--val-every", type=float, default=30.0)
    p.add_argument("--val-per-set", type=int, default=0, help="selection phantoms per set (0: all; quick checks)")
    p.add_argument("--seed", type=int, default=33)
    p.add_argument("--device", default="cuda")
    return train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
