"""``e3pose benchmark``: time what users run, on the bundled sample: ``Pipeline.run`` (per stage, from the timings
it records), process start-up (interpreter, imports, model load, in a fresh process), reading the NIfTI file and
writing the outputs; median, min and max over repeated runs after a warm-up, and peak memory.

Network sizes, not weights, set the cost, so the published sizes run with random weights unless checkpoints are
given. A random U-Net finds no brain: its forward pass and post-processing still run inside ``Pipeline.run``, and
only the mask it returns is replaced by the sample's true mask (on the U-Net grid), so every stage does its real
work (``used_true_mask`` in the report says when). The E3-CNN is also timed with its kernels rebuilt at every
forward (what the published code does).

JSON report (``--json FILE``), format ``e3pose-benchmark/2``; every timing is ``{"median_s", "min_s", "max_s",
"n"}`` unless said otherwise:

- ``pipeline``: ``Pipeline.run``'s own ``timings`` per stage (``preprocess``, ``segmentation``, ``crop``,
  ``rotation``, ``refine`` when the pipeline has that stage, ``output``, ``total``) plus ``wall`` (the call
  measured from outside) and ``cpu`` (CPU time of this process during the call, all threads: less sensitive than
  wall time to other work on a shared machine), kernels cached, after the warm-up;
- ``networks``: the network forward passes inside those runs (``unet_forward`` within ``segmentation``,
  ``e3cnn_forward`` within ``rotation``);
- ``first_run``: seconds per stage of the first (warm-up) run: kernels built, caches cold (one number each);
- ``rebuild_kernels``: ``rotation``, ``e3cnn_forward``, ``total`` of ``Pipeline.run`` with the kernels rebuilt at
  every forward (absent with ``--no-rebuild``);
- ``io``: ``read_nifti`` (``volume_io.load_volume`` of the sample), ``write_outputs`` (``.npy``, ``.json``,
  ``_mask.nii.gz``, ``.tfm``, as ``e3pose infer`` writes them);
- ``per_volume_s``: median read + median ``Pipeline.run`` wall + median write (one number: the cost of one more
  volume in a batch);
- ``startup``: a fresh ``python`` process each run: ``interpreter`` (process start to the first line),
  ``imports`` (torch, e3nn, E3PoseLogic's pipeline and networks), ``model_load`` (``Pipeline.from_files`` for the
  default model or given checkpoints; building the published-size random networks for ``--variant published``),
  ``total`` (absent with ``--startup-runs 0``);
- ``memory``: ``cpu_peak_rss_mb`` (this process) and ``gpu_peak_allocated_mb`` on CUDA;
- ``machine`` (python, torch, platform, CPU model, ``cpu_count``, ``usable_cpus``, ``torch_threads``,
  ``load_average_1m_at_start``, ``device``, ``gpu``, ``note``), ``variant``, ``refine``, ``warmup``,
  ``repeats``, ``input``, ``unet_config``, ``e3cnn_config``, ``crop_shape``, ``mask_source``, ``used_true_mask``,
  ``refinement_applied`` (whether the refine stage ran; null where the pipeline has none).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

FORMAT = "e3pose-benchmark/2"
REFINE_CHOICES = ("auto", "on", "off")


def register(sub):
    p = sub.add_parser("benchmark", help="time Pipeline.run per stage, start-up and file I/O (median of repeated "
                                         "runs) and peak memory",
                       description="Time what users run on the bundled sample: Pipeline.run (per stage), process "
                                   "start-up (imports, model load) in a fresh process, reading the NIfTI and "
                                   "writing the outputs. Median, min, max over repeated runs after a warm-up.")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--variant", default="published", choices=("published", "default"),
                   help="published: the published network sizes (random weights); default: the bundled model")
    p.add_argument("--unet", help="U-Net weights to time instead")
    p.add_argument("--e3cnn", help="E3-CNN weights to time instead")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--startup-runs", type=int, default=3,
                   help="fresh processes timed for start-up (imports, model load); 0: skip (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--refine", choices=REFINE_CHOICES,
                   help="passed to Pipeline.run(refine=...); its 'refine' stage is reported (default: not passed)")
    p.add_argument("--no-rebuild", action="store_true", help="skip the kernels-rebuilt-per-forward timing")
    p.add_argument("--note", default="", help="free text stored in the report's machine section")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------- helpers
def stats(values):
    values = [float(v) for v in values]
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "n": len(values)}


def cpu_model() -> str:
    """The CPU model (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _machine(torch, device, note=""):
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if note:
        info["note"] = note
    return info


def _peak_mb(torch, device):
    import resource

    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


# What a fresh process pays before its first volume. Printed as one JSON line; `t_start` is wall-clock time so the
# parent can measure the interpreter's own start (time.time is comparable across processes, perf_counter is not).
_STARTUP_SCRIPT = r"""
import json, sys, time
t_start = time.time(); p0 = time.perf_counter()
cfg = json.loads(sys.argv[1])
import torch, e3nn
import E3PoseLogic.pipeline
from E3PoseLogic import checkpoints, models
from E3PoseLogic.networks import e3cnn, unet
from E3PoseLogic.pipeline import Pipeline
if cfg["threads"]:
    torch.set_num_threads(cfg["threads"])
p1 = time.perf_counter()
if cfg["variant"] == "published" and not (cfg["unet"] and cfg["e3cnn"]):
    u, ui, e, ei = models.random_networks()
    if cfg["unet"]:
        u, ui = checkpoints.load_unet(cfg["unet"])
    if cfg["e3cnn"]:
        e, ei = checkpoints.load_e3cnn(cfg["e3cnn"])
    pipe = Pipeline(u, e, ui, ei, device=cfg["device"])
else:
    pipe = Pipeline.from_files(cfg["unet"], cfg["e3cnn"], device=cfg["device"])
if pipe.device.type == "cuda":
    torch.cuda.synchronize(pipe.device)
p2 = time.perf_counter()
print(json.dumps({"t_start": t_start, "imports": p1 - p0, "model_load": p2 - p1}))
"""


def measure_startup(args, runs):
    """Time ``runs`` fresh processes: interpreter start, imports, model load; -> {name: stats}."""
    cfg = {"variant": args.variant, "unet": args.unet, "e3cnn": args.e3cnn, "device": args.device,
           "threads": args.threads}
    rows = {"interpreter": [], "imports": [], "model_load": [], "total": []}
    for _ in range(runs):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, json.dumps(cfg)], capture_output=True,
                              text=True)
        t_end = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"start-up measurement failed:\n{proc.stderr[-2000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rows["interpreter"].append(rec["t_start"] - t0)
        rows["imports"].append(rec["imports"])
        rows["model_load"].append(rec["model_load"])
        rows["total"].append(t_end - t0)
    return {k: stats(v) for k, v in rows.items()}


class _ForwardTimer:
    """Times a module's forward passes with hooks: the code path of Pipeline.run is unchanged."""

    def __init__(self, module, sync):
        self.sync, self.times, self._t0 = sync, [], None
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self.sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.sync()
        self.times.append(time.perf_counter() - self._t0)

    def take(self):
        out, self.times = self.times, []
        return sum(out)

    def remove(self):
        for h in self._handles:
            h.remove()


def _pipeline_accepts_refine(pipeline_cls):
    import inspect

    return "refine" in inspect.signature(pipeline_cls.run).parameters


# ------------------------------------------------------------------------------------------------------- run
def run(args):
    import tempfile

    import numpy as np
    import torch

    from ..checkpoints import load_e3cnn, load_unet
    from ..errors import E3PoseError
    from ..models import default_model, random_networks
    from ..outputs import write_outputs
    from ..pipeline import Pipeline, resolve_device
    from ..preprocess import resample_to_grid, unet_input
    from ..volume_io import load_mask, load_volume
    from .demo import SAMPLE_DIR

    if args.repeats < 1 or args.warmup < 0 or args.startup_runs < 0:
        print("benchmark: --repeats must be >= 1, --warmup and --startup-runs >= 0", file=sys.stderr)
        return 2
    run_kwargs = {}
    if args.refine is not None:
        if not _pipeline_accepts_refine(Pipeline):
            print("benchmark: this version's Pipeline.run has no refine stage; drop --refine", file=sys.stderr)
            return 2
        run_kwargs["refine"] = args.refine
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except E3PoseError as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    machine = _machine(torch, device, args.note)  # before anything runs: the load average is other users'

    if args.variant == "default" and not default_model().random_weights:
        pipe = Pipeline.from_files(args.unet, args.e3cnn, device=device)
    else:
        unet, ui, e3, ei = random_networks()
        if args.unet:
            unet, ui = load_unet(args.unet)
        if args.e3cnn:
            e3, ei = load_e3cnn(args.e3cnn)
        pipe = Pipeline(unet, e3, ui, ei, device=device)

    sample = SAMPLE_DIR / "sample_head.nii.gz"
    array, affine = load_volume(sample)

    # A U-Net that finds no brain (random weights) would stop Pipeline.run: keep its forward pass and
    # post-processing, replace only the mask it returns by the true one on the U-Net grid (computed once here).
    x_grid, unet_affine = unet_input(array, affine, pipe.unet_spacing, pipe.unet_size)
    true_mask = load_mask(SAMPLE_DIR / "sample_head_label.nii.gz", affine, array.shape)
    true_on_grid = resample_to_grid(true_mask, affine, unet_affine, x_grid.shape, order=0)
    used_true_mask = []
    segment = pipe.segment

    def segment_or_true_mask(x):
        brain, eyes = segment(x)
        if not pipe.is_trained or brain.sum() < 100:
            used_true_mask.append(True)
            return true_on_grid.copy(), eyes
        return brain, eyes

    pipe.segment = segment_or_true_mask

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    unet_timer = _ForwardTimer(pipe.unet, sync)
    e3_timer = _ForwardTimer(pipe.e3cnn, sync)

    def one_run():
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        result = pipe.run(array, affine, source=sample, **run_kwargs)
        sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        one_run.cpu = cpu
        return result, wall, unet_timer.take(), e3_timer.take()

    print(f"benchmark: {args.variant} sizes on {device} ({torch.get_num_threads()} CPU threads), Pipeline.run: "
          f"{args.warmup} warm-up + {args.repeats} timed runs; start-up: {args.startup_runs} fresh processes",
          file=sys.stderr)
    report = {"format": FORMAT, "variant": args.variant, "refine": args.refine, "warmup": args.warmup,
              "repeats": args.repeats, "machine": machine,
              "input": {"file": sample.name, "shape": list(array.shape),
                        "voxel_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]}}

    # reading the NIfTI file
    read = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        load_volume(sample)
        read.append(time.perf_counter() - t0)

    try:
        result = _time_runs(args, report, one_run, pipe, torch, device)
    except E3PoseError as exc:  # e.g. --refine on with a model that has no refinement network
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    finally:
        unet_timer.remove()
        e3_timer.remove()

    # writing the outputs, as `e3pose infer` does
    write = []
    with tempfile.TemporaryDirectory(prefix="e3pose-benchmark-") as tmp:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            write_outputs(tmp, "sample_head", result, sample)
            write.append(time.perf_counter() - t0)
    report["io"] = {"read_nifti": stats(read), "write_outputs": stats(write)}
    report["per_volume_s"] = (report["io"]["read_nifti"]["median_s"] + report["pipeline"]["wall"]["median_s"]
                              + report["io"]["write_outputs"]["median_s"])
    report["memory"] = _peak_mb(torch, device)
    refinement = (result.confidence or {}).get("refinement")
    report.update(unet_config=pipe.unet.config.to_dict(), e3cnn_config=pipe.e3cnn.config.to_dict(),
                  crop_shape=list(result.crop.shape), mask_source=result.provenance.get("mask_source"),
                  used_true_mask=bool(used_true_mask),
                  refinement_applied=None if refinement is None else bool(refinement.get("applied")))
    if args.startup_runs:
        report["startup"] = measure_startup(args, args.startup_runs)

    _print_report(report)
    if args.json:
        from ..atomic import save_json

        save_json(args.json, report)
    return 0


def _time_runs(args, report, one_run, pipe, torch, device):
    """Warm-up, timed runs (kernels cached), then runs with the kernels rebuilt at every forward; fills
    ``report`` and returns the last kernels-cached result."""
    first_run = None
    for _ in range(args.warmup):
        result, wall, _u, _e = one_run()
        if first_run is None:
            first_run = dict(result.timings, wall=wall)
    if first_run is not None:
        report["first_run"] = first_run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stage_times, walls, cpus, unet_f, e3_f = {}, [], [], [], []
    for _ in range(args.repeats):
        result, wall, u, e = one_run()
        for k, v in result.timings.items():
            stage_times.setdefault(k, []).append(v)
        walls.append(wall)
        cpus.append(one_run.cpu)
        unet_f.append(u)
        e3_f.append(e)
    pipeline = {k: stats(v) for k, v in stage_times.items() if k != "total"}
    pipeline["total"] = stats(stage_times["total"])
    pipeline["wall"] = stats(walls)
    pipeline["cpu"] = stats(cpus)
    report["pipeline"] = pipeline
    report["networks"] = {"unet_forward": stats(unet_f), "e3cnn_forward": stats(e3_f)}
    # the kernels rebuilt at every forward (the published code); last, as switching the cache off drops the
    # cached kernels
    if not args.no_rebuild:
        pipe.e3cnn.set_kernel_cache(False)
        rot, fwd, tot = [], [], []
        try:
            for _ in range(args.repeats):
                r, _wall, _u, e = one_run()
                rot.append(r.timings["rotation"])
                fwd.append(e)
                tot.append(r.timings["total"])
        finally:
            pipe.e3cnn.set_kernel_cache(True)
        report["rebuild_kernels"] = {"rotation": stats(rot), "e3cnn_forward": stats(fwd), "total": stats(tot)}
    return result


def _print_report(report):
    def row(name, s):
        print(f"{name:34s} {s['median_s']:9.3f} {s['min_s']:9.3f} {s['max_s']:9.3f}")

    print(f"{'seconds':34s} {'median':>9s} {'min':>9s} {'max':>9s}")
    for k, v in report["pipeline"].items():
        row(f"Pipeline.run {k}" + (" (CPU time)" if k == "cpu" else ""), v)
    for k, v in report["networks"].items():
        row(f"  of which {k}", v)
    for k, v in report.get("rebuild_kernels", {}).items():
        row(f"kernels rebuilt: {k}", v)
    for k, v in report["io"].items():
        row(k, v)
    print(f"{'per volume (read + run + write)':34s} {report['per_volume_s']:9.3f}")
    if "first_run" in report:
        print(f"{'first run (warm-up), total':34s} {report['first_run']['total']:9.3f}")
    for k, v in report.get("startup", {}).items():
        row(f"start-up {k}", v)
    print("peak memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in report["memory"].items()))
    if report["used_true_mask"]:
        print("note: the U-Net found no brain (random weights); its mask was replaced by the sample's true mask")
    print("machine: " + json.dumps(report["machine"]))
