#!/usr/bin/env bash
# Installs granular-moe and its dependencies into a virtual environment (default ./.venv). Idempotent.
#
#   GRANULAR_MOE_VENV  where the environment lives (default .venv)
#   TORCH_SPEC         what to install for torch when none is there; default: the CPU build
#                      torch==2.13.0 on a machine without a GPU, the default CUDA build with one
#                      (elsewhere, e.g. "torch --index-url https://download.pytorch.org/whl/cpu")
#
# NVIDIA's apex is optional and built from source (github.com/NVIDIA/apex); the PyPI package named
# 'apex' is unrelated and breaks megatron-core's probe for it: this script removes it if present.
set -euo pipefail
cd "$(dirname "$0")"
venv=${GRANULAR_MOE_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q)
"$py" -c "import setuptools" 2>/dev/null || "${pip[@]}" setuptools wheel

if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        torch_spec=${TORCH_SPEC:-torch}
    else
        torch_spec=${TORCH_SPEC:-torch==2.13.0}
    fi
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
"${pip[@]}" --no-build-isolation -e ".[dev,mpi]"
"$py" -c "import granular_moe, megatron.core, deepspeed, torch; print('install.sh: ready (torch', torch.__version__ + ')')" 2>&1 | tail -1
