#!/usr/bin/env bash
# The separate environment for the FireANTs row of `e3pose compare`: fireants 1.5.0 pins SimpleITK 2.2.1, which the
# E3Pose environment cannot take, so it lives in its own venv (default .venv-fireants) and runs
# E3PoseLogic/fireants_worker.py. torch is installed first as the CPU build (TORCH_SPEC, default torch==2.13.0), so
# that fireants' bare torch requirement does not pull a CUDA build. Then:
#   e3pose compare OUT --methods fireants --fireants-python .venv-fireants/bin/python
set -euo pipefail
DIR="${1:-.venv-fireants}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$DIR/bin/python" -m pip install -q fireants==1.5.0
"$DIR/bin/python" -c "import fireants, SimpleITK; print('FireANTs environment ready:', '$DIR/bin/python', 'SimpleITK', SimpleITK.Version.VersionString())"
