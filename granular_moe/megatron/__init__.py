"""Megatron integration: transformer specs (GPTModel and HybridModel), CPU shims, arguments and the
Megatron-LM entry points."""

from granular_moe.megatron.hybrid_spec import get_hybrid_stack_spec
from granular_moe.megatron.spec import (
    MissingMoEPositionError,
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    granular_moe_spec,
    with_granular_moe,
)

__all__ = [
    "MissingMoEPositionError",
    "get_gpt_decoder_block_spec",
    "get_gpt_layer_local_spec",
    "get_gpt_layer_with_transformer_engine_spec",
    "get_hybrid_stack_spec",
    "granular_moe_spec",
    "with_granular_moe",
]
