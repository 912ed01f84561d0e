"""``e3pose benchmark``: time each pipeline stage over repeated runs (median, min, max) and peak memory.

Network sizes, not weights, set the cost, so the published sizes run with random weights unless checkpoints are
given; the bundled sample's true mask stands in for the U-Net's when the U-Net finds no brain. The E3-CNN is timed
twice: kernels cached (what inference does) and rebuilt at every forward (what the published code does).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time


def register(sub):
    p = sub.add_parser("benchmark", help="time the pipeline stages (median of repeated runs) and peak memory")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--variant", default="published", choices=("published", "default"),
                   help="published: the published network sizes (random weights); default: the bundled model")
    p.add_argument("--unet", help="U-Net weights to time instead")
    p.add_argument("--e3cnn", help="E3-CNN weights to time instead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-rebuild", action="store_true", help="skip the kernels-rebuilt-per-forward timing")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.set_defaults(func=run)


def _machine(torch, device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _peak_mb(torch, device):
    import resource

    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def run(args):
    import numpy as np
    import torch
    from scipy import ndimage

    from ..crop import crop_for_e3cnn
    from ..checkpoints import load_e3cnn, load_unet
    from ..models import default_model, random_networks
    from ..pipeline import Pipeline, resolve_device
    from ..preprocess import unet_input
    from ..segmentation import brain_and_eyes, softmax
    from ..volume_io import load_mask, load_volume
    from .demo import SAMPLE_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.variant == "default" and not default_model().random_weights:
        spec = default_model()
        unet, ui = load_unet(spec.unet)
        e3, ei = load_e3cnn(spec.e3cnn)
    else:
        unet, ui, e3, ei = random_networks()
    if args.unet:
        unet, ui = load_unet(args.unet)
    if args.e3cnn:
        e3, ei = load_e3cnn(args.e3cnn)
    pipe = Pipeline(unet, e3, ui, ei, device=device)
    array, affine = load_volume(SAMPLE_DIR / "sample_head.nii.gz")
    true_mask = load_mask(SAMPLE_DIR / "sample_head_label.nii.gz", affine, array.shape)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {}

    def timed(name, fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def unet_forward(x):
        with torch.inference_mode():
            t = torch.from_numpy(x)[None, None].to(device).contiguous(memory_format=torch.channels_last_3d)
            return pipe.unet(t)[0].float().cpu().numpy()

    def e3_forward(x):
        with torch.inference_mode():
            return pipe.e3cnn(torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device))[0].cpu().numpy()

    print(f"benchmark: {args.variant} sizes on {device} ({torch.get_num_threads()} CPU threads), "
          f"{args.warmup} warm-up + {args.repeats} timed runs", file=sys.stderr)
    used_true_mask = False
    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            times.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        x, unet_aff = timed("preprocess", lambda: unet_input(array, affine, pipe.unet_spacing, pipe.unet_size))
        logits = timed("unet", lambda: unet_forward(x))
        brain, _ = timed("postprocess", lambda: brain_and_eyes(softmax(logits, 0), pipe.thresholds))
        if brain.sum() < 100:  # random weights: take the sample's true mask
            from ..preprocess import resample_to_grid

            brain = resample_to_grid(true_mask, affine, unet_aff, x.shape, order=0)
            used_true_mask = True
        cfg = pipe.e3cnn.config
        crop, _ = timed("crop", lambda: crop_for_e3cnn(x, brain, cfg.crop_scale, cfg.crop_size))
        timed("centre_of_mass", lambda: ndimage.center_of_mass(brain))
        timed("e3cnn", lambda: e3_forward(crop))  # kernels cached after the warm-up run
    if not args.no_rebuild:  # separately: switching the cache off and on again would drop the cached kernels
        pipe.e3cnn.set_kernel_cache(False)
        for i in range(args.warmup + args.repeats):
            if i == args.warmup:
                times.pop("e3cnn_rebuild_kernels", None)
            timed("e3cnn_rebuild_kernels", lambda: e3_forward(crop))
        pipe.e3cnn.set_kernel_cache(True)
    stages = ["preprocess", "unet", "postprocess", "centre_of_mass", "crop", "e3cnn"]
    totals = [sum(times[s][i] for s in stages) for i in range(args.repeats)]
    times["total_cached_kernels"] = totals
    if not args.no_rebuild:
        times["total_rebuild_kernels"] = [t - times["e3cnn"][i] + times["e3cnn_rebuild_kernels"][i]
                                         for i, t in enumerate(totals)]
    summary = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
               for k, v in times.items()}
    report = {"variant": args.variant, "machine": _machine(torch, device), "stages": summary,
              "memory": _peak_mb(torch, device), "unet_config": pipe.unet.config.to_dict(),
              "e3cnn_config": pipe.e3cnn.config.to_dict(), "crop_shape": list(crop.shape),
              "used_true_mask": used_true_mask}
    print(f"{'stage':28s} {'median':>9s} {'min':>9s} {'max':>9s}")
    for k, v in summary.items():
        print(f"{k:28s} {v['median_s']:9.3f} {v['min_s']:9.3f} {v['max_s']:9.3f}")
    print("peak memory: " + ", ".join(f"{k} {v:.0f}" for k, v in report["memory"].items()))
    print("machine: " + json.dumps(report["machine"]))
    if args.json:
        from ..atomic import save_json

        save_json(args.json, report)
    return 0
