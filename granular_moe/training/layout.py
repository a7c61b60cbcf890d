"""Do these parallel sizes fit this world? One answer for the launchers, the trainer, the Megatron-LM wrapper
and :func:`granular_moe.parallel.initialize_model_parallel`.

:func:`parallel_size_problems` checks the sizes megatron-core's ``initialize_model_parallel`` needs (TP x PP
dividing the world; expert-TP 1 x EP x PP dividing it, so EP divides a pipeline stage's ranks; experts
divisible by EP); :func:`check_layout` adds what the trainer's flags need on top (layers, heads, sequence,
batch, virtual pipeline stages) and raises one :class:`LaunchConfigError` listing every violation with its
flag, environment variable and valid values.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from granular_moe.training.distributed import LaunchConfigError

TP_FLAG = "--tensor-model-parallel-size"
PP_FLAG = "--pipeline-model-parallel-size"
EP_FLAG = "--expert-model-parallel-size"
VP_FLAG = "--num-layers-per-virtual-pipeline-stage"
RANKS_PER_NODE_FLAG = "--moe-ranks-per-node"
RANKS_PER_NODE_SOURCES = f"{RANKS_PER_NODE_FLAG}, LOCAL_WORLD_SIZE or the launcher's --nproc-per-node"
# Environment variables that feed the trainer's parallel-size flags.
PARALLEL_ENV = {"TP": TP_FLAG, "PP": PP_FLAG, "EP": EP_FLAG}


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Layout:
    """How ``world_size`` processes split into tensor, pipeline, data and expert parallel groups."""

    world_size: int
    tensor: int
    pipeline: int
    expert: int
    num_experts: int | None  # fine-grained (E x G); None for a dense model
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved 1F1B), None: one
    ranks_per_node: int | None = None  # processes per node; None: one node

    @property
    def expert_nodes(self) -> int:
        """Nodes one expert-parallel group spans (its ranks are consecutive)."""
        if not self.ranks_per_node or self.expert <= self.ranks_per_node:
            return 1
        return self.expert // self.ranks_per_node

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def expert_data(self) -> int:
        """Expert-data-parallel size: megatron-core's world / (expert TP 1 x EP x PP)."""
        return self.world_size // (self.expert * self.pipeline)

    def describe(self) -> str:
        text = f"{self.world_size} ranks = TP {self.tensor} x PP {self.pipeline} x DP {self.data}"
        if self.virtual_pipeline:
            text += f" ({self.virtual_pipeline} virtual stages per pipeline rank)"
        if self.num_experts is None:
            return text + "; dense"
        text += (f"; {self.num_experts} experts over EP {self.expert} ({self.num_experts // self.expert} per rank), "
                 f"expert DP {self.expert_data}")
        if self.expert_nodes > 1:
            text += (f"; each EP group spans {self.expert_nodes} nodes of {self.expert // self.expert_nodes} ranks: "
                     f"two-level all-to-all")
        return text


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


def check_layout(args: argparse.Namespace, world_size: int, world_source: str | None = None,
                 ranks_per_node: int | None = None) -> Layout:
    """Check the parsed trainer arguments against ``world_size`` processes; raise
    :class:`LaunchConfigError` listing every violation (flags, environment variables, valid values).

    Besides :func:`parallel_size_problems`: ``--num-layers`` divisible by PP (``TransformerConfig``), and by
    PP x ``--num-layers-per-virtual-pipeline-stage`` (interleaved 1F1B, which megatron-core runs with
    PP > 2 and a multiple of PP micro-batches per step); ``--num-attention-heads`` by TP; ``--global-batch-size``
    by micro batch x DP. ``--sequence-parallel`` needs TP > 1 and TP dividing ``--seq-length``. (An MoE model
    with TP > 1 trains with or without it: the granular layer gives each TP rank its own tokens either way, so
    without it TP must divide a micro-batch's tokens.)
    """
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    num_experts = args.num_experts or None
    ranks_per_node = getattr(args, "moe_ranks_per_node", None) or ranks_per_node
    problems = parallel_size_problems(world_size, tp, pp, ep, num_experts, world_source, dense=num_experts is None,
                                      ranks_per_node=ranks_per_node)
    if problems and any("must be >= 1" in problem for problem in problems):
        raise LaunchConfigError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
    if args.num_layers % pp:
        problems.append(f"--num-layers {args.num_layers} is not divisible by {PP_FLAG} (PP) {pp}; "
                        f"valid PP: {divisors(args.num_layers)}")
    if args.num_attention_heads % tp:
        problems.append(f"--num-attention-heads {args.num_attention_heads} is not divisible by {TP_FLAG} (TP) "
                        f"{tp}; valid TP: {divisors(args.num_attention_heads)}")
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else None
    if groups is not None and (groups % tp or args.num_attention_heads % groups):
        problems.append(f"--num-query-groups {groups} must divide --num-attention-heads {args.num_attention_heads} and "
                        f"be divisible by {TP_FLAG} (TP) {tp}")
    if args.sequence_parallel and tp == 1:
        problems.append(f"--sequence-parallel needs {TP_FLAG} (TP) > 1; drop it or raise TP")
    if args.sequence_parallel and args.seq_length % tp:
        problems.append(f"--seq-length {args.seq_length} is not divisible by {TP_FLAG} (TP) {tp}, which "
                        f"--sequence-parallel splits it over")
    elif num_experts is not None and not args.sequence_parallel and (args.seq_length * args.micro_batch_size) % tp:
        problems.append(f"--seq-length {args.seq_length} x --micro-batch-size {args.micro_batch_size} tokens are not "
                        f"divisible by {TP_FLAG} (TP) {tp}, which the MoE layers split them over")
    data = world_size // (tp * pp) if not world_size % (tp * pp) else None
    if args.global_batch_size and data:
        step = args.micro_batch_size * data
        if args.global_batch_size % step:
            problems.append(
                f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                f"{args.micro_batch_size} x DP {data} = {step}"
            )
    virtual = _virtual_pipeline(args, pp, data, problems)
    if problems:
        raise LaunchConfigError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
    return Layout(world_size, tp, pp, ep, num_experts, virtual, ranks_per_node)


def _virtual_pipeline(args, pp: int, data: int | None, problems: list) -> int | None:
    """Model chunks per pipeline rank for ``--num-layers-per-virtual-pipeline-stage`` (None without it)."""
    per_chunk = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if per_chunk is None:
        return None
    if per_chunk < 1:
        problems.append(f"{VP_FLAG} must be >= 1, got {per_chunk}")
        return None
    if pp <= 2:
        problems.append(f"{VP_FLAG} (interleaved 1F1B) needs {PP_FLAG} (PP) > 2, as megatron-core's schedule does; "
                        f"got PP {pp}")
    if args.num_layers % pp or (args.num_layers // pp) % per_chunk:
        problems.append(f"--num-layers {args.num_layers} / PP {pp} layers per stage are not divisible by "
                        f"{VP_FLAG} {per_chunk}")
        return None
    chunks = args.num_layers // pp // per_chunk
    if data:
        micro_batches = (args.global_batch_size or args.micro_batch_size * data) // (args.micro_batch_size * data)
        if chunks > 1 and micro_batches % pp:
            problems.append(f"interleaved 1F1B needs a multiple of PP {pp} micro-batches per step, got "
                            f"{micro_batches} (--global-batch-size / (--micro-batch-size x DP {data}))")
    return chunks if chunks > 1 else None
