#!/usr/bin/env bash
# The separate environment for the ANTs row of `e3pose compare`: antspyx 0.6.3 pins numpy < 2.4 and scipy < 1.16,
# which the E3Pose environment cannot take, so it lives in its own venv (default .venv-ants) and runs
# E3PoseLogic/ants_worker.py, which needs only numpy and ants. Then:
#   e3pose compare OUT --methods ants --ants-python .venv-ants/bin/python
set -euo pipefail
DIR="${1:-.venv-ants}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q antspyx==0.6.3
"$DIR/bin/python" -c "import ants; print('ANTs environment ready:', '$DIR/bin/python', 'antspyx', ants.__version__)"
