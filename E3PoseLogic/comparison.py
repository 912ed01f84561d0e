"""Side-by-side comparison of pose methods on the same annotated volumes (``e3pose compare``).

Every method is an object with a ``name``, a ``label``, ``unavailable()`` (None, or why it is skipped) and
``predict(array_ijk, ijk_to_ras) -> dict(rotation=world 3x3, translation=world 3-vector)``; one volume at a time,
timed here, so the seconds per volume of every method are measured the same way. The errors and summaries are the
ones of ``e3pose evaluate`` (``evaluate.evaluate_cases``, ``group_summary``), so the numbers in the comparison table
and in the model card mean the same thing.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# External registration packages whose pins clash with this package's environment, so they are never installed here:
# each runs from an environment of its own (made by its script in Resources/benchmarks/), whose Python starts the
# package's worker file; ``WorkerMethod`` talks to it.
@dataclass(frozen=True)
class ExternalTool:
    module: str  # what the other Python must import
    worker: str  # the worker file in this package (imports nothing from it: only the tool and its own needs)
    pins: str  # why it cannot live here
    env_script: str  # Resources/benchmarks/ script that makes its environment
    option: str  # e3pose compare's option naming that Python (and $E3POSE_<TOOL>_PYTHON)


EXTERNAL_TOOLS = {
    "ants": ExternalTool("ants", "ants_worker.py", "antspyx 0.6.3 pins numpy < 2.4 and scipy < 1.16",
                         "make_ants_env.sh", "--ants-python"),
    "fireants": ExternalTool("fireants", "fireants_worker.py", "fireants 1.5.0 pins SimpleITK 2.2.1",
                             "make_fireants_env.sh", "--fireants-python"),
}


# What each method's poses depend on besides its files: cache keys hold a digest of this source, so a code change
# reruns the rows it can affect (and only those: the registration rows take about an hour on 100 volumes).
_NOT_POSE_CODE = ("cli", "training", "synth", "mrml", "comparison.py", "qc.py", "evaluate.py", "outputs.py",
                  "ants_worker.py", "fireants_worker.py", "worker_protocol.py")
REGISTRATION_CODE = ("registration.py", "refine.py", "rotation.py", "frames.py", "preprocess.py")


@functools.lru_cache(maxsize=4)
def code_digest(only: Optional[tuple] = None) -> str:
    """SHA-256 (first 16 hex digits) of the package's pose code (``only``: these files of it)."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if (rel.parts[0] in _NOT_POSE_CODE) if only is None else (rel.as_posix() not in only):
            continue
        h.update(rel.as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ methods
class E3PoseMethod:
    """The bundled pipeline: the refined pose, or with ``refine=False`` the E3-CNN's (``refine off``)."""

    def __init__(self, pipeline, refine: bool, name: str, label: str):
        self.pipeline, self.refine, self.name, self.label = pipeline, refine, name, label

    def unavailable(self) -> Optional[str]:
        if self.refine and self.pipeline.refiner is None:
            return "this model has no refinement network"
        return None

    def key(self) -> str:
        """What the measurement depends on: the networks' files, the refinement choice and the pose code."""
        p = self.pipeline
        nets = [p.unet_info.get("sha256"), p.e3cnn_info.get("sha256"),
                p.refiner_info.get("sha256") if self.refine and p.refiner is not None else None,
                p.residual_info.get("sha256") if self.refine and p.residual is not None else None]
        return f"pipeline refine={self.refine} code={code_digest()} " + " ".join(str(n) for n in nets)

    def predict(self, array, affine):
        res = self.pipeline.run(array, affine, refine="on" if self.refine else "off")
        return dict(rotation=res.rotation, translation=res.translation)


class RegistrationMethod:
    """SimpleITK similarity registration of a canonical-frame template (``registration.register``)."""

    def __init__(self, template, start: str, name: str, label: str, n_starts: int = 24):
        self.template, self.start, self.name, self.label, self.n_starts = template, start, name, label, n_starts

    def unavailable(self) -> Optional[str]:
        if importlib.util.find_spec("SimpleITK") is None:
            return "SimpleITK is not installed"
        return None

    def key(self) -> str:
        return (f"registration start={self.start} n_starts={self.n_starts} code={code_digest(REGISTRATION_CODE)} "
                f"template={self.template.digest()}")

    def predict(self, array, affine):
        from .registration import register

        r = register(array, affine, self.template, start=self.start, n_starts=self.n_starts)
        return dict(rotation=r.rotation, translation=r.translation)


class WorkerMethod:
    """A registration of the same template by an external package (ANTs, FireANTs), run by its worker file in the
    separate environment whose Python is ``python`` (the package cannot share this one). One worker process serves
    every volume, so its start-up is not counted per volume; each volume is handed over as a NIfTI file."""

    def __init__(self, template, tool: str, python, start: str, name: str, label: str):
        self.template, self.tool, self.python = template, EXTERNAL_TOOLS[tool], python
        self.start, self.name, self.label = start, name, label
        self._proc, self._dir = None, None

    @functools.cached_property
    def _why_unavailable(self) -> Optional[str]:
        # asked more than once per comparison; each ask would start the other Python and import the tool (seconds)
        import subprocess

        t = self.tool
        if not self.python or not Path(self.python).is_file():
            return (f"not installed ({t.pins}: it needs its own environment; make one with "
                    f"Resources/benchmarks/{t.env_script} and give {t.option})")
        r = subprocess.run([str(self.python), "-c", f"import {t.module}"], capture_output=True, text=True)
        if r.returncode != 0:
            return (f"{self.python} cannot import {t.module}: "
                    f"{r.stderr.strip().splitlines()[-1] if r.stderr else ''}")
        return None

    def unavailable(self) -> Optional[str]:
        return self._why_unavailable

    def key(self) -> str:
        code = code_digest((self.tool.worker, "worker_protocol.py", "rotation.py"))
        return f"{self.tool.module} start={self.start} code={code} template={self.template.digest()}"

    def _worker(self):
        import subprocess
        import tempfile

        import nibabel as nib

        if self._proc is None:
            self._dir = tempfile.TemporaryDirectory(prefix=f"e3pose-{self.tool.module}-")
            folder, t = Path(self._dir.name), self.template
            nib.save(nib.Nifti1Image(np.asarray(t.image, np.float32), t.ijk_to_canonical()), folder / "template.nii.gz")
            nib.save(nib.Nifti1Image(t.head_mask().astype(np.float32), t.ijk_to_canonical()), folder / "mask.nii.gz")
            self._proc = subprocess.Popen(
                [str(self.python), str(Path(__file__).parent / self.tool.worker), str(folder / "template.nii.gz"),
                 str(folder / "mask.nii.gz")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self._proc

    def predict(self, array, affine):
        import json

        import nibabel as nib

        proc = self._worker()
        vol = Path(self._dir.name) / "volume.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.asarray(affine, np.float64)), vol)
        proc.stdin.write(json.dumps({"volume": str(vol), "start": self.start}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.tool.module} worker stopped")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.tool.module}: {reply['error']}")
        return pose_from_itk(reply["matrix"], reply["offset"])

    def close(self):
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
            self._dir.cleanup()
            self._proc = self._dir = None


def pose_from_itk(matrix, offset):
    """Pose (world RAS rotation and brain centre) from an ITK transform of volume LPS points p to template LPS
    points M p + offset, the template's world being canonical mm. With F = diag(-1, -1, 1): c = F M F w + F offset;
    the pose is its inverse, the scale taken out."""
    from .rotation import nearest_rotation

    f = np.diag([-1.0, -1.0, 1.0])
    a = f @ np.asarray(matrix, dtype=np.float64) @ f
    inv = np.linalg.inv(a)
    return dict(rotation=nearest_rotation(inv), translation=-inv @ (f @ np.asarray(offset, dtype=np.float64)))


class SkippedMethod:
    """A method that cannot run here, listed in the table with the reason instead of silently dropped."""

    def __init__(self, name: str, label: str, reason: str):
        self.name, self.label, self.reason = name, label, reason

    def unavailable(self) -> Optional[str]:
        return self.reason

    def key(self) -> str:
        return f"skipped: {self.reason}"

    def predict(self, array, affine):  # pragma: no cover - never called
        raise RuntimeError(self.reason)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class MethodResult:
    name: str
    label: str
    skipped: Optional[str] = None
    cases: List[dict] = field(default_factory=list)  # evaluate_cases rows (+ seconds)
    seconds: List[float] = field(default_factory=list)
    errors: Dict[str, str] = field(default_factory=dict)  # frame_id -> why no prediction
    n_volumes: int = 0


def run_methods(methods, volumes, truth: Dict[str, dict], subsets: Optional[Dict[str, set]] = None,
                progress=None) -> List[MethodResult]:
    """Run every available method on every volume (``volumes``: an iterable of dicts with frame_id, array, affine,
    loaded once each) and score against ``truth``. ``subsets[name]``: the frame_ids a slow method runs on.

    A volume a method fails on (an exception) counts as missing, that is as a failure, as in ``e3pose evaluate``.
    """
    from .evaluate import evaluate_cases

    subsets = subsets or {}
    results = {m.name: MethodResult(m.name, m.label, skipped=m.unavailable()) for m in methods}
    preds: Dict[str, dict] = {m.name: {} for m in methods}
    seen: Dict[str, list] = {m.name: [] for m in methods}
    try:
        _run(methods, volumes, results, preds, seen, subsets, progress)
    finally:
        for m in methods:
            if hasattr(m, "close"):
                m.close()  # worker processes (ANTs)
    for m in methods:
        res = results[m.name]
        if not res.skipped:
            res.cases = evaluate_cases(preds[m.name], {f: truth[f] for f in seen[m.name]})
            res.n_volumes = len(seen[m.name])
    return [results[m.name] for m in methods]


def _run(methods, volumes, results, preds, seen, subsets, progress):
    from . import frames
    from .rotation import voxel_rotation

    for v in volumes:
        fid = v["frame_id"]
        for m in methods:
            res = results[m.name]
            if res.skipped or (m.name in subsets and fid not in subsets[m.name]):
                continue
            seen[m.name].append(fid)
            t0 = time.perf_counter()
            try:
                p = m.predict(v["array"], v["affine"])
            except Exception as exc:  # one failure is one missing prediction, as a refused volume in e3pose infer
                res.errors[fid] = f"{type(exc).__name__}: {exc}"
            else:
                res.seconds.append(time.perf_counter() - t0)
                preds[m.name][fid] = dict(
                    rotation_voxel=voxel_rotation(np.asarray(p["rotation"], float),
                                                  frames.direction_cosines(v["affine"])),
                    network_rotation_voxel=None, translation_ras=np.asarray(p["translation"], float))
            if progress is not None:
                progress(m.name, fid)


def save_result(folder, res: MethodResult, test_csv, key: str) -> None:
    """Everything ``summary_row`` and the plots need, so a later run can reuse a slow method's measurement."""
    from .atomic import save_json

    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in c.items()} for c in res.cases]
    save_json(Path(folder) / "result.json", dict(name=res.name, label=res.label, test_csv=str(test_csv), key=key,
                                                  cases=rows, seconds=res.seconds, errors=res.errors,
                                                  n_volumes=res.n_volumes))


def load_result(folder, test_csv, frame_ids, key: str) -> Optional[MethodResult]:
    """A saved ``MethodResult`` when it was measured by the same method (``key``: its networks or template) on
    exactly these volumes of this CSV, else None."""
    import json

    path = Path(folder) / "result.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if d.get("key") != key or d.get("test_csv") != str(test_csv) or \
            {c["frame_id"] for c in d.get("cases", [])} != set(frame_ids):
        return None
    cases = [{k: (math.nan if v is None and k.endswith(("_deg", "_mm")) else v) for k, v in c.items()}
             for c in d["cases"]]
    return MethodResult(d["name"], d["label"], cases=cases, seconds=list(d["seconds"]), errors=dict(d["errors"]),
                        n_volumes=int(d["n_volumes"]))


def summary_row(res: MethodResult) -> dict:
    """One row of the comparison table (all volumes the method ran on, and per subgroup medians)."""
    from .evaluate import group_summary, subgroups

    row = dict(method=res.name, label=res.label, status="skipped" if res.skipped else "ran",
               note=res.skipped or "", n=res.n_volumes)
    if res.skipped:
        return row
    g = group_summary(res.cases)
    r, t = g["rotation_error_deg"], g["translation_error_mm"]
    row.update(n_missing=g["n_missing"], median_deg=r["median"], p95_deg=r["p95"], success_5=r["success_5"],
               success_10=r["success_10"], success_30=r["success_30"], failure_60=r["failure_60"],
               translation_median_mm=t["median"] if t else None,
               seconds_median=float(np.median(res.seconds)) if res.seconds else None)
    for name, cases in subgroups(res.cases).items():
        sg = group_summary(cases)["rotation_error_deg"]
        row[f"median_deg_{name}"] = sg["median"]
    return row


TABLE_COLUMNS = (("label", "method"), ("n", "volumes"), ("median_deg", "median (deg)"), ("p95_deg", "95th pct"),
                 ("success_5", "<=5 deg"), ("success_10", "<=10"), ("success_30", "<=30"),
                 ("failure_60", ">60 (failures)"), ("median_deg_standard", "standard median"),
                 ("median_deg_navigator", "navigator median"), ("median_deg_ga_lt_25", "<25 wk median"),
                 ("translation_median_mm", "translation (mm)"), ("seconds_median", "s / volume"))


def _cell(key, v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key.startswith("success") or key.startswith("failure"):
        return f"{100 * v:.0f} %"
    if key == "seconds_median":
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def markdown_table(rows: List[dict]) -> str:
    """The README table: measured rows, then skipped rows with their reason."""
    head = "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"| {r['label']} | skipped: {r['note']} |" + " |" * (len(TABLE_COLUMNS) - 2))
        else:
            lines.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def magnitude_medians(res: MethodResult):
    """(bin labels, median error per bin or nan, n per bin) over the magnitude bins of ``evaluate``."""
    from .evaluate import MAGNITUDE_BINS, bin_label

    labels = [bin_label(i) for i in range(len(MAGNITUDE_BINS) - 1)]
    med, n = [], []
    for b in labels:
        cases = [c for c in res.cases if c["bin"] == b]
        # a missing prediction counts as a 180-degree error here, so a method cannot look good by refusing
        e = [c["rotation_error_deg"] if c["status"] == "ok" else 180.0 for c in cases]
        med.append(float(np.median(e)) if e else math.nan)
        n.append(len(e))
    return labels, med, n


def plot_by_magnitude(results: List[MethodResult], path, title: str) -> None:
    """Median rotation error per ground-truth rotation magnitude bin, one line per method (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    fig, ax = plt.subplots(figsize=(8.0, 4.6), dpi=110)
    labels = None
    for res in results:
        if res.skipped or not res.cases:
            continue
        labels, med, n = magnitude_medians(res)
        ax.plot(range(len(labels)), med, marker="o", label=f"{res.label} (n={res.n_volumes})")
    if labels is not None:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels)
    for t, style in ((10, ":"), (30, "--"), (60, "-.")):
        ax.axhline(t, color="grey", ls=style, lw=0.8)
    ax.set_ylim(0, 180)
    ax.set_xlabel("ground-truth rotation magnitude (degrees)")
    ax.set_ylabel("median geodesic rotation error (degrees)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over the lines
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")  # the legend sits below the axes
    plt.close(fig)
