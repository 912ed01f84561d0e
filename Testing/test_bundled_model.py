"""The shipped default model still does its job: a regression test of its accuracy on fresh synthetic heads.

Twelve volumes from seeds that no training, validation or held-out set used (half navigator-like), through the whole
pipeline. The bounds are loose against the model card's held-out numbers (200 volumes) so that a 12-case sample
passes, and tight enough that a broken convention (a transposed rotation, a mirrored axis, a model at chance level,
whose median error is about 126 deg) fails.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("e3nn")

N_PER_KIND = 6
MEDIAN_ROTATION_BOUND_DEG = 45.0
MEDIAN_TRANSLATION_BOUND_MM = 6.0


@pytest.fixture(scope="module")
def errors():
    from E3PoseLogic.models import default_model
    from E3PoseLogic.pipeline import Pipeline
    from E3PoseLogic.rotation import geodesic_deg
    from E3PoseLogic.synth import AcquisitionConfig, SynthConfig
    from E3PoseLogic.synth.dataset import make_case

    model = default_model()
    if model.random_weights:
        pytest.skip("no trained model is bundled")
    pipe = Pipeline.from_files(model.unet, model.e3cnn, device="cpu")
    rot, trans = [], []
    for seed, navigator in ((9101, False), (9102, True)):
        cfg = SynthConfig(acquisition=AcquisitionConfig(navigator=navigator))
        for i in range(N_PER_KIND):
            case = make_case(seed, i, cfg)
            res = pipe.run(case.image.astype(np.float32), case.affine)
            rot.append(float(geodesic_deg(res.rotation, case.rotation_ras)))
            trans.append(float(np.linalg.norm(res.translation - case.com_ras)))
    return np.array(rot), np.array(trans)


def test_bundled_model_rotation_is_far_better_than_chance(errors):
    rot, _ = errors
    assert np.median(rot) < MEDIAN_ROTATION_BOUND_DEG, np.round(rot, 1)


def test_bundled_model_finds_the_brain(errors):
    _, trans = errors
    assert np.median(trans) < MEDIAN_TRANSLATION_BOUND_MM, np.round(trans, 1)
