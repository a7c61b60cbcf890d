"""Small builders shared by the tests."""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from granular_moe.config import apply_granularity


def moe_config(granularity=1, num_experts=4, topk=2, hidden=16, ffn=64, dtype=torch.float64, **overrides):
    """A tiny megatron-core config of a base MoE made fine-grained by ``granularity``."""
    base = dict(
        num_layers=2,
        hidden_size=hidden,
        num_attention_heads=2,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_router_pre_softmax=topk == 1,  # megatron-core requires it for top-1 softmax (apply_granularity: k*G)
        ffn_hidden_size=ffn,
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(overrides)
    return apply_granularity(TransformerConfig(**base), granularity)
