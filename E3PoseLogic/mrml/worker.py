"""Run the pipeline in a background process, so Slicer stays responsive; and the runner that watches it.

The Slicer module writes the volume as ``.npz`` (``array_ijk``, ``ijk_to_ras``: no file-format library needed on
either side), starts ``PythonSlicer -m E3PoseLogic.mrml.worker --input in.npz --output out.npz [--device D]
[--refine auto|on|off] ...`` and reads its stdout. Protocol, one line each:

    E3POSE PROGRESS <fraction 0..1> <stage>
    E3POSE DONE <output path>
    E3POSE ERROR <kind> <message>          kind: oom | input | checkpoint | cancelled | error

Exit codes: 0 done, 2 bad input, weights or choice (e.g. ``--refine on`` for a model without refinement), 3 GPU
out of memory, 1 anything else. Everything else on stdout/stderr is log text (including one line saying what the
refinement did). Cancel = terminate the process (its whole process group on POSIX). Running out of process also
frees the GPU memory when it ends and keeps a crash in CUDA/e3nn from taking Slicer down.

:class:`WorkerProcess` is pure Python (subprocess + a reader thread + a queue): the widget polls it from a
QTimer; tests drive it directly.

The pipeline comes from ``Pipeline.from_files``. Nothing in the environment or on the command line can replace
it: a test that needs a stand-in pipeline runs its own small script that calls ``main(argv,
pipeline_factory=...)`` and passes that script to :func:`build_command` as ``entry``.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..judge import SECOND_LOOK_CHOICES

PREFIX = "E3POSE "
EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_OOM = 0, 1, 2, 3
REFINE_CHOICES = ("auto", "on", "off")
MODULE_ENTRY = ("-m", "E3PoseLogic.mrml.worker")
# result fields not sent back: the E3-CNN input crop is QC material for the command line, large and unused here
_NOT_SENT = frozenset({"crop"})


# --------------------------------------------------------------------------------------------------- files
def save_volume_npz(path, array_ijk, ijk_to_ras, mask=None):
    arrays = {"array_ijk": np.asarray(array_ijk), "ijk_to_ras": np.asarray(ijk_to_ras, float)}
    if mask is not None:
        arrays["mask"] = np.asarray(mask, np.uint8)
    np.savez(path, **arrays)


def save_result_npz(path, result):
    """Every array field of the result (and every dict field, as JSON), so fields added to PoseResult later, such
    as the network-only pose kept next to a refined one, reach the Slicer module without a change here."""
    import dataclasses

    from .nodes import _jsonable

    fields = {}
    for f in dataclasses.fields(result):
        if f.name in _NOT_SENT:
            continue
        v = getattr(result, f.name, None)
        if isinstance(v, dict):
            fields[f.name + "_json"] = np.array(json.dumps(_jsonable(v)))
        elif v is not None:
            try:
                a = np.asarray(v)
            except Exception:  # noqa: BLE001 - not an array: not part of the result file
                continue
            if a.dtype != object:
                fields[f.name] = a
    tmp = str(path) + ".part.npz"
    np.savez(tmp, **fields)
    os.replace(tmp, path)


def load_result_npz(path):
    import dataclasses

    from ..result import PoseResult

    known = {f.name for f in dataclasses.fields(PoseResult)}
    kw = {"rotation": None, "translation": None, "brain_mask": None, "ijk_to_ras": None}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            if key.endswith("_json") and key[:-5] in known:
                kw[key[:-5]] = json.loads(str(z[key]))
            elif key in known:
                kw[key] = np.array(z[key])
    return PoseResult(**kw)


# --------------------------------------------------------------------------------------------------- protocol
def parse_line(line: str) -> Dict:
    """One stdout line -> event dict: progress / done / error / log."""
    text = line.rstrip("\r\n")
    if not text.startswith(PREFIX):
        return {"kind": "log", "text": text}
    parts = text[len(PREFIX):].split(" ", 2)
    tag = parts[0]
    if tag == "PROGRESS" and len(parts) >= 2:
        try:
            frac = float(parts[1])
        except ValueError:
            return {"kind": "log", "text": text}
        return {"kind": "progress", "fraction": min(max(frac, 0.0), 1.0),
                "stage": parts[2] if len(parts) > 2 else ""}
    if tag == "DONE":
        return {"kind": "done", "path": " ".join(parts[1:])}
    if tag == "ERROR":
        return {"kind": "error", "error": parts[1] if len(parts) > 1 else "error",
                "message": parts[2] if len(parts) > 2 else ""}
    return {"kind": "log", "text": text}


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    msg = str(exc)
    return name == "OutOfMemoryError" or "out of memory" in msg.lower()


def build_command(python, input_npz, output_npz, *, device="auto", unet=None, e3cnn=None, source=None,
                  refine="auto", second_look="auto", entry: Optional[Sequence[str]] = None) -> List[str]:
    """The worker command line (``python`` = PythonSlicer inside Slicer, ``sys.executable`` elsewhere).

    ``source`` names the input in messages (e.g. the volume node name); ``refine`` is the refinement choice
    (auto | on | off), ``second_look`` where doubtful poses get a second look (auto | always | off,
    ``Pipeline.run``). ``entry`` is what follows ``python``: ``-m E3PoseLogic.mrml.worker`` unless the caller's
    own code passes another script (tests: one that calls :func:`main` with a stand-in pipeline factory)."""
    if refine not in REFINE_CHOICES:
        raise ValueError(f"refine must be one of {', '.join(REFINE_CHOICES)}, not {refine!r}")
    cmd = [str(python), *(MODULE_ENTRY if entry is None else entry), "--input", str(input_npz),
           "--output", str(output_npz), "--device", str(device), "--refine", refine]
    if second_look not in SECOND_LOOK_CHOICES:
        raise ValueError(f"second_look must be one of {', '.join(SECOND_LOOK_CHOICES)}, not {second_look!r}")
    cmd += ["--second-look", second_look]
    if source:
        cmd += ["--source", str(source)]
    if unet:
        cmd += ["--unet", str(unet)]
    if e3cnn:
        cmd += ["--e3cnn", str(e3cnn)]
    return cmd


def worker_env(package_parent=None, base=None) -> Dict[str, str]:
    """Environment for the worker: ``package_parent`` (the folder holding E3PoseLogic/) first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if package_parent:
        old = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(package_parent) + (os.pathsep + old if old else "")
    return env


# --------------------------------------------------------------------------------------------------- runner
class WorkerProcess:
    """A running worker: ``poll()`` gives new events, ``cancel()`` stops it, ``wait()`` blocks until it ends."""

    def __init__(self, cmd, env=None, cwd=None):
        self.cmd = list(cmd)
        self.log: List[str] = []
        self.events: "queue.Queue[Dict]" = queue.Queue()
        self.fraction = 0.0
        self.stage = ""
        self.done_path: Optional[str] = None
        self.error: Optional[Dict] = None
        self.cancelled = False
        kw = {}
        if os.name == "posix":
            kw["start_new_session"] = True  # own process group: cancel stops its children too
        else:  # pragma: no cover
            kw["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     text=True, bufsize=1, errors="replace", **kw)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.put(parse_line(line))
        self.proc.stdout.close()
        self.events.put({"kind": "exit"})

    def poll(self) -> List[Dict]:
        """Events since the last call; updates fraction/stage/done_path/error/log. Call from the GUI thread."""
        out = []
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            if ev["kind"] == "exit":
                self.proc.wait()
                ev["returncode"] = self.proc.returncode
            elif ev["kind"] == "progress":
                self.fraction, self.stage = ev["fraction"], ev["stage"]
            elif ev["kind"] == "done":
                self.done_path = ev["path"]
            elif ev["kind"] == "error":
                self.error = ev
            elif ev["kind"] == "log":
                self.log.append(ev["text"])
            out.append(ev)
        return out

    @property
    def running(self) -> bool:
        return self.proc.poll() is None or self._reader.is_alive()

    @property
    def returncode(self):
        return self.proc.returncode

    def cancel(self, grace_s: float = 3.0):
        if self.proc.poll() is not None:
            return
        self.cancelled = True
        try:
            if os.name == "posix":
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:  # pragma: no cover
                self.proc.terminate()
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            if os.name == "posix":
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:  # pragma: no cover
                self.proc.kill()
            self.proc.wait()
        except ProcessLookupError:
            pass

    def wait(self, timeout: Optional[float] = None, poll_s: float = 0.05) -> int:
        t0 = time.monotonic()
        while self.running:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"worker still running after {timeout} s")
            time.sleep(poll_s)
        self._reader.join()
        self.poll()
        return self.proc.returncode

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log[-n:])


# --------------------------------------------------------------------------------------------------- worker main
def _emit(*parts):
    print(PREFIX + " ".join(str(p) for p in parts), flush=True)


def default_pipeline_factory(unet, e3cnn, device):
    from ..pipeline import Pipeline

    return Pipeline.from_files(unet_path=unet, e3cnn_path=e3cnn, device=device)


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if np.isfinite(v) else None


_OFF_STATES = {"off", "skipped", "disabled", "unavailable", "none", "not available", "no", "false"}
_ANGLE_KEYS = ("angle_moved_deg", "moved_deg", "angle_deg", "rotation_change_deg", "delta_deg", "change_deg",
               "moved", "angle")


def refinement_summary(confidence) -> str:
    """One line saying what the refinement did, from ``confidence['refinement']`` ('' when not reported).

    Read defensively (the entry is written by the pipeline; any JSON shape gives some text, never an error):
    e.g. "refined: moved 12° (hypothesis flip_z, margin 0.21)" or "refinement off: the model has no refinement".
    """
    info = confidence.get("refinement") if isinstance(confidence, dict) else None
    if info is None:
        return ""
    if isinstance(info, bool):
        return "refined" if info else "refinement off"
    angle = _number(info)
    if angle is not None:
        return f"refined: moved {angle:.0f}°"
    if isinstance(info, str):
        return f"refinement: {info}"
    if not isinstance(info, dict):
        return f"refinement: {json.dumps(info, default=str)[:200]}"
    state = next((str(info[k]) for k in ("status", "mode", "state") if isinstance(info.get(k), str)), "")
    applied = next((info[k] for k in ("applied", "refined", "used") if isinstance(info.get(k), bool)), None)
    reason = next((str(info[k]) for k in ("reason", "message", "note") if info.get(k)), "")
    if applied is False or state.lower() in _OFF_STATES:
        from ..turned_reading import pooled_counts

        pooled = pooled_counts(confidence.get("network_turned_readings"))
        text = "refinement off" + (f": {reason}" if reason else "")
        if pooled:  # the E3-CNN's pose was pooled from its turned readings
            total, agreeing = pooled
            text += f"; the E3-CNN's pose pooled from {total} readings ({'?' if agreeing is None else agreeing} agree)"
        return text
    angle = next((a for a in (_number(info.get(k)) for k in _ANGLE_KEYS) if a is not None), None)
    shift = _number(info.get("centre_moved_mm"))
    text = "refined" if angle is None else f"refined: moved {angle:.0f}°"
    if angle is not None and shift is not None:
        text += f" and {shift:.1f} mm"
    details = []
    hypothesis = info.get("hypothesis")
    if isinstance(hypothesis, (str, int)) and str(hypothesis).lower() not in ("", "identity", "none", "0"):
        details.append(f"hypothesis {hypothesis}")
    margin = _number(info.get("margin"))
    if margin is not None and details:
        details.append(f"margin {margin:.2g}")
    if reason:
        details.append(reason)
    from ..judge import search_note

    note = search_note(info, unit="°")
    return text + (f" ({', '.join(details)})" if details else "") + (f"; {note}" if note else "") + _doubt_text(info)


def _doubt_text(info) -> str:
    """"; DOUBTFUL, check it (...)" when the residual network's frame choice flagged the pose (README, "Doubtful
    results"), else ''."""
    from ..residual import doubt_details, frame_choice

    choice = frame_choice(info)
    if choice.get("doubtful") is not True:
        return ""
    why = doubt_details(choice, unit="°")
    return "; DOUBTFUL, check it" + (f" ({why})" if why else "")


def main(argv=None, pipeline_factory: Optional[Callable] = None) -> int:
    """Run one volume. ``pipeline_factory(unet, e3cnn, device)`` makes the pipeline (default: the real one from
    the weights files); only Python code that calls main() can pass another one."""
    p = argparse.ArgumentParser(prog="python -m E3PoseLogic.mrml.worker", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help=".npz with array_ijk, ijk_to_ras (and optional mask)")
    p.add_argument("--output", required=True, help=".npz result written at the end")
    p.add_argument("--device", default="auto")
    p.add_argument("--unet", default=None)
    p.add_argument("--e3cnn", default=None)
    p.add_argument("--source", default=None, help="name of the input in messages")
    p.add_argument("--refine", default="auto", choices=REFINE_CHOICES,
                   help="refinement after the network: auto (when the model has one), on, off")
    p.add_argument("--second-look", default="auto", choices=SECOND_LOOK_CHOICES,
                   help="where doubtful poses get a second look: auto (navigator-like volumes), always, off")
    args = p.parse_args(argv)
    factory = default_pipeline_factory if pipeline_factory is None else pipeline_factory
    from ..errors import CheckpointError, E3PoseError, InputError

    try:
        _emit("PROGRESS", "0.0", "loading model")
        pipeline = factory(args.unet, args.e3cnn, args.device)
        with np.load(args.input, allow_pickle=False) as z:
            arr, aff = np.array(z["array_ijk"]), np.array(z["ijk_to_ras"])
            mask = np.array(z["mask"]) if "mask" in z.files else None
        _emit("PROGRESS", "0.05", "model loaded")

        def progress(stage, fraction):
            _emit("PROGRESS", f"{0.05 + 0.9 * float(fraction):.3f}", stage)

        result = pipeline.run(arr, aff, mask=mask, source=args.source or args.input, progress=progress,
                              refine=args.refine, second_look=args.second_look)
        summary = refinement_summary(getattr(result, "confidence", None))
        if summary:
            print(summary, flush=True)
        save_result_npz(args.output, result)
        _emit("PROGRESS", "1.0", "done")
        _emit("DONE", args.output)
        return EXIT_OK
    except (InputError, CheckpointError) as exc:
        _emit("ERROR", "input" if isinstance(exc, InputError) else "checkpoint", str(exc).replace("\n", " "))
        return EXIT_INPUT
    except E3PoseError as exc:  # a choice the user can change, e.g. refine on with a model that has no refinement
        if type(exc).__name__ == "Cancelled":
            _emit("ERROR", "cancelled", str(exc))
            return EXIT_ERROR
        _emit("ERROR", "error", str(exc).replace("\n", " "))
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - reported to the GUI, with the traceback in the log
        import traceback

        traceback.print_exc(file=sys.stdout)
        if is_out_of_memory(exc):
            _emit("ERROR", "oom", "the GPU ran out of memory; run again with device CPU")
            return EXIT_OOM
        if type(exc).__name__ == "Cancelled":
            _emit("ERROR", "cancelled", str(exc))
            return EXIT_ERROR
        _emit("ERROR", "error", f"{type(exc).__name__}: {exc}".replace("\n", " "))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
