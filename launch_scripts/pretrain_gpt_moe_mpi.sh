#!/usr/bin/env bash
# Pretrain a GPT with granular MoE under mpirun: one mpirun, on the first node, starts NNODES x
# NPROC_PER_NODE ranks of `python -m granular_moe.training.pretrain`; each takes its rank from the MPI
# launcher's variables (MPICH/Hydra or Open MPI), MASTER_ADDR is the first host.
#   HOSTS=node01,node02 NPROC_PER_NODE=8 bash launch_scripts/pretrain_gpt_moe_mpi.sh [--dry-run] [trainer flags]
# Launcher flags / environment: --hosts (HOSTS: comma separated or node[01-02]; default inside SLURM:
# SLURM_JOB_NODELIST), --nnodes (NNODES), --nproc-per-node (NPROC_PER_NODE), --master-port (MASTER_PORT),
# --mpi-flavor (MPI_FLAVOR: mpich or openmpi, default from mpirun --version), --dry-run (DRY_RUN=1);
# TP, PP, EP set the parallel sizes. Details: python -m granular_moe.training.launch --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch_scripts/python.sh
source "$root/launch_scripts/python.sh"
exec "$python" -m granular_moe.training.launch mpirun "$@"
