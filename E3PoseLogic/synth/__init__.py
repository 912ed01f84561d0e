"""Synthetic fetal-head MRI with known pose: training data, tests and the bundled sample (numpy/scipy only).

``phantom``: the analytic head (canonical mm) and its renderer; ``acquisition``: grid, pose and scanner artefacts;
``dataset``: cases, the training layout (images/, labels/, poses.csv) and ``make_sample``.
"""
from .acquisition import AcquisitionConfig, acquire, sample_grid, sample_pose  # noqa: F401
from .dataset import (  # noqa: F401
    CSV_COLUMNS, SynthCase, SynthConfig, euler_from_rotation_voxel, generate_dataset, make_case, make_sample,
    rotation_voxel_from_world,
)
from .phantom import PhantomParams, Variation, render, render_canonical, sample_phantom, vary_phantom  # noqa: F401
