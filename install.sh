#!/usr/bin/env bash
# Set up E3Pose in ./.venv: PyTorch first, then E3Pose with the test and MRML (slicer-core) extras.
#
# Which PyTorch build (a bare `pip install torch` gives the multi-GB CUDA build on Linux x86-64, the CPU build on
# macOS and Windows), chosen with E3POSE_TORCH_INDEX:
#   unset (default)  the CPU build: torch==VERSION+cpu from the package sources pip is already set up with (a local
#                    wheel folder or mirror, as on the project's machines), else from the PyTorch CPU index
#                    https://download.pytorch.org/whl/cpu
#   an index URL     torch==VERSION from that index only, e.g. a CUDA build:
#                    E3POSE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash install.sh
#                    (pick the CUDA version your NVIDIA driver supports: https://pytorch.org/get-started/locally/)
#   pypi             torch==VERSION as pip finds it by default (PyPI: CUDA build on Linux x86-64)
# E3POSE_TORCH_VERSION (default 2.13.0) sets VERSION. A torch already installed in .venv is kept, whatever its build:
# to change builds, `.venv/bin/pip uninstall torch` first. The script ends by printing the build it has.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${E3POSE_TORCH_VERSION:-2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu
PIP=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
"${PIP[@]}" install --quiet --upgrade pip

if .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "install.sh: keeping the torch already in .venv"
elif [ -z "${E3POSE_TORCH_INDEX:-}" ]; then
    # CPU build: a local wheel or mirror first (no network needed where one exists), else the PyTorch CPU index
    if ! "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
        echo "install.sh: no torch ${TORCH_VERSION}+cpu among pip's configured sources; installing the CPU build" \
             "from ${CPU_INDEX}"
        "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}" --index-url "${CPU_INDEX}"
    fi
elif [ "${E3POSE_TORCH_INDEX}" = "pypi" ]; then
    "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}"
else
    "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}" --index-url "${E3POSE_TORCH_INDEX}"
fi

"${PIP[@]}" install --quiet -e ".[test,mrml]"
.venv/bin/python -c "import torch; print('install.sh: torch', torch.__version__, '| CUDA build:',
                     torch.version.cuda or 'no (CPU only)', '| GPU usable now:', torch.cuda.is_available())"
.venv/bin/e3pose --version
