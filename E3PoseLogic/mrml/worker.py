"""Run the pipeline in a background process, so Slicer stays responsive; and the runner that watches it.

The Slicer module writes the volume as ``.npz`` (``array_ijk``, ``ijk_to_ras``: no file-format library needed on
either side), starts ``PythonSlicer -m E3PoseLogic.mrml.worker --input in.npz --output out.npz ...`` and reads
its stdout. Protocol, one line each:

    E3POSE PROGRESS <fraction 0..1> <stage>
    E3POSE DONE <output path>
    E3POSE ERROR <kind> <message>          kind: oom | input | checkpoint | cancelled | error

Exit codes: 0 done, 2 bad input or weights, 3 GPU out of memory, 1 anything else. Everything else on stdout/stderr
is log text. Cancel = terminate the process (its whole process group on POSIX). Running out of process also
frees the GPU memory when it ends and keeps a crash in CUDA/e3nn from taking Slicer down.

:class:`WorkerProcess` is pure Python (subprocess + a reader thread + a queue): the widget polls it from a
QTimer; tests drive it directly. The environment variable ``E3POSE_WORKER_PIPELINE=module:factory`` replaces
``Pipeline.from_files`` (tests use it to run a fake pipeline).
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
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

PREFIX = "E3POSE "
EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_OOM = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------- files
def save_volume_npz(path, array_ijk, ijk_to_ras, mask=None):
    arrays = {"array_ijk": np.asarray(array_ijk), "ijk_to_ras": np.asarray(ijk_to_ras, float)}
    if mask is not None:
        arrays["mask"] = np.asarray(mask, np.uint8)
    np.savez(path, **arrays)


def save_result_npz(path, result):
    fields = {}
    for name in ("rotation", "translation", "brain_mask", "eye_mask", "ijk_to_ras", "rotation_voxel"):
        v = getattr(result, name, None)
        if v is not None:
            fields[name] = np.asarray(v)
    from .nodes import _jsonable

    for name in ("confidence", "timings", "provenance"):
        fields[name + "_json"] = np.array(json.dumps(_jsonable(getattr(result, name, {}) or {})))
    tmp = str(path) + ".part.npz"
    np.savez(tmp, **fields)
    os.replace(tmp, path)


def load_result_npz(path):
    from ..result import PoseResult

    with np.load(path, allow_pickle=False) as z:
        get = lambda k: np.array(z[k]) if k in z.files else None  # noqa: E731
        return PoseResult(
            rotation=get("rotation"), translation=get("translation"), brain_mask=get("brain_mask"),
            eye_mask=get("eye_mask"), ijk_to_ras=get("ijk_to_ras"), rotation_voxel=get("rotation_voxel"),
            confidence=json.loads(str(z["confidence_json"])) if "confidence_json" in z.files else {},
            timings=json.loads(str(z["timings_json"])) if "timings_json" in z.files else {},
            provenance=json.loads(str(z["provenance_json"])) if "provenance_json" in z.files else {},
        )


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


def build_command(python, input_npz, output_npz, *, device="auto", unet=None, e3cnn=None,
                  source=None) -> List[str]:
    """The worker command line (``python`` = PythonSlicer inside Slicer, ``sys.executable`` elsewhere).
    ``source`` names the input in messages (e.g. the volume node name)."""
    cmd = [str(python), "-m", "E3PoseLogic.mrml.worker", "--input", str(input_npz), "--output", str(output_npz),
           "--device", str(device)]
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


def _make_pipeline(args):
    hook = os.environ.get("E3POSE_WORKER_PIPELINE")
    if hook:
        import importlib

        mod, _, fn = hook.partition(":")
        return getattr(importlib.import_module(mod), fn)(args.unet, args.e3cnn, args.device)
    from ..pipeline import Pipeline

    return Pipeline.from_files(unet_path=args.unet, e3cnn_path=args.e3cnn, device=args.device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m E3PoseLogic.mrml.worker", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help=".npz with array_ijk, ijk_to_ras (and optional mask)")
    p.add_argument("--output", required=True, help=".npz result written at the end")
    p.add_argument("--device", default="auto")
    p.add_argument("--unet", default=None)
    p.add_argument("--e3cnn", default=None)
    p.add_argument("--source", default=None, help="name of the input in messages")
    args = p.parse_args(argv)
    from ..errors import CheckpointError, InputError

    try:
        _emit("PROGRESS", "0.0", "loading model")
        pipeline = _make_pipeline(args)
        with np.load(args.input, allow_pickle=False) as z:
            arr, aff = np.array(z["array_ijk"]), np.array(z["ijk_to_ras"])
            mask = np.array(z["mask"]) if "mask" in z.files else None
        _emit("PROGRESS", "0.05", "model loaded")

        def progress(stage, fraction):
            _emit("PROGRESS", f"{0.05 + 0.9 * float(fraction):.3f}", stage)

        result = pipeline.run(arr, aff, mask=mask, source=args.source or args.input, progress=progress)
        save_result_npz(args.output, result)
        _emit("PROGRESS", "1.0", "done")
        _emit("DONE", args.output)
        return EXIT_OK
    except (InputError, CheckpointError) as exc:
        _emit("ERROR", "input" if isinstance(exc, InputError) else "checkpoint", str(exc).replace("\n", " "))
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
