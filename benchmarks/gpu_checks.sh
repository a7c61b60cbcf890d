#!/usr/bin/env bash
# What a GPU session runs, in one call: the Triton kernels' accuracy against fp64 (bf16, fp16, fp32; the
# check the CPU interpreter cannot do for bf16), then the expert-block and permute/combine benchmarks at the
# issue's shapes. Tables on stdout, JSON under OUT (default benchmarks/results/gpu). Needs torch and Triton
# only, not megatron-core or DeepSpeed.
#
#   bash benchmarks/gpu_checks.sh                       # on the GPU machine, from anywhere
#   SCATTERMOE=/path/to/scattermoe bash benchmarks/gpu_checks.sh   # adds ScatterMoE's column (never committed)
#   TINY=1 OUT=/tmp/checks bash benchmarks/gpu_checks.sh           # CPU smoke run: small shapes, interpreter
#
# Exit status: 1 when a kernel misses its accuracy target or a benchmark fails; every step still runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-benchmarks/results/gpu}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tiny=()
[[ -n "${TINY:-}" ]] && tiny=(--tiny --gs "1,4")
mkdir -p "$out"
status=0
"$python" benchmarks/kernel_accuracy.py ${TINY:+--tiny} --out "$out" || status=1
"$python" benchmarks/bench_expert_block.py "${tiny[@]}" ${SCATTERMOE:+--scattermoe-path "$SCATTERMOE"} --out "$out" || status=1
"$python" benchmarks/bench_permute.py "${tiny[@]}" --out "$out" || status=1
exit "$status"
