"""The step loop of the refinement and residual trainers: batches drawn on the fly, Adam, a cosine-annealed rate.

Both networks train on unlimited draws from resampled cubes, so there are no epochs: the schedule runs over a step
count (``max_steps``: the same stopping point on any machine) or else a time budget. Every two minutes the loop writes
the native checkpoint that inference loads and ``last.pt`` (weights, optimiser, step, time, history) for ``resume``;
a resumed run draws from ``(seed, step)``, so it continues deterministically from where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

SAVE_EVERY_S = 120.0


def train(net, kind: str, out_dir, draw_batch: Callable, loss_of: Callable, *, minutes: float, seed: int, lr: float,
          provenance: Dict, max_steps: Optional[int] = None, resume=None, log=print, log_every: int = 200,
          describe: Callable[[Dict[str, float]], str] = lambda stats: "") -> Path:
    """Train ``net`` (built and seeded by the caller) and return ``out_dir / f"{kind}.pt"``.

    ``draw_batch(rng) -> (x, y)`` tensors; ``loss_of(out, y) -> (loss, stats)``, where ``stats`` are extra numbers per
    step, averaged into the history and the log line (``describe`` formats them). ``provenance``: what the native
    checkpoint records besides the step, time and history written here.
    """
    import torch

    from ..checkpoints import save_native

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    step, elapsed0, history = 0, 0.0, []
    if resume and Path(resume).is_file():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed0 = int(state["step"]), float(state["elapsed_s"])
        history = list(state.get("history", []))
        rng = np.random.default_rng([seed, step])
    t0 = time.perf_counter()
    budget = minutes * 60.0
    last_save = t0
    net.train()
    losses, stats = [], {}

    def elapsed():
        return elapsed0 + time.perf_counter() - t0

    def save():
        seconds = elapsed()
        prov = dict(provenance, steps=step, lr=lr, seed=seed, training_time_s=seconds, history=history[-50:])
        save_native(out_dir / f"{kind}.pt", net.eval(), kind, prov)
        torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "elapsed_s": seconds, "history": history}, out_dir / "last.pt")
        (out_dir / "history.json").write_text(json.dumps(history))
        net.train()

    def progress():
        return step / max_steps if max_steps else elapsed() / budget

    while progress() < 1.0:
        x, y = draw_batch(rng)
        for g in opt.param_groups:
            g["lr"] = float(lr * 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress()))))
        out = net(x)
        loss, step_stats = loss_of(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        for k, v in step_stats.items():
            stats.setdefault(k, []).append(v)
        step += 1
        if step % log_every == 0:
            means = {k: float(np.mean(v)) for k, v in stats.items()}
            history.append({"step": step, "loss": float(np.mean(losses)), **means, "elapsed_s": elapsed()})
            log(f"step {step} loss {np.mean(losses):.4f}{describe(means)} ({history[-1]['elapsed_s'] / 60:.1f} min)")
            losses, stats = [], {}
        if time.perf_counter() - last_save > SAVE_EVERY_S:
            save()
            last_save = time.perf_counter()
    save()
    return out_dir / f"{kind}.pt"


def draw_stack(cubes, batch: int, rng, draw_one: Callable[[tuple, int, object], Tuple[np.ndarray, np.ndarray]]):
    """``batch`` samples, each from a cube chosen at random: ``draw_one(cube, i, rng)`` -> (x, y); stacked arrays."""
    xs, ys = [], []
    for i in range(batch):
        x, y = draw_one(cubes[int(rng.integers(len(cubes)))], i, rng)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)
