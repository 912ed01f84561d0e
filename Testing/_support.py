"""Helpers shared by the test modules (plain functions; pytest fixtures live in conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def rotation(axis, degrees):
    """Right-handed rotation matrix about a coordinate axis ("x", "y" or "z")."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def true_brain_ml(case):
    """The true brain volume (ml) of a synthetic case, from its label map."""
    return float((case.label == 1).sum()) * float(abs(np.linalg.det(case.affine[:3, :3]))) / 1000.0


REPO_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "upstream"


def fixtures_dir() -> Path:
    """The published-code fixtures: $E3POSE_FIXTURES (the full set) if set, else the trimmed copy in this repository
    (Testing/fixtures/upstream: fewer cases, some large arrays subsampled; see its README)."""
    env = os.environ.get("E3POSE_FIXTURES")
    return Path(env) if env else REPO_FIXTURES


def require_fixtures(*names) -> Path:
    """The fixtures folder; a missing file fails the test (the repository carries a copy, so nothing is skipped)."""
    base = fixtures_dir()
    for name in names:
        if not (base / name).exists():
            pytest.fail(f"upstream fixture {name} not found under {base} (unset $E3POSE_FIXTURES to use the copy in "
                        f"Testing/fixtures/upstream)")
    return base


def fixture_cases(npz_name):
    """Case names stored in an npz of the fixture set (read at collection time, so a trimmed set has fewer cases)."""
    path = fixtures_dir() / npz_name
    if not path.exists():
        return [f"missing-{npz_name}"]  # the test then fails in require_fixtures
    return [str(c) for c in np.load(path)["case_names"]]


def pipeline_cases():
    """The whole-pipeline cases of the fixture set (pipeline/input/NAME.nii.gz)."""
    names = sorted(p.name[:-len(".nii.gz")] for p in (fixtures_dir() / "pipeline" / "input").glob("*.nii.gz"))
    return names or ["missing-pipeline-input"]


def reference(npz, key):
    """(reference values, index): the array stored whole with index ``...``, or, in the trimmed copy, its regular
    subsample ``KEY__sub`` with the index that takes the same elements from a full-size array."""
    if key in npz.files:
        return npz[key], (...,)
    return npz[f"{key}__sub"], tuple(slice(int(a), int(b), int(c)) for a, b, c in npz[f"{key}__index"])


def reference_shape(npz, key):
    return tuple(npz[key].shape) if key in npz.files else tuple(int(n) for n in npz[f"{key}__shape"])


def small_e3cnn(seed=0, parity_exact=True, **overrides):
    """A narrow E3-CNN (same code as the published one) that runs in well under a second on a 32^3 input."""
    import torch

    from E3PoseLogic.networks.config import E3CNNConfig
    from E3PoseLogic.networks.e3cnn import E3CNN

    cfg = dict(mult=1, n_downsample=2, lmax=2, crop_size=32, parity_exact_pool=parity_exact)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return E3CNN(E3CNNConfig(**cfg)).eval()


def blob_phantom(shape=(40, 40, 40), seed=0):
    """A smooth asymmetric blob image (float32) for equivariance tests."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    ii = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    env = np.exp(-3 * (ii ** 2).sum(0))
    x = (x - x.min()) * env
    x[shape[0] // 2 + 5: shape[0] // 2 + 9, shape[1] // 2 - 3: shape[1] // 2, shape[2] // 2: shape[2] // 2 + 6] += 0.5
    return (x / x.max()).astype(np.float32)


def load_script(name, folder="benchmarks", importable=False):
    """A script of ``Resources/<folder>`` (not a package module) loaded as a module, e.g. ``load_script(
    "make_transfer_set")`` or ``load_script("card_accuracy", "training")``. ``importable``: also registered in
    ``sys.modules``, for a script whose worker pool pickles its functions by module name."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "Resources" / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if importable:
        sys.modules[name] = module
    return module


def trained_default_model(*parts):
    """The bundled model, or a skip when it has random weights (a checkout without the trained files) or lacks one
    of ``parts`` (e.g. "residual", "judge")."""
    from E3PoseLogic.models import default_model

    model = default_model()
    if model.random_weights:
        pytest.skip("no trained model is bundled")
    missing = [p for p in parts if getattr(model, p) is None]
    if missing:
        pytest.skip(f"the bundled model has no {', '.join(missing)}")
    return model


def run_cli(*args, cwd):
    """``python -m E3PoseLogic ARGS`` in a fresh process (paths and numbers as text), output captured."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "E3PoseLogic", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)
