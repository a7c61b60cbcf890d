#!/usr/bin/env bash
''':'
# Pretrain a GPT with granular MoE. This file is valid bash and valid Python:
#   bash launch_scripts/pretrain_gpt_moe.sh [--dry-run] [launcher flags] [trainer flags]
#       checks the layout, then execs torchrun, which runs this file with Python on every rank;
#   torchrun [torchrun flags] launch_scripts/pretrain_gpt_moe.sh [trainer flags]
#       runs the Python part at the end of this file on every rank;
#   torchrun --no-python [torchrun flags] launch_scripts/pretrain_gpt_moe.sh [trainer flags]
#       runs this bash part on every rank, which hands over to the Python part (no second torchrun).
# With no trainer flags: the embedded default (configs/cpu_default.yaml).
# Launcher flags / environment: --nnodes (NNODES), --nproc-per-node (NPROC_PER_NODE: default the GPUs,
# else 2), --node-rank (NODE_RANK), --master-addr (MASTER_ADDR), --master-port (MASTER_PORT),
# --dry-run (DRY_RUN=1); TP, PP, EP set the parallel sizes; PYTHON picks the interpreter and
# GRANULAR_MOE_ENTRY the module run on each rank. Details: python -m granular_moe.training.launch --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch_scripts/python.sh
source "$root/launch_scripts/python.sh"
if [[ -n "${TORCHELASTIC_RUN_ID:-}" ]]; then
    exec "$python" "${BASH_SOURCE[0]}" "$@"
fi
exec "$python" -m granular_moe.training.launch torchrun --script "${BASH_SOURCE[0]}" "$@"
: <<'pass'
'''
# Python: one rank of the job. (The last line ends the bash here-document that hides this part from
# bash parsers.) Guarded: megatron-core's checkpoint writer starts helper processes that import this file.
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from granular_moe.training.launch import run_worker

    sys.exit(run_worker(sys.argv[1:]))
pass
