"""Do these parallel sizes fit this world? The rules megatron-core's and this package's process groups need
(TP x PP dividing the world; expert-TP 1 x EP x PP dividing it, so EP divides a pipeline stage's ranks; experts
divisible by EP; expert-parallel groups spanning nodes evenly), checked by
:func:`granular_moe.parallel.initialize_model_parallel` and, with the trainer's own checks on top, by the
launchers (:mod:`granular_moe.training.layout`). Messages name Megatron's flags and the valid values.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

TP_FLAG = "--tensor-model-parallel-size"
PP_FLAG = "--pipeline-model-parallel-size"
EP_FLAG = "--expert-model-parallel-size"
VP_FLAG = "--num-layers-per-virtual-pipeline-stage"
RANKS_PER_NODE_FLAG = "--moe-ranks-per-node"
RANKS_PER_NODE_SOURCES = f"{RANKS_PER_NODE_FLAG}, LOCAL_WORLD_SIZE or the launcher's --nproc-per-node"


def divisors(n: int, limit: Optional[int] = None) -> str:
    """The divisors of ``n``, as an error message lists valid values (the first ``limit`` of them, then "...")."""
    values = [d for d in range(1, n + 1) if n % d == 0]
    shown = ", ".join(str(d) for d in values[:limit])
    return shown + (", ..." if limit is not None and len(values) > limit else "")


def expert_node_problem(expert_ranks: Sequence[int], ranks_per_node: int) -> Optional[str]:
    """Why an expert-parallel group of these global ranks cannot be split into nodes of ``ranks_per_node``
    processes (node of a rank: ``rank // ranks_per_node``) with the same number of its ranks on every node it
    spans, in consecutive blocks (what the two-level all-to-all needs); None when it can."""
    nodes = [rank // ranks_per_node for rank in expert_ranks]
    counts = Counter(nodes)
    if len(set(counts.values())) == 1 and nodes == sorted(nodes):
        return None
    return (f"the expert-parallel group of ranks {list(expert_ranks)} spans nodes of {ranks_per_node} processes "
            f"unevenly ({', '.join(f'node {n}: {c}' for n, c in sorted(counts.items()))} of its ranks): "
            f"{EP_FLAG} (EP) must divide the ranks per node ({RANKS_PER_NODE_SOURCES}) or be a multiple of them")


def parallel_size_problems(world_size: int, tensor: int, pipeline: int, expert: int,
                           num_experts: int | None = None, source: str | None = None,
                           dense: bool = False, ranks_per_node: int | None = None) -> list[str]:
    """What keeps megatron-core from laying ``world_size`` ranks out as TP x PP x DP with EP expert groups
    (expert TP 1); empty when the sizes fit. ``num_experts``: the layer's (fine-grained) experts, checked
    against EP when given; ``dense``: the model has no experts (then EP must be 1); ``ranks_per_node``:
    processes per node, which must hold whole expert groups or whole parts of one (EP dividing it or a
    multiple of it)."""
    source = source or f"WORLD_SIZE {world_size}"
    names = {TP_FLAG: ("TP", tensor), PP_FLAG: ("PP", pipeline), EP_FLAG: ("EP", expert)}
    invalid = [f"{flag} ({env}) must be >= 1, got {value}" for flag, (env, value) in names.items() if value < 1]
    if invalid:
        return invalid
    problems = []
    if world_size % (tensor * pipeline):
        problems.append(
            f"{TP_FLAG} (TP) {tensor} x {PP_FLAG} (PP) {pipeline} = {tensor * pipeline} does not divide the "
            f"{world_size} processes ({source}); valid TP x PP: {divisors(world_size)}"
        )
    if dense:
        if expert != 1:
            problems.append(f"{EP_FLAG} (EP) {expert} needs an MoE model: set --num-experts, or EP 1")
        return problems
    if world_size % (expert * pipeline):
        stage = world_size // pipeline
        valid = divisors(math.gcd(stage, num_experts or stage)) if world_size % pipeline == 0 else "none"
        problems.append(
            f"{EP_FLAG} (EP) {expert} x {PP_FLAG} (PP) {pipeline} = {expert * pipeline} does not divide the "
            f"{world_size} processes ({source}): megatron-core builds expert groups of expert-TP 1 x EP x PP; "
            f"valid EP with PP {pipeline} and {num_experts} experts: {valid}"
        )
    if num_experts is not None and num_experts % expert:
        problems.append(
            f"{num_experts} experts (--num-experts x --moe-granularity) are not divisible by {EP_FLAG} "
            f"(EP) {expert}; valid EP: {divisors(num_experts)}"
        )
    if ranks_per_node is not None:
        if ranks_per_node < 1 or world_size % ranks_per_node:
            problems.append(f"{ranks_per_node} ranks per node ({RANKS_PER_NODE_SOURCES}) do not divide the "
                            f"{world_size} processes ({source}); valid: {divisors(world_size)}")
        elif not world_size % expert:
            # megatron-core's expert groups (expert TP 1) are consecutive blocks of EP ranks
            node_problem = expert_node_problem(range(expert), ranks_per_node)
            node_problem = node_problem or next(filter(None, (
                expert_node_problem(range(first, first + expert), ranks_per_node)
                for first in range(expert, world_size, expert))), None)
            if node_problem:
                problems.append(node_problem)
    return problems
