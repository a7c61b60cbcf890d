#!/usr/bin/env bash
# Fine-tune a Hugging Face MoE model (Qwen3-MoE, Mixtral, DeepSeek-V3) with DeepSpeed ZeRO and expert parallelism,
# its MoE blocks replaced by granular_moe.deepspeed.GranularMoE, and save it as a Hugging Face folder again:
#   bash launch_scripts/deepspeed_finetune_hf_moe.sh [--nproc-per-node N] [fine-tuning flags]
# With no flags: a tiny randomly initialised Qwen3-MoE (byte-level), granularity 2, ZeRO 2, expert parallelism over
# every process, 40 steps on Python standard-library source, saved to runs/deepspeed_finetune/hf. --model DIR loads a
# real model (and its tokenizer) from DIR instead. Flags: python -m granular_moe.deepspeed.finetune --help.
# --nproc-per-node (NPROC_PER_NODE): processes on this machine, default the GPUs, else 2 gloo processes on the CPU
# (DeepSpeed's CPU accelerator); PYTHON picks the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch_scripts/python.sh
source "$root/launch_scripts/python.sh"

nproc="${NPROC_PER_NODE:-}"
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc-per-node) nproc="$2"; shift 2 ;;
        --nproc-per-node=*) nproc="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
if [[ -z "$nproc" ]]; then
    if [[ "$gpus" -gt 0 ]]; then nproc="$gpus"; else nproc=2; fi
fi
if [[ "$gpus" -eq 0 ]]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m granular_moe.deepspeed.finetune \
    "${args[@]}"
