"""Does the trainer's layout fit this world? One answer for the launchers, the trainer and the Megatron-LM
wrapper.

:func:`check_layout` takes the rules the process groups need (:func:`granular_moe.parallel_layout.
parallel_size_problems`: TP x PP dividing the world, EP x PP dividing it, experts divisible by EP, expert groups
spanning nodes evenly), adds what the trainer's flags need on top (layers, heads, sequence, batch, virtual
pipeline stages) and raises one :class:`LaunchConfigError` listing every violation with its flag, environment
variable and valid values.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from granular_moe.parallel_layout import EP_FLAG, PP_FLAG, TP_FLAG, VP_FLAG, divisors, parallel_size_problems
from granular_moe.training.distributed import LaunchConfigError

# Environment variables that feed the trainer's parallel-size flags.
PARALLEL_ENV = {"TP": TP_FLAG, "PP": PP_FLAG, "EP": EP_FLAG}


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
