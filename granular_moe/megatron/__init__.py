"""Megatron integration: transformer specs, CPU shims (and arguments, Megatron-LM entry points)."""

from granular_moe.megatron.spec import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    granular_moe_spec,
    with_granular_moe,
)

__all__ = [
    "get_gpt_decoder_block_spec",
    "get_gpt_layer_local_spec",
    "get_gpt_layer_with_transformer_engine_spec",
    "granular_moe_spec",
    "with_granular_moe",
]
