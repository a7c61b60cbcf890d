"""The granular MoE layer in megatron-core's ``HybridModel`` (the model megatron-core 0.19 recommends).

A ``HybridModel`` stacks layers by a pattern (``hybrid_layer_pattern``: ``*`` attention, ``-`` MLP, ``E`` MoE,
``M`` Mamba, ...); its ``HybridStack`` spec holds one layer spec per symbol. :func:`get_hybrid_stack_spec`
gives that spec with the granular layer as the MLP of every ``E`` layer:

- ``use_transformer_engine=True``: megatron-core's own ``hybrid_stack_spec`` (Transformer Engine modules),
  its ``E`` layer's ``MoELayer`` replaced;
- ``use_transformer_engine=False``: attention (``*``), MLP (``-``) and MoE (``E``) layers of megatron-core's
  local modules (the same modules as :func:`granular_moe.megatron.get_gpt_layer_local_spec`), for machines
  without Transformer Engine; the other symbols need it and are refused by name when built.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs as megatron_specs
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

from granular_moe.megatron.spec import (
    MissingMoEPositionError,
    _require_transformer_engine,
    is_granular_moe,
    with_granular_moe,
)

MOE_SYMBOL = "E"
LOCAL_SYMBOLS = ("*", "-", MOE_SYMBOL)


class LocalHybridStack(HybridStack):
    """megatron-core's ``HybridStack`` with a final norm of its local modules (``HybridStack`` builds
    Transformer Engine's ``TENorm`` there); ``normalization`` is ``LayerNorm`` or ``RMSNorm``."""

    def __init__(self, config, submodules, *args, normalization: str = "LayerNorm", post_layer_norm: bool = True,
                 post_process: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, post_process=post_process, **kwargs)
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm:
            norm = LocalSpecProvider().layer_norm(rms_norm=normalization == "RMSNorm", for_qk=False)
            self.final_norm = norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


class TransformerEngineLayerRequired:
    """Stands for a hybrid layer type that has only Transformer Engine modules in megatron-core."""

    def __init__(self, *args, symbol: str = "?", **kwargs):
        raise MissingMoEPositionError(
            f"hybrid layer {symbol!r} has no local (non Transformer Engine) implementation in megatron-core; "
            f"use get_hybrid_stack_spec(..., use_transformer_engine=True) or only the symbols "
            f"{', '.join(LOCAL_SYMBOLS)}"
        )


def _local_hybrid_stack_spec(config, normalization: str) -> ModuleSpec:
    def local(num_experts):
        return megatron_specs.get_gpt_layer_local_spec(
            num_experts=num_experts, qk_layernorm=config.qk_layernorm, normalization=normalization
        ).submodules

    dense, moe = local(None), local(config.num_moe_experts or 1)
    without_attention = dict(input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    attention = dataclasses.replace(dense, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    unavailable = {
        field: ModuleSpec(module=TransformerEngineLayerRequired, params={"symbol": symbol})
        for field, symbol in (("mamba_layer", "M"), ("gdn_layer", "G"), ("dsa_layer", "D"), ("mla_layer", "+"))
    }
    return ModuleSpec(
        module=LocalHybridStack,
        params={"normalization": normalization},
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
            mlp_layer=ModuleSpec(module=MLPLayer, submodules=dataclasses.replace(dense, **without_attention)),
            moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=dataclasses.replace(moe, **without_attention)),
            **unavailable,
        ),
    )


def get_hybrid_stack_spec(
    config,
    use_transformer_engine: bool,
    router_type: str = "token_choice",
    kernels: str = "auto",
    normalization: Optional[str] = None,
    hybrid_layer_pattern: Optional[str] = None,
) -> ModuleSpec:
    """A ``HybridStack`` spec whose MoE (``E``) layers are granular; pass it to ``HybridModel`` as
    ``hybrid_stack_spec``.

    ``normalization`` (``LayerNorm`` / ``RMSNorm``) applies to the local modules. With
    ``hybrid_layer_pattern`` given, a config with experts and a pattern without ``E`` (or the reverse) is
    refused, as is a local spec for symbols that need Transformer Engine.
    """
    if hybrid_layer_pattern is not None:
        _check_pattern(config, hybrid_layer_pattern, use_transformer_engine)
    if use_transformer_engine:
        _require_transformer_engine()
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as stack
    else:
        stack = _local_hybrid_stack_spec(config, normalization or config.normalization)
    moe_layer = with_granular_moe(stack.submodules.moe_layer, router_type, kernels)
    if not is_granular_moe(moe_layer.submodules.mlp):
        raise MissingMoEPositionError("the hybrid stack spec's MoE layer holds no MoELayer to replace")
    return dataclasses.replace(stack, submodules=dataclasses.replace(stack.submodules, moe_layer=moe_layer))


def _check_pattern(config, pattern: str, use_transformer_engine: bool) -> None:
    main = pattern.split("/")[0].replace("|", "")
    has_moe = MOE_SYMBOL in main
    if config.num_moe_experts and not has_moe:
        raise MissingMoEPositionError(
            f"--num-experts {config.num_moe_experts} but hybrid_layer_pattern {pattern!r} has no MoE layer "
            f"({MOE_SYMBOL!r}): put {MOE_SYMBOL!r} where the granular layer goes"
        )
    if has_moe and not config.num_moe_experts:
        raise MissingMoEPositionError(
            f"hybrid_layer_pattern {pattern!r} has MoE layers ({MOE_SYMBOL!r}) but --num-experts is not set"
        )
    if not use_transformer_engine:
        other = sorted({symbol for symbol in main if symbol not in LOCAL_SYMBOLS})
        if other:
            raise MissingMoEPositionError(
                f"hybrid_layer_pattern {pattern!r} holds {', '.join(repr(s) for s in other)}, which need Transformer "
                f"Engine; the local spec has {', '.join(repr(s) for s in LOCAL_SYMBOLS)}"
            )
