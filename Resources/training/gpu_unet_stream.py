"""Train the segmentation U-Net on a GPU from phantoms made on the fly (how the bundled U-Net's last two phases ran).

Why: the U-Net bundled before session 26 had seen about 4,500 training draws on a 2-core CPU (brain Dice 0.86 on the
held-out set, 0.75 on the real-anatomy transfer set), and its mask places the E3-CNN's crop: with the true mask the
E3-CNN alone is 9.9 deg median / 4.5 % above 60 on the held-out set, with that U-Net's 11.0 deg / 17 %. A GPU runs
this small U-Net (64^3 at 6 mm, 8 features) faster than phantoms can be drawn, so every draw is a new phantom: CPU
worker processes run ``synth.make_case`` and the inference preprocessing (``preprocess.unet_input``, labels nearest
onto that grid, as ``training.data.unet_case`` does from files), the GPU trains on a buffer of the newest cases.
The phantom seeds start at ``$E3POSE_SEED_BASE`` (default 7000), one seed per recipe.

    E3POSE_SEED_BASE=7000 python Resources/training/gpu_unet_stream.py train \
        --init Resources/training/init/unet_phase2.pt --out runs/unet_gpu1 --minutes 5.2 --lr 7e-4
    python Resources/training/gpu_unet_stream.py bench -- --variant default --device cuda --repeats 20 --startup-runs 0
    python Resources/training/gpu_unet_stream.py curve metrics.csv curve.png runs/unet_gpu1/log.csv ...

``--scipy-resample`` (train, bench) replaces SimpleITK's resampling by ``scipy_resample_to_grid``, which gives
the same values (Testing/test_gpu_unet_stream.py compares them): for machines where
SimpleITK cannot be installed (the GPU machine of this project could not carry its 53 MB wheel).
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

# ------------------------------------------------------------------------------------------------ data recipe
# (share, SynthConfig options): the mix of the bundled E3-CNN's last phase, plus random contrast on some varied
# heads (issue 11: transfer). Seeds from SEED_BASE on were never used by any other run of this project.
RECIPES = (
    (0.25, dict()),                                                   # plain, standard protocol
    (0.15, dict(navigator=True)),                                     # plain, navigator-like
    (0.30, dict(deform=5.0, anatomy=True, random_contrast=0.2)),      # varied anatomy, standard
    (0.20, dict(deform=5.0, anatomy=True, navigator=True)),           # varied, navigator-like
    (0.10, dict(deform=5.0, anatomy=True, navigator=True, ga=(20.0, 27.0))),  # varied, navigator-like, young
)
SEED_BASE = int(os.environ.get("E3POSE_SEED_BASE", "7000"))
# selection set: the bundled U-Net's phase-2 selection set (seeds 31, 32n, varied 63, 64n: 84 volumes)
VAL_SETS = ((31, 24, dict()), (32, 24, dict(navigator=True)), (63, 24, dict(deform=5.0, anatomy=True)),
            (64, 12, dict(deform=5.0, anatomy=True, navigator=True)))
SPACING, SIZE = 6.0, 64


def synth_config(opts):
    from E3PoseLogic.synth import AcquisitionConfig, SynthConfig, Variation

    acq = AcquisitionConfig(navigator=bool(opts.get("navigator", False)))
    var = Variation(random_contrast=float(opts.get("random_contrast", 0.0)), deform_mm=float(opts.get("deform", 0.0)),
                    anatomy=bool(opts.get("anatomy", False)))
    return SynthConfig(ga_range=tuple(opts.get("ga", (20.0, 38.0))), acquisition=acq, val_fraction=0.0,
                       variation=var)


# ------------------------------------------------------------------------------------------------ resampling
def scipy_resample_to_grid(array, ijk_to_ras, target_ijk_to_ras, target_shape, order=1, default=0.0):
    """``preprocess.resample_to_grid`` without SimpleITK: the same rule (points within half a voxel outside the
    source are clamped to its border, farther ones get ``default``), linear or nearest."""
    from scipy import ndimage

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    shape = tuple(int(s) for s in target_shape)
    m = np.linalg.inv(np.asarray(ijk_to_ras, np.float64)) @ np.asarray(target_ijk_to_ras, np.float64)
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    src = m[:3, :3] @ idx + m[:3, 3:4]
    n = np.asarray(a.shape, np.float64)[:, None]
    inside = np.all((src >= -0.5) & (src <= n - 0.5), axis=0)
    if int(order) == 0:
        src = np.floor(src + 0.5)  # ITK's nearest neighbour rounds half up
    elif int(order) != 1:
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), not {order}")
    src = np.clip(src, 0, n - 1)
    vals = ndimage.map_coordinates(a.astype(np.float64) if order else a, src, order=int(order), mode="nearest")
    vals = np.where(inside, vals, default)
    return vals.reshape(shape).astype(a.dtype)


def use_scipy_resample():
    """Route every caller of ``preprocess.resample_to_grid`` (some import the name) to the scipy version."""
    import importlib

    for name in ("E3PoseLogic.preprocess", "E3PoseLogic.pipeline", "E3PoseLogic.crop", "E3PoseLogic.training.data"):
        mod = importlib.import_module(name)
        mod.resample_to_grid = scipy_resample_to_grid


# ------------------------------------------------------------------------------------------------ cases
def unet_case(job):
    """(x float16 64^3 in [0, 1], labels uint8, tag) for one phantom, as ``training.data.unet_case`` from files."""
    seed, index, opts, scipy_resample = job
    if scipy_resample:
        use_scipy_resample()
    _, x, y = phantom_on_grid(seed, index, opts)
    return x.astype(np.float16), y, f"{seed}_{index}"


def phantom_on_grid(seed, index, opts):
    """-> (SynthCase, U-Net input float32, labels uint8 nearest onto that grid): one phantom as inference and
    ``training.data.unet_case`` (from files) put it on the U-Net grid (also ``gpu_e3cnn_stream.py``'s cases)."""
    from E3PoseLogic import preprocess
    from E3PoseLogic.synth import make_case

    c = make_case(int(seed), int(index), synth_config(opts))
    x, grid = preprocess.unet_input(c.image.astype(np.float32), c.affine, SPACING, SIZE)
    y = preprocess.resample_to_grid(np.rint(c.label).astype(np.uint8), c.affine, grid, x.shape, order=0)
    return c, x, y.astype(np.uint8)


def recipe_draws(seed_base, recipes=RECIPES):
    """An endless stream of (seed, index, SynthConfig options) in the proportions of ``recipes`` ((share, options)
    pairs; one seed per recipe from ``seed_base``, indices counting up)."""
    shares = np.cumsum([s for s, _ in recipes])
    rng = np.random.default_rng(seed_base)
    counters = [0] * len(recipes)
    while True:
        k = int(np.searchsorted(shares, rng.random() * shares[-1]))
        yield seed_base + k, counters[k], recipes[k][1]
        counters[k] += 1


def training_jobs(scipy_resample):
    return ((seed, index, opts, scipy_resample) for seed, index, opts in recipe_draws(SEED_BASE))


def _as_text_on_error(fn, arg):
    try:
        return fn(arg), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def pool_reading(workers, config_of, path):
    """(a fork pool, ``config_of(path)`` read in it) for the streamers that start from a checkpoint; one the reader
    refuses stops the run with the reader's message (it names the file). The pool is forked before this process
    imports torch; the error comes back as text because an exception that cannot be unpickled (a checkpoint
    error) leaves the pool waiting for ever."""
    import multiprocessing as mp

    pool = mp.get_context("fork").Pool(workers)
    cfg, problem = pool.apply(_as_text_on_error, (config_of, path))
    if problem:
        pool.terminate()
        raise SystemExit(f"error: {problem}")
    return pool, cfg


class StreamBuffer:
    """The newest ``size`` cases of a worker pool's ``imap_unordered`` stream, which the GPU samples from while the
    workers make more; a None from the stream (a phantom without a usable case) is skipped."""

    def __init__(self, stream, size):
        self.stream, self.size, self.items, self.seen = stream, int(size), [], 0

    def pull(self, block=False):
        """Take what the workers have finished (``block``: wait for at least one)."""
        import multiprocessing as mp

        while True:
            try:
                item = self.stream.next(timeout=None if block else 0.0)
            except mp.TimeoutError:
                return
            if item is not None:
                self.items.append(item)
                self.seen += 1
                if len(self.items) > self.size:
                    self.items.pop(0)
            block = False

    def fill(self, n):
        while len(self.items) < n:
            self.pull(True)


def val_jobs(scipy_resample):
    return [(s, i, o, scipy_resample) for s, n, o in VAL_SETS for i in range(n)]


# ------------------------------------------------------------------------------------------------ training
METRICS = ("dice_mean", "dice_median", "dice_p10", "centre_median_mm", "centre_p90_mm", "share_centre_above_4mm")


def inputs(cases, device):
    """The U-Net input batch [N, 1, 64, 64, 64] float32 of (x, labels, tag) cases."""
    import torch

    return torch.from_numpy(np.stack([c[0] for c in cases]).astype(np.float32))[:, None].to(device)


def evaluate(model, val, device):
    """Brain Dice of the inference mask (thresholds + largest component) and its centre-of-mass error (mm)."""
    import torch

    from E3PoseLogic.segmentation import brain_and_eyes
    from E3PoseLogic.training.losses import hard_dice

    model.eval()
    dice, centre = [], []
    with torch.no_grad():
        for i in range(0, len(val), 16):
            post = torch.softmax(model(inputs(val[i:i + 16], device)).float(), 1).cpu().numpy()
            for p, (_, y, _) in zip(post, val[i:i + 16]):
                brain, _ = brain_and_eyes(p)
                truth = (y == 1)
                dice.append(hard_dice(brain.astype(np.int64), truth.astype(np.int64), 1))
                if brain.any():
                    d = np.argwhere(brain).mean(0) - np.argwhere(truth).mean(0)
                    centre.append(float(np.linalg.norm(d) * SPACING))
                else:
                    centre.append(float("inf"))
    model.train()
    c = np.asarray(centre)
    return {"dice_mean": float(np.mean(dice)), "dice_median": float(np.median(dice)),
            "dice_p10": float(np.percentile(dice, 10)), "centre_median_mm": float(np.median(c)),
            "centre_p90_mm": float(np.percentile(c, 90)), "share_centre_above_4mm": float(np.mean(c > 4))}


def train(a):
    import multiprocessing as mp

    # the pool first: forked before torch touches the GPU
    ctx = mp.get_context("fork")
    pool = ctx.Pool(a.workers)
    val_res = pool.map_async(unet_case, val_jobs(a.scipy_resample), chunksize=2)
    stream = pool.imap_unordered(unet_case, training_jobs(a.scipy_resample), chunksize=1)

    import torch

    from E3PoseLogic.checkpoints import load_unet, save_native
    from E3PoseLogic.training.losses import unet_loss
    from E3PoseLogic.training.unet_trainer import recalibrate_batchnorm

    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    model, info = load_unet(a.init)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    t0 = time.perf_counter()
    val = val_res.get()
    cases = StreamBuffer(stream, a.buffer)
    buffer = cases.items
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.csv", "w")
    log.write(",".join(("step", "seconds", "cases_seen", "lr", "loss") + METRICS) + "\n")

    cases.fill(a.start_cases)
    base = evaluate(model, val, device)
    print(f"start ({len(buffer)} cases after {time.perf_counter() - t0:.0f} s): {base}", flush=True)
    log.write(f"0,{time.perf_counter() - t0:.1f},{cases.seen},0,nan,"
              + ",".join(f"{base[k]:.5f}" for k in METRICS) + "\n")
    best = (base["dice_mean"], 0, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, base)
    rng = np.random.default_rng(a.seed)
    budget = a.minutes * 60.0
    t_train, step, last_val, losses = time.perf_counter(), 0, time.perf_counter(), []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                          enabled=False)
    while True:
        elapsed = time.perf_counter() - t_train
        done = elapsed >= budget or (a.max_steps and step >= a.max_steps)
        if done or time.perf_counter() - last_val >= a.val_every:
            clean = [buffer[k] for k in rng.choice(len(buffer), min(64, len(buffer)), replace=False)]
            recalibrate_batchnorm(model, (inputs(clean[i:i + 16], device) for i in range(0, len(clean), 16)))
            r = evaluate(model, val, device)
            lr_now = opt.param_groups[0]["lr"]
            print(f"step {step} {elapsed:.0f} s, {cases.seen} phantoms, lr {lr_now:.2e}, "
                  f"loss {np.mean(losses):.4f}: {r}", flush=True)
            log.write(f"{step},{elapsed:.1f},{cases.seen},{lr_now:.3e},{np.mean(losses):.5f},"
                      + ",".join(f"{r[k]:.5f}" for k in METRICS) + "\n")
            log.flush()
            losses = []
            if r["dice_mean"] > best[0]:
                best = (r["dice_mean"], step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, r)
                torch.save({"step": step, "val": r, "state_dict": best[2]}, out / "best_state.pt")  # if stopped
            last_val = time.perf_counter()
            if done:
                break
        cases.pull()
        lr = a.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / budget)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(len(buffer), size=a.batch)
        x = inputs([buffer[k] for k in idx], device)
        y = torch.from_numpy(np.stack([buffer[k][1] for k in idx]).astype(np.int64)).to(device)
        with autocast:
            logits = model(x)
        loss = unet_loss(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    pool.terminate()
    model.load_state_dict(best[2])
    model = model.cpu()
    recipe = "; ".join(f"{int(s * 100)} % {o or 'plain'}" for s, o in RECIPES)
    provenance = {
        "trained_on": (f"synthetic fetal heads drawn on the fly (e3pose synth's generator, seeds {SEED_BASE}-"
                       f"{SEED_BASE + len(RECIPES) - 1}, one per recipe: {recipe}); {cases.seen} phantoms; selection: "
                       "seeds 31, 32n, varied 63, 64n (84)"),
        "kind": "unet", "init": str(a.init), "init_trained_on": info.get("trained_on"),
        "steps": step, "batch_size": a.batch, "optimizer": "adam", "lr": a.lr,
        "lr_schedule": f"cosine over {a.minutes} min", "buffer_cases": a.buffer, "phantoms_seen": cases.seen,
        "best_step": best[1], "best_val": best[3], "start_val": base, "training_time_s": round(budget, 1),
        "hardware": {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                     "torch": str(torch.__version__), "cpu_workers": a.workers},
        "amp": "bf16 autocast" if device.type == "cuda" else "none",
        "loss": "class-weighted cross-entropy (1, 8, 2) + 0.5 soft Dice", "augmentation": "none (every draw a new phantom)",
        "resampling": "scipy_resample_to_grid (SimpleITK's rule)" if a.scipy_resample else "SimpleITK",
        "git_commit": os.environ.get("E3POSE_COMMIT", ""), "script": "Resources/training/gpu_unet_stream.py",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    save_native(out / "unet.pt", model, "unet", provenance=provenance)
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    print(f"best step {best[1]}: {best[3]}; wrote {out / 'unet.pt'}", flush=True)
    return 0


def _text_itk_transform(path, to_parent_ras, atomic=True):
    """ITK's text transform format written by hand (SimpleITK absent): the same numbers as
    ``frames.write_itk_transform``; only the benchmark's output-writing row uses it."""
    from E3PoseLogic import frames

    m = frames.LPS_FROM_RAS @ np.linalg.inv(np.asarray(to_parent_ras, np.float64)) @ frames.LPS_FROM_RAS
    params = " ".join(f"{v:.17g}" for v in list(m[:3, :3].ravel()) + list(m[:3, 3]))
    Path(path).write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                          f"Parameters: {params}\nFixedParameters: 0 0 0\n")
    return Path(path)


def bench(a, rest):
    if a.scipy_resample:
        use_scipy_resample()
        from E3PoseLogic import frames

        frames.write_itk_transform = _text_itk_transform
    from E3PoseLogic.cli import main

    return main(["benchmark"] + rest)


def curve(a):
    """The GPU phases' validation log (several log.csv, in order) as one CSV and one picture."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, offset = [], 0.0
    for phase, path in enumerate(a.logs, 1):
        part = list(csv.DictReader(open(path)))
        for r in part:
            rows.append({"phase": phase, "minutes": round((offset + float(r["seconds"])) / 60.0, 3), **r})
        offset += max(float(r["seconds"]) for r in part)
    with open(a.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    t = [r["minutes"] for r in rows]
    ax[0].plot(t, [float(r["dice_mean"]) for r in rows], "o-", label="mean")
    ax[0].plot(t, [float(r["dice_p10"]) for r in rows], "s-", label="10th percentile")
    ax[0].set(xlabel="GPU minutes", ylabel="brain Dice (inference mask)", title="selection set (84)")
    ax[1].plot(t, [float(r["centre_median_mm"]) for r in rows], "o-", label="median")
    ax[1].plot(t, [float(r["centre_p90_mm"]) for r in rows], "s-", label="90th percentile")
    ax[1].set(xlabel="GPU minutes", ylabel="brain centre error (mm)", title="selection set (84)")
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
        for k in range(1, len(a.logs)):
            x.axvline(min(r["minutes"] for r in rows if r["phase"] == k + 1), color="grey", ls=":")
    fig.suptitle("U-Net GPU phases (step 0 of each: its start; dotted: phase 2 starts from phase 1's best)")
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--init", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=7.0)
    t.add_argument("--max-steps", type=int, default=0)
    t.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--buffer", type=int, default=3000)
    t.add_argument("--start-cases", type=int, default=64)
    t.add_argument("--val-every", type=float, default=45.0)
    t.add_argument("--seed", type=int, default=26)
    t.add_argument("--device", default="cuda")
    t.add_argument("--scipy-resample", action="store_true")
    g = sub.add_parser("curve")
    g.add_argument("csv")
    g.add_argument("png")
    g.add_argument("logs", nargs="+")
    b = sub.add_parser("bench")
    b.add_argument("--scipy-resample", action="store_true")
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        k = argv.index("--")
        argv, rest = argv[:k], argv[k + 1:]
    a = p.parse_args(argv)
    if a.cmd == "train":
        return train(a)
    if a.cmd == "curve":
        return curve(a)
    return bench(a, rest)


if __name__ == "__main__":
    sys.exit(main())
