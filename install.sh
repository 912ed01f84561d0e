#!/usr/bin/env bash
# Set up E3Pose in ./.venv: CPU PyTorch first (a bare torch requirement would pull a multi-GB CUDA build), then
# E3Pose with the test and MRML (slicer-core) extras. For a GPU, install the CUDA torch build that matches your
# driver into .venv before running this script: pip keeps an installed torch that satisfies the requirement.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==${E3POSE_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test,mrml]"
.venv/bin/e3pose --version
