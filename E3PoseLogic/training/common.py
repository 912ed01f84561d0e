"""The training loop shared by both networks: devices, seeds, distributed runs, checkpoints, metrics, resume.

A ``Task`` (see ``unet_trainer`` / ``e3cnn_trainer``) supplies the model, the draw dataset, the loss of a batch and
the validation; ``fit`` does the rest. Checkpoints are native files (``checkpoints.save_native``), so ``best.pt``
and ``last.pt`` load directly into ``e3pose infer``; ``last.pt`` also carries the optimiser state for ``--resume``.

Several GPUs: launch with ``torchrun --nproc_per_node N e3pose-train ...`` (or ``python -m E3PoseLogic train-...``).
With WORLD_SIZE > 1 each process trains a DistributedDataParallel replica on its own interleaved share of the
draws (``steps_per_epoch`` counts global steps, each process does them with its own batch); only rank 0 validates
and writes files. Deliberately simple, and not run in the project's CPU-only CI.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoints import save_native
from ..pipeline import resolve_device

BEST, LAST = "best.pt", "last.pt"


# ------------------------------------------------------------------------------------------------- environment
class Dist:
    """World size / rank from torchrun's environment; a no-op for one process."""

    def __init__(self, device_name):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name, self.local_rank)
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def wrap(self, model, find_unused=False):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused)

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def seed_everything(seed, rank=0):
    import random

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + rank)


@functools.lru_cache(maxsize=1)
def git_commit():
    """HEAD of the source checkout (with '-dirty' when modified), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device):
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def autocast(device, enabled):
    """bf16 autocast on GPUs that support it (no scaler needed), fp16 otherwise; bf16 on CPU (slower there than
    float32 on most CPUs, but it lets the mixed-precision path be tested without a GPU)."""
    if not enabled:
        return nullcontext(), None
    if device.type != "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


# ------------------------------------------------------------------------------------------------- records
def write_metrics(path, rows):
    if not rows:
        return
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in keys})
    os.replace(tmp, path)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read_metrics(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v


def plot_curves(path, rows, extra_keys, title):
    """Learning curve PNG: losses on the left, the validation metric(s) on the right (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "-o")):
        vals = [r.get(key) for r in rows]
        if any(isinstance(v, (int, float)) for v in vals):
            axes[0].plot(ep, vals, style, label=key, markersize=3)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for key in extra_keys:
        vals = [r.get(key) for r in rows]
        if any(isinstance(v, (int, float)) for v in vals):
            axes[1].plot(ep, vals, "-o", label=key, markersize=3)
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- optimiser
def make_optimizer(model, name, lr, weight_decay, momentum=0.99):
    params = [p for p in model.parameters() if p.requires_grad and p.numel() > 0]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimiser {name!r}")


# ------------------------------------------------------------------------------------------------- loop
def select_name(args) -> str:
    """--select of this run ("loss" where the trainer has no such option)."""
    return getattr(args, "select", None) or "loss"


def selection(task, args):
    """-> (--select name, validation key, sign): ``best.pt`` is the epoch with the lowest ``sign * row[key]``.

    Why not always the loss: a U-Net trained with the intensity chain is validated on clean volumes, where its
    cross-entropy can rise while its masks get better (session 16), so it is chosen on Dice instead."""
    name = select_name(args)
    choices = getattr(task, "select_metrics", {"loss": ("val_loss", 1.0)})
    if name not in choices:
        raise ValueError(f"--select {name}: this network is chosen on one of {', '.join(choices)}")
    key, sign = choices[name]
    return name, key, sign


def fit(task, args, dist: Dist):
    """Train ``task`` for ``args.epochs`` epochs of ``args.steps_per_epoch`` steps; returns the metrics rows."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    out = Path(args.outdir)
    device = dist.device
    model = task.model.to(device)
    opt = make_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    if getattr(args, "init", None) and not (args.resume and (out / LAST).is_file()):
        init_weights(model, args.init, task.kind)
        if dist.main:
            print(f"initialised from {args.init}", file=sys.stderr)
    rows, start_epoch, best, best_epoch, elapsed0 = [], 0, math.inf, None, 0.0
    select, select_key, select_sign = selection(task, args)
    if args.resume:
        state = resume_state(out / LAST, model, opt, kind=task.kind)
        if state is not None and state["select"] != select:
            raise RuntimeError(f"{out / LAST} chose its best epoch on --select {state['select']}; resume with the "
                               f"same --select (not {select}) or start a new run")
        if state is not None:
            start_epoch, best, best_epoch, elapsed0 = state["epoch"], state["best_val"], state["best_epoch"], \
                state["elapsed_s"]
            rows = [r for r in read_metrics(out / "metrics.csv") if int(r["epoch"]) <= start_epoch]
            if dist.main:
                print(f"resumed from {out / LAST} at epoch {start_epoch} (best epoch {best_epoch}, chosen on "
                      f"{select})", file=sys.stderr)
        elif dist.main:
            print(f"--resume: no {out / LAST} yet, starting from scratch", file=sys.stderr)
    net = dist.wrap(model, find_unused=getattr(task, "find_unused", False))
    amp_ctx, scaler = autocast(device, args.amp)
    per_rank_batch = args.batch_size
    ds = task.train_dataset(args.steps_per_epoch * per_rank_batch, dist.rank, dist.world)
    t_start = time.time() - elapsed0
    for epoch in range(start_epoch, args.epochs):
        ds.set_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(args, epoch)
        loader = DataLoader(ds, batch_size=per_rank_batch, shuffle=False, num_workers=args.workers,
                            collate_fn=task.collate, persistent_workers=False,
                            pin_memory=device.type == "cuda")
        net.train()
        losses, skipped = [], 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", file=sys.stderr,
                   disable=not dist.main or args.quiet, leave=False)
        for batch in bar:
            opt.zero_grad(set_to_none=True)
            with amp_ctx:
                loss = task.train_loss(net, batch, device)
            if not torch.isfinite(loss):
                skipped += 1  # e.g. a degenerate SVD in the geodesic loss: skip rather than poison the weights
                continue
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.clip_grad)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        stop = False
        if dist.main:
            model.eval()
            with torch.no_grad(), amp_ctx:
                val = task.validate(model, device)
            elapsed = time.time() - t_start
            row = {"epoch": epoch + 1, "steps": (epoch + 1) * args.steps_per_epoch,
                   "train_loss": float(np.mean(losses)) if losses else float("nan"), **val,
                   "lr": opt.param_groups[0]["lr"], "skipped_steps": skipped, "elapsed_s": round(elapsed, 1)}
            rows.append(row)
            score = select_sign * float(val[select_key])
            improved = score < best
            if improved:
                best, best_epoch = score, epoch + 1
            prov = task.provenance(args, epochs_done=epoch + 1, elapsed_s=elapsed, device=device,
                                   best_epoch=best_epoch, best_row=_row_of(rows, best_epoch))
            if improved:
                save_native(out / BEST, model, task.kind, prov)
            save_native(out / LAST, model, task.kind, prov, extra={"training_state": {
                "epoch": epoch + 1, "best_val": best, "best_epoch": best_epoch or 0, "elapsed_s": elapsed,
                "select": select, "optimizer": opt.state_dict()}})
            write_metrics(out / "metrics.csv", rows)
            try:
                plot_curves(out / "learning_curve.png", rows, task.metric_keys, task.title)
            except Exception as exc:  # a plotting problem must not stop training
                print(f"warning: learning curve not written: {exc}", file=sys.stderr)
            msg = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(msg + (" *" if improved else ""), file=sys.stderr, flush=True)
            stop = args.time_limit is not None and elapsed / 60.0 >= args.time_limit
            if stop:
                print(f"time limit of {args.time_limit} min reached after epoch {epoch + 1}", file=sys.stderr)
        if dist.broadcast_flag(stop):
            break
    dist.barrier()
    return rows


def scheduled_lr(args, epoch):
    """Learning rate of an epoch: a pure function of the epoch, so --resume continues the same schedule."""
    if getattr(args, "lr_schedule", "constant") == "cosine":
        return 0.5 * args.lr * (1.0 + math.cos(math.pi * epoch / max(1, args.epochs)))
    return args.lr


def init_weights(model, path, kind):
    """Copy the weights of a checkpoint (any format ``checkpoints`` reads) into ``model``; the architecture must
    match, else a clear error naming the file."""
    from .. import checkpoints

    loader = checkpoints.load_unet if kind == "unet" else checkpoints.load_e3cnn
    source, _ = loader(path)
    if type(source) is not type(model):  # e.g. an E3-CNN checkpoint for --arch standard
        raise RuntimeError(f"{path}: holds a {type(source).__name__}, but the training options build a "
                           f"{type(model).__name__} (check --arch)")
    try:  # parameters, and statistics such as BatchNorm's running mean and variance
        model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise RuntimeError(f"{path}: its architecture does not match the training options; give the same "
                           f"architecture options as the checkpoint's ({' '.join(str(exc).split())[:300]})") from None


def _row_of(rows, epoch):
    for r in rows:
        if r["epoch"] == epoch:
            return {k: v for k, v in r.items() if k.startswith("val_")}
    return {}


def resume_state(path, model, opt, kind=None):
    """Load model + optimiser from a ``last.pt``; None if there is none. Uses weights_only loading. ``kind``: the
    checkpoint kind the run writes; a ``last.pt`` of another kind (e.g. another --arch) is refused."""
    path = Path(path)
    if not path.is_file():
        return None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("training_state")
    if state is None:
        raise RuntimeError(f"{path} has no training state (not a last.pt of e3pose training)")
    if kind is not None and obj.get("kind") not in (None, kind):
        raise RuntimeError(f"{path} is a '{obj.get('kind')}' checkpoint but this run trains a '{kind}' "
                           "(use the same options as the first run, e.g. --arch)")
    missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    params = {k for k, _ in model.named_parameters()}
    if [k for k in missing if k in params] or unexpected:
        raise RuntimeError(f"{path} does not fit this architecture (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); use the same architecture options as the first run")
    opt.load_state_dict(state["optimizer"])
    return {"epoch": int(state["epoch"]), "best_val": float(state["best_val"]),
            "best_epoch": int(state["best_epoch"]) or None, "elapsed_s": float(state.get("elapsed_s", 0.0)),
            "select": str(state.get("select", "loss"))}


def base_provenance(args, kind, trained_on, n_train, n_val, epochs_done, elapsed_s, device, best_epoch, best_row,
                    extra=None):
    prov = {
        "trained_on": trained_on,
        "kind": kind,
        "train_images": str(Path(args.train_img).resolve()), "train_labels": str(Path(args.train_lab).resolve()),
        "val_images": str(Path(args.val_img).resolve()), "val_labels": str(Path(args.val_lab).resolve()),
        "n_train": int(n_train), "n_val": int(n_val),
        "epochs": int(epochs_done), "steps_per_epoch": int(args.steps_per_epoch), "batch_size": int(args.batch_size),
        "optimizer": args.optimizer, "lr": float(args.lr), "lr_schedule": getattr(args, "lr_schedule", "constant"),
        "init": str(args.init) if getattr(args, "init", None) else None, "weight_decay": float(args.weight_decay),
        "rotation_deg": float(args.rotation_deg), "seed": int(args.seed),
        "training_time_s": round(float(elapsed_s), 1), "hardware": hardware(device),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "git_commit": git_commit(), "e3pose_version": __version__,
        "best_epoch": best_epoch, "best_val": best_row, "selected_on": select_name(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    prov.update(extra or {})
    return json.loads(json.dumps(prov))  # plain types only (weights_only loading)


def trained_on_text(args):
    """--trained-on wins; else 'synthetic ...' when the e3pose synth marker is found; else the data folder."""
    from .data import detect_synthetic

    if getattr(args, "trained_on", None):
        return args.trained_on
    synth = detect_synthetic(args.train_img, args.train_lab)
    return synth or f"user data ({Path(args.train_img).resolve()})"


def write_run_config(args, model_config, n_train, n_val):
    """OUTDIR/train_config.json: the command-line options and the architecture, for the record."""
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    opts = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}
    doc = {"options": opts, "config": model_config, "n_train": n_train, "n_val": n_val, "argv": sys.argv,
           "git_commit": git_commit(), "e3pose_version": __version__}
    (out / "train_config.json").write_text(json.dumps(doc, indent=2) + "\n")


def start_run(args):
    """The shared head of both trainers: threads, process group, seeds, provenance text, case lists."""
    from . import data

    if args.threads:
        torch.set_num_threads(args.threads)
    dist = Dist(args.device)
    seed_everything(args.seed, dist.rank)
    train_cases = data.list_cases(args.train_img, args.train_lab, args.max_cases)
    val_cases = data.list_cases(args.val_img, args.val_lab, args.max_val)
    return dist, trained_on_text(args), train_cases, val_cases


def train_and_report(task, args, dist: Dist, n_train, n_val, describe_best):
    """The shared tail of both trainers: record the run, fit, close, print the best epoch."""
    if dist.main:
        write_run_config(args, task.cfg.to_dict(), n_train, n_val)
    rows = fit(task, args, dist)
    dist.close()
    if dist.main and rows:
        _, key, sign = selection(task, args)
        best = min(rows, key=lambda r: sign * float(r[key]))
        print(f"done: best epoch {best['epoch']} val loss {best['val_loss']:.4g}, {describe_best(best)}; "
              f"checkpoints in {args.outdir}")
    return 0
