"""``--moe-granularity`` and the plugin's other flags, for any argparse parser (Megatron-LM's
``extra_args_provider`` or this package's main job).

Megatron-LM checks ``--num-experts`` against ``--expert-model-parallel-size`` in ``validate_args``, right
after parsing, so the translation to fine-grained values must happen at parse time: the parser given to
:func:`add_granular_moe_args` returns already-translated arguments.
"""

from __future__ import annotations

import argparse
import functools

from granular_moe.config import ROUTER_TYPES, GranularMoEConfigError, GranularShape, granular_shape
from granular_moe.ops import KERNEL_BACKENDS


def megatron_default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's ``--ffn-hidden-size`` when unset: 4h, or 2/3 of it rounded down to 64 with SwiGLU."""
    return int((4 * hidden_size * 2 / 3) / 64) * 64 if swiglu else 4 * hidden_size


def add_granular_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--moe-granularity``, ``--moe-router-type``, ``--moe-kernels`` and ``--moe-ranks-per-node``; usable
    as Megatron-LM's ``extra_args_provider``. Parsing then multiplies ``--num-experts`` and ``--moe-router-topk``
    by ``G`` and divides the expert FFN size by ``G`` (see :func:`apply_granularity_to_args`)."""
    group = parser.add_argument_group(title="granular MoE")
    group.add_argument(
        "--moe-granularity", type=int, default=1,
        help="G = d_ff / d_expert: split every expert into G, multiply --num-experts and --moe-router-topk by G "
        "and divide the expert FFN size (--moe-ffn-hidden-size, else --ffn-hidden-size) by G. 1 is a standard MoE.",
    )
    group.add_argument(
        "--moe-router-type", choices=ROUTER_TYPES, default="token_choice",
        help="token_choice: each token takes its top-k experts; expert_choice: each expert takes its top-C tokens.",
    )
    group.add_argument(
        "--moe-kernels", choices=KERNEL_BACKENDS, default="auto",
        help="Kernels of the granular MoE layer: auto picks the fastest available on the device; torch forces the "
        "plain PyTorch reference.",
    )
    group.add_argument(
        "--moe-ranks-per-node", type=int, default=None,
        help="Processes per node, for the expert-parallel all-to-all: an expert-parallel group spanning nodes "
        "sends each token across once per destination node, then forwards it inside the node. Default: "
        "LOCAL_WORLD_SIZE (torchrun, the launchers); the world size keeps one flat all-to-all.",
    )
    parse_known_args = parser.parse_known_args

    @functools.wraps(parse_known_args)
    def parse_and_apply_granularity(*args, **kwargs):
        namespace, extras = parse_known_args(*args, **kwargs)
        apply_granularity_to_args(namespace)
        return namespace, extras

    # argparse's parse_args goes through parse_known_args: both return translated arguments.
    parser.parse_known_args = parse_and_apply_granularity
    return parser


def apply_granularity_to_args(args: argparse.Namespace) -> GranularShape | None:
    """Turn base ``--num-experts/--moe-router-topk/--moe-ffn-hidden-size`` into fine-grained values.

    Idempotent: ``args.moe_granularity_applied`` records that it ran (Megatron-LM saves the arguments in its
    checkpoints, so a resumed job must not apply G twice). An unset ``--expert-tensor-parallel-size``
    (Megatron-LM would make it ``--tensor-model-parallel-size``) becomes 1, which the granular layer runs.
    Returns the fine-grained shape, or None for a dense model.
    """
    granularity = args.moe_granularity
    if not args.num_experts:
        if granularity != 1:
            raise GranularMoEConfigError("--moe-granularity needs an MoE model: set --num-experts (>= 1)")
        return None
    if getattr(args, "expert_tensor_parallel_size", 1) is None:
        args.expert_tensor_parallel_size = 1
    ffn = args.ffn_hidden_size or megatron_default_ffn_hidden_size(args.hidden_size, getattr(args, "swiglu", False))
    if getattr(args, "moe_granularity_applied", False):
        return GranularShape(
            granularity, args.num_experts, args.moe_router_topk,
            args.moe_ffn_hidden_size or ffn, getattr(args, "expert_model_parallel_size", 1),
        )
    shape = granular_shape(
        num_experts=args.num_experts,
        topk=args.moe_router_topk,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        granularity=granularity,
        expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1),
    )
    args.num_experts = shape.num_experts
    args.moe_router_topk = shape.topk
    args.moe_ffn_hidden_size = shape.expert_hidden_size
    args.moe_granularity_applied = True
    return shape
