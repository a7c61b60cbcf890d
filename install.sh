#!/usr/bin/env bash
# Installs granular-moe and its dependencies into a virtual environment (default ./.venv). Idempotent.
#
# The stack: Python >= 3.12, torch, megatron-core 0.19.x, DeepSpeed, Triton. megatron-core 0.17 and newer
# need Python 3.12; this script takes the first of $PYTHON, python3.12, python3.13, python3 (and pyenv's
# 3.12 / 3.13 installations) that is 3.12 or newer, and stops, saying so, where there is none.
#
#   PYTHON             the interpreter to build the environment with (must be >= 3.12)
#   GRANULAR_MOE_VENV  where the environment lives (default .venv)
#   TORCH_SPEC         what to install for torch when none is there (default torch==2.13.0: PyPI's build,
#                      which is the CUDA one for Python 3.12 on Linux and runs on a CPU too); e.g.
#                      "torch --index-url https://download.pytorch.org/whl/cpu" where that index is reachable
#
# NVIDIA's apex is optional and built from source (github.com/NVIDIA/apex); the PyPI package named
# 'apex' is unrelated and breaks megatron-core's probe for it: this script removes it if present.
set -euo pipefail
cd "$(dirname "$0")"
venv=${GRANULAR_MOE_VENV:-.venv}

is_new_enough() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {
    local candidate
    local candidates=("${PYTHON:-}" python3.12 python3.13 python3)
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root=$(pyenv root)
        for candidate in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
            candidates+=("$candidate")
        done
    fi
    for candidate in "${candidates[@]}"; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 && is_new_enough "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ -x "$venv/bin/python" ]] && ! is_new_enough "$venv/bin/python"; then
    echo "install.sh: $venv holds Python $("$venv/bin/python" -V 2>&1 | cut -d' ' -f2), older than 3.12: remove it" \
         "(rm -rf $venv) and run install.sh again" >&2
    exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then
    if ! base=$(find_python); then
        echo "install.sh: no Python 3.12 or newer found (tried \$PYTHON, python3.12, python3.13, python3 and pyenv's" \
             "versions). megatron-core 0.19, the release granular-moe is built on, needs Python >= 3.12; install" \
             "one (e.g. pyenv install 3.12) or set PYTHON to it. Older Pythons cannot run this stack." >&2
        exit 1
    fi
    echo "install.sh: building $venv with $base ($("$base" -V 2>&1))"
    "$base" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install -q)
"$py" -c "import setuptools" 2>/dev/null || "${pip[@]}" setuptools wheel

if ! "$py" -c "import torch" 2>/dev/null; then
    torch_spec=${TORCH_SPEC:-torch==2.13.0}
    echo "install.sh: installing $torch_spec"
    # shellcheck disable=SC2086
    "${pip[@]}" $torch_spec
fi

# DeepSpeed ships a source archive whose build imports torch: no build isolation.
"$py" -c "import deepspeed" 2>/dev/null || "${pip[@]}" --no-build-isolation "deepspeed>=0.16"

if "$py" -c "import apex" 2>/dev/null && ! "$py" -c "import apex.normalization" 2>/dev/null; then
    echo "install.sh: removing PyPI's unrelated 'apex' package (NVIDIA apex must be built from source)"
    "$py" -m pip uninstall -q -y apex
fi

# MPI runtime for mpi4py (the mpirun launch route).
"$py" -c "import mpi4py.MPI" 2>/dev/null || "${pip[@]}" mpich
"${pip[@]}" --no-build-isolation -e ".[dev,mpi,hf]"
"$py" - <<'EOF'
import platform
import warnings

warnings.simplefilter("ignore")
import deepspeed
import torch
import transformers
import triton
from megatron.core import package_info

import granular_moe.megatron  # noqa: F401  (refuses an unsupported megatron-core)

cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"install.sh: ready: Python {platform.python_version()}, torch {torch.__version__} ({cuda} build, {gpus} GPU(s)),"
      f" megatron-core {package_info.__version__}, deepspeed {deepspeed.__version__}, triton {triton.__version__},"
      f" transformers {transformers.__version__}")
EOF
