"""Background worker: protocol, result round trip, progress, OOM message, cancel, the refinement choice.

The stand-in pipeline is injected the way the shipped code allows and nothing else: the test starts its own small
script that calls ``worker.main(argv, pipeline_factory=...)``. No environment variable or command-line flag of the
worker imports a module chosen at run time.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_synthetic_head

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# the script a test runs instead of ``-m E3PoseLogic.mrml.worker``: the worker's own main(), a stand-in pipeline
ENTRY = """
import sys
sys.path.insert(0, {here!r})
from E3PoseLogic.mrml.worker import main
from test_mrml_worker import fake_factory
sys.exit(main(sys.argv[1:], pipeline_factory=fake_factory({mode!r})))
"""


class _FakePipeline:
    def __init__(self, mode):
        self.mode = mode

    def run(self, array_ijk, ijk_to_ras, mask=None, source=None, progress=None, cancel=None, refine="auto",
            second_look="auto"):
        if self.mode == "slow":
            progress("segment", 0.0)
            time.sleep(60)
        if self.mode == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.mode == "no refiner" and refine == "on":
            from E3PoseLogic.errors import E3PoseError

            raise E3PoseError("refinement was asked for (refine on) but this model has no refinement network")
        h = make_synthetic_head(shape=array_ijk.shape)
        for i, stage in enumerate(("segment", "crop", "pose")):
            progress(stage, (i + 1) / 3)
        r = h["result"]
        r.provenance["refine_requested"] = refine
        r.provenance["second_look_requested"] = second_look
        r.confidence["refinement"] = {"applied": refine != "off", "angle_moved_deg": 12.4, "hypothesis": "identity"}
        r.network_axes = np.arange(9.0).reshape(3, 3)  # a result field the worker used to drop
        return r


def fake_factory(mode):
    def factory(unet, e3cnn, device):
        return _FakePipeline(mode)

    return factory


def _entry(mode):
    return ["-c", ENTRY.format(here=str(HERE), mode=mode)]


def _start(tmp_path, mode, **kw):
    from E3PoseLogic.mrml.worker import WorkerProcess, build_command, save_volume_npz, worker_env

    h = make_synthetic_head(shape=(20, 20, 16))
    inp = tmp_path / "in.npz"
    save_volume_npz(inp, h["array"], h["affine"])
    cmd = build_command(sys.executable, inp, tmp_path / "out.npz", device="cpu", entry=_entry(mode), **kw)
    return WorkerProcess(cmd, env=worker_env(ROOT)), h


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
    # every array and dict field of the result crosses the process boundary (e.g. the network-only pose that
    # the refinement keeps next to the refined one), not only a fixed list
    np.testing.assert_array_equal(r.network_axes, np.arange(9.0).reshape(3, 3))
    assert r.confidence["refinement"]["angle_moved_deg"] == 12.4
    # the default refinement choice reaches the pipeline, and the log says what the refinement did
    assert r.provenance["refine_requested"] == "auto"
    assert any("refined: moved 12°" in line for line in w.log), w.tail()


@pytest.mark.parametrize("choice", ["on", "off"])
def test_worker_passes_the_refinement_choice_to_the_pipeline(tmp_path, choice):
    from E3PoseLogic.mrml.worker import build_command, load_result_npz

    cmd = build_command("python", "in.npz", "out.npz", refine=choice)
    assert cmd[cmd.index("--refine") + 1] == choice
    w, _ = _start(tmp_path, "ok", refine=choice)
    assert w.wait(timeout=60) == 0, w.tail()
    assert load_result_npz(w.done_path).provenance["refine_requested"] == choice


@pytest.mark.parametrize("choice", ["always", "off"])
def test_worker_passes_the_second_look_choice_to_the_pipeline(tmp_path, choice):
    from E3PoseLogic import judge
    from E3PoseLogic.mrml.worker import SECOND_LOOK_CHOICES, build_command, load_result_npz

    assert SECOND_LOOK_CHOICES is judge.SECOND_LOOK_CHOICES  # one list, the pipeline's (judge.py, a light import)
    cmd = build_command("python", "in.npz", "out.npz", second_look=choice)
    assert cmd[cmd.index("--second-look") + 1] == choice
    with pytest.raises(ValueError, match="second_look"):
        build_command("python", "in.npz", "out.npz", second_look="sometimes")
    w, _ = _start(tmp_path, "ok", second_look=choice)
    assert w.wait(timeout=60) == 0, w.tail()
    assert load_result_npz(w.done_path).provenance["second_look_requested"] == choice


def test_worker_refinement_on_without_a_refiner_is_a_clear_error(tmp_path):
    w, _ = _start(tmp_path, "no refiner", refine="on")
    assert w.wait(timeout=60) == 2
    assert w.error["error"] == "error" and w.error["message"].startswith("refinement was asked for")
    assert not any("Traceback" in line for line in w.log)


def test_worker_rejects_an_unknown_refinement_choice(tmp_path, capsys):
    from E3PoseLogic.mrml.worker import build_command, main

    with pytest.raises(ValueError, match="refine"):
        build_command("python", "in.npz", "out.npz", refine="maybe")
    with pytest.raises(SystemExit) as e:
        main(["--input", "x.npz", "--output", "y.npz", "--refine", "maybe"],
             pipeline_factory=fake_factory("ok"))
    assert e.value.code == 2 and "maybe" in capsys.readouterr().err


def test_worker_has_no_environment_hook(tmp_path, monkeypatch, capsys):
    """E3POSE_WORKER_PIPELINE used to import any module named in the environment; now it is ignored."""
    from E3PoseLogic import pipeline as P
    from E3PoseLogic.mrml import worker as W

    (tmp_path / "e3pose_hook_probe.py").write_text(
        "def factory(*a):\n    raise SystemExit('the environment hook ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("E3POSE_WORKER_PIPELINE", "e3pose_hook_probe:factory")
    used = []

    def from_files(cls, unet_path=None, e3cnn_path=None, device="auto", **kw):
        used.append((unet_path, e3cnn_path, device))
        return _FakePipeline("ok")

    monkeypatch.setattr(P.Pipeline, "from_files", classmethod(from_files))
    h = make_synthetic_head(shape=(20, 20, 16))
    W.save_volume_npz(tmp_path / "in.npz", h["array"], h["affine"])
    rc = W.main(["--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().out
    assert used == [(None, None, "cpu")] and "e3pose_hook_probe" not in sys.modules
    src = (ROOT / "E3PoseLogic" / "mrml" / "worker.py").read_text()
    assert "E3POSE_WORKER_PIPELINE" not in src and "importlib" not in src


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


# ------------------------------------------------------------------------------------------- refinement text
@pytest.mark.parametrize("info, expected", [
    ({"applied": True, "angle_moved_deg": 12.4, "hypothesis": "identity"}, "refined: moved 12°"),
    ({"applied": True, "moved_deg": 178.0, "hypothesis": "flip_z", "margin": 0.21},
     "refined: moved 178° (hypothesis flip_z, margin 0.21)"),
    ({"applied": False, "reason": "model has none"}, "refinement off: model has none"),
    # the shape Pipeline.run writes (E3PoseLogic.refine)
    ({"applied": True, "method": "mirror plane + mid-sagittal 2D network", "mirror_score": 0.8,
      "mirror_margin": 0.1, "plane_source": "network", "slab_agreement": 0.9, "angle_moved_deg": 11.6,
      "centre_moved_mm": 1.43, "hypotheses": [{"mirror_score": 0.8}]}, "refined: moved 12° and 1.4 mm"),
    ({"status": "off", "reason": "switched off"}, "refinement off: switched off"),
    ({"mode": "skipped"}, "refinement off"),
    ("off", "refinement: off"),
    (7.0, "refined: moved 7°"),
    ({"applied": True, "angle_moved_deg": float("nan")}, "refined"),
    ({"applied": True, "angle_moved_deg": "a lot"}, "refined"),
    ([1, 2], "refinement: [1, 2]"),
    # a pose the residual network's frame choice flagged: the module's label says so
    ({"applied": True, "angle_moved_deg": 170.0, "residual": {"frame_choice": {
        "pose_logit": 6.2, "doubtful": True, "doubt_reasons": ["e3cnn_disagreement"], "e3cnn_disagreement_deg": 164.0}}},
     "refined: moved 170°; DOUBTFUL, check it (pose logit 6.2, E3-CNN 164° away)"),
    ({"applied": True, "angle_moved_deg": 3.0, "residual": {"frame_choice": {"pose_logit": 8.0, "doubtful": False}}},
     "refined: moved 3°"),
    # the frame judge searched and replaced the refined frame: the axes shown are the searched one
    ({"applied": True, "angle_moved_deg": 150.0, "judge": {"logit": 7.5, "searched": True, "switched": True,
      "angle_moved_deg": 141.2}}, "refined: moved 150°; frame judge searched and switched 141°"),
    ({"applied": True, "angle_moved_deg": 4.0, "judge": {"logit": 3.0, "searched": True, "switched": False}},
     "refined: moved 4°; frame judge searched, kept the refined frame"),
])
def test_refinement_summary_reads_the_confidence_defensively(info, expected):
    from E3PoseLogic.mrml.worker import refinement_summary

    text = refinement_summary({"refinement": info})
    assert text.startswith(expected), text
    assert ("DOUBTFUL" in text) == ("DOUBTFUL" in expected)
    assert refinement_summary({}) == "" and refinement_summary(None) == ""
    assert refinement_summary({"refinement": None}) == ""
    json.dumps(text)  # a plain string


def test_refinement_summary_says_the_e3cnn_pose_was_pooled():
    """Without the refinement the module's line says the E3-CNN's pose was pooled from its turned readings."""
    from E3PoseLogic.mrml.worker import refinement_summary

    off = {"refinement": {"applied": False, "reason": "turned off (refine off)"},
           "network_turned_readings": {"turned_readings": 6, "agreeing": 5, "moved_deg": 2.0}}
    assert refinement_summary(off) == ("refinement off: turned off (refine off); the E3-CNN's pose pooled from 7 "
                                       "readings (5 agree)")
    off["network_turned_readings"] = None
    assert refinement_summary(off) == "refinement off: turned off (refine off)"
    off["network_turned_readings"] = {"turned_readings": "six"}  # read defensively
    assert refinement_summary(off) == "refinement off: turned off (refine off)"
