"""Background worker: protocol, result round trip, progress, OOM message, cancel (with a fake pipeline)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_synthetic_head

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class _FakePipeline:
    def __init__(self, mode):
        self.mode = mode

    def run(self, array_ijk, ijk_to_ras, mask=None, source=None, progress=None, cancel=None):
        if self.mode == "slow":
            time.sleep(60)
        if self.mode == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        h = make_synthetic_head(shape=array_ijk.shape)
        for i, stage in enumerate(("segment", "crop", "pose")):
            progress(stage, (i + 1) / 3)
        return h["result"]


def fake_factory(unet, e3cnn, device):
    return _FakePipeline(os.environ.get("E3POSE_FAKE_MODE", "ok"))


def _start(tmp_path, mode):
    from E3PoseLogic.mrml.worker import WorkerProcess, build_command, save_volume_npz, worker_env

    h = make_synthetic_head(shape=(20, 20, 16))
    inp = tmp_path / "in.npz"
    save_volume_npz(inp, h["array"], h["affine"])
    env = worker_env(ROOT)
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env["PYTHONPATH"]
    env["E3POSE_WORKER_PIPELINE"] = "test_mrml_worker:fake_factory"
    env["E3POSE_FAKE_MODE"] = mode
    cmd = build_command(sys.executable, inp, tmp_path / "out.npz", device="cpu")
    return WorkerProcess(cmd, env=env), h


def test_parse_line():
    from E3PoseLogic.mrml.worker import parse_line

    assert parse_line("E3POSE PROGRESS 0.5 crop and resample\n") == {"kind": "progress", "fraction": 0.5,
                                                                      "stage": "crop and resample"}
    assert parse_line("E3POSE DONE /a b/c.npz") == {"kind": "done", "path": "/a b/c.npz"}
    assert parse_line("E3POSE ERROR oom the GPU ran out")["error"] == "oom"
    assert parse_line("hello")["kind"] == "log"


def test_worker_runs_and_result_roundtrips(tmp_path):
    from E3PoseLogic.mrml.worker import load_result_npz

    w, h = _start(tmp_path, "ok")
    assert w.wait(timeout=60) == 0, w.tail()
    assert w.done_path == str(tmp_path / "out.npz") and w.fraction == 1.0 and w.error is None
    r = load_result_npz(w.done_path)
    np.testing.assert_allclose(r.canonical_to_world, make_synthetic_head(shape=(20, 20, 16))["pose"])
    assert r.provenance["device"] == "cpu" and r.brain_mask.dtype == np.uint8


def test_worker_out_of_memory_says_use_cpu(tmp_path):
    w, _ = _start(tmp_path, "oom")
    assert w.wait(timeout=60) == 3
    assert w.error["error"] == "oom" and "CPU" in w.error["message"]


def test_worker_cancel(tmp_path):
    w, _ = _start(tmp_path, "slow")
    t0 = time.monotonic()
    while w.fraction < 0.05 and time.monotonic() - t0 < 30:
        w.poll()
        time.sleep(0.05)
    w.cancel()
    rc = w.wait(timeout=10)
    assert rc != 0 and w.cancelled and time.monotonic() - t0 < 30
