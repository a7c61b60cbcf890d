# Sourced by the launch scripts once they have set $root (the checkout): sets $python, the interpreter
# that runs the job ($PYTHON; else the checkout's .venv from install.sh when no environment is active;
# else python3), and puts the checkout first on PYTHONPATH.
# shellcheck shell=bash disable=SC2034,SC2154
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
else
    python="python3"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
