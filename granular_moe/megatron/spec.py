"""Megatron-core transformer specs with the granular MoE layer in place of Megatron's ``MoELayer``.

Each function mirrors the megatron-core function of the same name and differs only in the MoE layers:
attention, norms and dense layers are Megatron's own, so ``GPTModel(config, transformer_layer_spec=...)``
builds the model users already know.
"""

from __future__ import annotations

import dataclasses
import logging

from megatron.core.models.gpt import gpt_layer_specs as megatron_specs
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from granular_moe.config import ROUTER_TYPES, GranularMoEConfigError
from granular_moe.layer import GranularMoELayer
from granular_moe.ops import check_kernel_backend


class _KnownMlpFilter(logging.Filter):
    """Megatron's TransformerLayer warns 'Unknown MLP type: <class ModuleSpec>' once per layer for every
    spec-built MLP outside its own list, ours included; building with default kwargs is what we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMlpFilter())


def granular_moe_spec(router_type: str = "token_choice", kernels: str = "auto") -> ModuleSpec:
    """The ``ModuleSpec`` of one granular MoE layer (the MLP of a transformer layer)."""
    if router_type not in ROUTER_TYPES:
        raise GranularMoEConfigError(
            f"--moe-router-type {router_type!r} is not valid; valid values: {', '.join(ROUTER_TYPES)}"
        )
    check_kernel_backend(kernels)
    return ModuleSpec(module=GranularMoELayer, params={"router_type": router_type, "kernels": kernels})


def with_granular_moe(layer_spec: ModuleSpec, moe_spec: ModuleSpec) -> ModuleSpec:
    """``layer_spec`` with its Megatron ``MoELayer`` (if any) replaced by ``moe_spec``."""
    mlp = layer_spec.submodules.mlp
    if not (isinstance(mlp, ModuleSpec) and mlp.module is MoELayer):
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=moe_spec))


def get_gpt_layer_local_spec(
    num_experts: int, router_type: str = "token_choice", kernels: str = "auto", **megatron_kwargs
) -> ModuleSpec:
    """A transformer layer of megatron-core modules whose MLP is the granular MoE layer.

    ``megatron_kwargs`` go to megatron-core's ``get_gpt_layer_local_spec`` (``qk_layernorm``,
    ``normalization``, ...).
    """
    spec = megatron_specs.get_gpt_layer_local_spec(num_experts=num_experts, **megatron_kwargs)
    return with_granular_moe(spec, granular_moe_spec(router_type, kernels))


def get_gpt_layer_with_transformer_engine_spec(
    num_experts: int, router_type: str = "token_choice", kernels: str = "auto", **megatron_kwargs
) -> ModuleSpec:
    """The Transformer-Engine variant of :func:`get_gpt_layer_local_spec` (TE attention and norms)."""
    _require_transformer_engine()
    spec = megatron_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, **megatron_kwargs)
    return with_granular_moe(spec, granular_moe_spec(router_type, kernels))


def get_gpt_decoder_block_spec(
    config,
    use_transformer_engine: bool,
    router_type: str = "token_choice",
    kernels: str = "auto",
    **megatron_kwargs,
):
    """Megatron's decoder block spec with granular MoE layers where ``config.moe_layer_freq`` puts MoE.

    Dense layers (``moe_layer_freq`` 0 entries) stay Megatron's MLP; pipeline stages get their slice of
    layers exactly as in megatron-core. ``megatron_kwargs``: ``normalization``, ``qk_l2_norm``,
    ``vp_stage``, ``pp_rank``.
    """
    if use_transformer_engine:
        _require_transformer_engine()
    block = megatron_specs.get_gpt_decoder_block_spec(config, use_transformer_engine, **megatron_kwargs)
    moe_spec = granular_moe_spec(router_type, kernels)
    block.layer_specs = [with_granular_moe(spec, moe_spec) for spec in block.layer_specs]
    return block


def _require_transformer_engine() -> None:
    if not megatron_specs.HAVE_TE:
        raise ImportError(
            "the Transformer-Engine spec needs transformer_engine importable; use the local spec "
            "(--transformer-impl local / use_transformer_engine=False) without it"
        )
