"""``e3pose compare`` end to end on a tiny generated set, so the comparison harness cannot rot.

Two held-out volumes, a two-volume template, real networks (the bundled model, a standard CNN and a second E3-CNN
with random weights for the generalisation rows) and real SimpleITK registration; what is checked is the harness
(every method measured or listed as skipped with its reason, files written, results reused), not accuracy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("e3nn")
pytest.importorskip("SimpleITK")


def _compare(tmp_path, *args):
    # the external tools' environments are never given here: their rows must say how to make them
    env = {k: v for k, v in os.environ.items() if k not in ("E3POSE_ANTS_PYTHON", "E3POSE_FIREANTS_PYTHON")}
    return subprocess.run([sys.executable, "-m", "E3PoseLogic", "compare", str(tmp_path / "cmp"), "--n-test", "2",
                           "--template-cases", "2", "--slow-volumes", "1", "--moments-volumes", "1", "--quiet",
                           *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    import torch

    from E3PoseLogic.checkpoints import save_native
    from E3PoseLogic.networks.config import E3CNNConfig
    from E3PoseLogic.networks.e3cnn import E3CNN
    from E3PoseLogic.networks.standard_cnn import StandardCNN, StandardCNNConfig

    tmp = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    std = tmp / "standard.pt"
    save_native(std, StandardCNN(StandardCNNConfig(crop_size=16)), "standard_cnn", {"trained_on": "nothing (test)"})
    e3 = tmp / "e3cnn.pt"
    save_native(e3, E3CNN(E3CNNConfig(n_downsample=2, mult=1, lmax=2, crop_size=16)), "e3cnn",
                {"trained_on": "nothing (test)"})
    methods = ("e3pose-network,e3pose-refined,registration-identity,registration-multistart,standard-cnn,ants,"
               "fireants")
    r = _compare(tmp, "--methods", methods, "--standard-cnn", std, "--generalisation", e3, std)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_every_method_is_measured_or_listed_as_skipped(compared):
    tmp, r = compared
    out = tmp / "cmp"
    rows = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    for name in ("e3pose-network", "e3pose-refined", "registration-identity", "standard-cnn",
                 "generalisation-e3cnn", "generalisation-standard"):
        assert rows[name]["status"] == "ran" and rows[name]["n"] == 2, rows[name]
        assert 0.0 <= rows[name]["median_deg"] <= 180.0 and rows[name]["seconds_median"] > 0
        lines = (out / name / "per_case.csv").read_text().splitlines()
        assert len(lines) == 3 and lines[0].startswith("frame_id,status,rotation_error_deg")
    assert rows["registration-multistart"]["n"] == 1  # --slow-volumes 1
    # no ANTs or FireANTs environment given (--ants-python, --fireants-python): listed, with how to make one
    assert rows["ants"]["status"] == "skipped" and "make_ants_env.sh" in rows["ants"]["note"]
    assert rows["fireants"]["status"] == "skipped" and "make_fireants_env.sh" in rows["fireants"]["note"]
    table = (out / "comparison.md").read_text()
    assert "| ANTs (antspyx) similarity registration, from the centres of mass | skipped:" in table and "SO(3) generalisation" in table
    for png in ("error_by_magnitude.png", "so3_generalisation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "data" / "template.npz").is_file() and (out / "data" / "test" / "poses.csv").is_file()


def test_a_method_without_its_network_is_skipped_with_the_reason(compared):
    tmp, _ = compared
    r = _compare(tmp, "--methods", "standard-cnn")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp / "cmp" / "comparison.json").read_text())["rows"]
    assert rows[0]["status"] == "skipped" and "--standard-cnn" in rows[0]["note"]


def test_measured_methods_are_reused_unless_rerun(compared):
    tmp, _ = compared
    before = json.loads((tmp / "cmp" / "e3pose-network" / "result.json").read_text())
    r = _compare(tmp, "--methods", "e3pose-network")
    assert r.returncode == 0 and "reusing" in r.stderr, r.stderr
    assert json.loads((tmp / "cmp" / "e3pose-network" / "result.json").read_text()) == before
    r = _compare(tmp, "--methods", "e3pose-network", "--rerun")
    assert r.returncode == 0 and "reusing" not in r.stderr, r.stderr
    after = json.loads((tmp / "cmp" / "e3pose-network" / "result.json").read_text())
    assert after["seconds"] != before["seconds"]  # measured again (timings never repeat to the nanosecond)


def test_unknown_method_is_refused(tmp_path):
    r = _compare(tmp_path, "--methods", "e3pose-network,magic")
    assert r.returncode == 2 and "magic" in r.stderr and "Traceback" not in r.stderr


def test_cache_keys_follow_the_code_they_depend_on():
    """A code change must rerun the rows it can affect: the registration rows' digest covers every module the
    registration imports (except those that cannot change a pose), so a new import cannot slip out of it."""
    import ast
    from pathlib import Path

    import E3PoseLogic
    from E3PoseLogic.comparison import REGISTRATION_CODE, code_digest

    root = Path(E3PoseLogic.__file__).parent
    harmless = {"errors.py", "atomic.py", "__init__.py"}
    for name in REGISTRATION_CODE:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                # "from . import frames" names a module; "from . import __version__" reads the package's __init__
                mods = [node.module] if node.module else [a.name.replace("__version__", "__init__")
                                                          for a in node.names]
                for m in mods:
                    assert f"{m}.py" in set(REGISTRATION_CODE) | harmless, f"{name} imports .{m}"
    assert len(code_digest()) == 16 and code_digest() != code_digest(REGISTRATION_CODE)
    # a worker's row is keyed by its own file even though no E3Pose pose depends on it
    assert code_digest(("ants_worker.py", "rotation.py")) != code_digest(("fireants_worker.py", "rotation.py"))
    assert code_digest(("ants_worker.py", "rotation.py")) != code_digest(("rotation.py",))


def test_ants_transform_becomes_the_pose():
    """ANTs returns an ITK transform of volume LPS points to template LPS points; ``pose_from_itk`` inverts it
    into the pose. Checked against ITK's own point mapping (SimpleITK, same transform classes as ANTs)."""
    import numpy as np
    import SimpleITK as sitk
    from scipy.spatial.transform import Rotation

    from E3PoseLogic.comparison import pose_from_itk
    from E3PoseLogic.rotation import geodesic_deg

    rot = Rotation.from_rotvec([0.4, -1.1, 2.0]).as_matrix()  # canonical -> world RAS
    scale, centre = 1.3, np.array([12.0, -30.0, 7.0])  # image brain 1.3 x the template's; brain centre (RAS)
    f = np.diag([-1.0, -1.0, 1.0])
    # template LPS point q = F c <- world LPS point p = F w, with w = scale R c + centre
    a = f @ rot.T @ f / scale
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(a.ravel().tolist())
    # ANTs transforms carry a centre k: p -> A (p - k) + k + t; the offset read back must absorb it
    k = np.array([5.0, 2.0, -4.0])
    tx.SetCenter(k.tolist())
    tx.SetTranslation((-(a @ f @ centre) + a @ k - k).tolist())
    p0 = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    m = np.stack([np.array(tx.TransformPoint(tuple(e))) - p0 for e in np.eye(3)], axis=1)
    pose = pose_from_itk(m, p0)
    assert geodesic_deg(pose["rotation"], rot) < 1e-6
    assert np.allclose(pose["translation"], centre, atol=1e-6)
    c = np.array([10.0, 20.0, -5.0])
    w = scale * rot @ c + centre
    assert np.allclose(tx.TransformPoint(tuple(f @ w)), f @ c, atol=1e-6)


def test_an_environment_without_the_tool_is_named_in_the_reason(tmp_path):
    """A Python that runs but cannot import the tool (here this environment's, which must never hold fireants or
    ants) is reported with the tool's name, not started as a worker."""
    from E3PoseLogic.comparison import WorkerMethod

    for tool in ("fireants", "ants"):
        m = WorkerMethod(None, tool, sys.executable, "com", tool, tool)
        assert f"cannot import {tool}" in m.unavailable()
    missing = WorkerMethod(None, "fireants", tmp_path / "no-python", "moments", "fireants", "fireants").unavailable()
    assert "not installed" in missing and "make_fireants_env.sh" in missing and "--fireants-python" in missing


def test_the_worker_protocol_answers_every_line_and_reports_failures(monkeypatch):
    """The loop both external workers run: one reply per request, in order, a failing volume answered with its error
    and the next one still served."""
    import io

    import numpy as np

    from E3PoseLogic.worker_protocol import serve

    def register(volume, start):
        if volume == "bad.nii.gz":
            raise RuntimeError("unreadable")
        return np.eye(3) * 2.0, np.array([1.0, 2.0, 3.0]) if start == "com" else np.zeros(3)

    monkeypatch.setattr(sys, "stdin", io.StringIO(
        '{"volume": "a.nii.gz"}\n\n{"volume": "bad.nii.gz", "start": "moments"}\n'
        '{"volume": "b.nii.gz", "start": "moments"}\n'))
    out = io.StringIO()
    assert serve(register, out) == 0
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(replies) == 3
    assert replies[0] == {"matrix": (np.eye(3) * 2).tolist(), "offset": [1.0, 2.0, 3.0]}
    assert replies[1] == {"error": "RuntimeError: unreadable"}
    assert replies[2]["offset"] == [0.0, 0.0, 0.0]
