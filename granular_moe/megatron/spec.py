"""megatron-core transformer specs with the granular MoE layer in place of Megatron's ``MoELayer``.

megatron-core 0.19 builds a transformer layer's MLP from a builder (``TransformerLayerSubmodules.mlp``,
called with ``config``, ``pg_collection``, ``is_mtp_layer`` and ``name``); its MoE positions hold
``functools.partial(MoELayer, submodules=MoESubmodules(...))``. Each function here mirrors the megatron-core
function of the same name and differs only in those positions, which get :func:`granular_moe_spec`'s builder:
attention, norms and dense layers stay Megatron's own, and so does the shared expert
(``MoESubmodules.shared_experts``, megatron-core's ``SharedExpertMLP``), which the granular layer builds when
the config asks for one. ``GPTModel(config, transformer_layer_spec=...)`` and ``HybridModel(config,
hybrid_stack_spec=...)`` then build the models users already know.

A spec function that finds an MoE position it cannot fill while the config asks for experts raises
:class:`MissingMoEPositionError`: a model never silently lacks the granular layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Optional

from megatron.core.models.gpt import gpt_layer_specs as megatron_specs
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from granular_moe.config import ROUTER_TYPES, GranularMoEConfigError
from granular_moe.layer import GranularMoELayer, GranularMoESubmodules
from granular_moe.ops import check_kernel_backend


class MissingMoEPositionError(GranularMoEConfigError):
    """The config asks for experts where a spec holds no MoE layer the plugin can replace."""


class _KnownMlpFilter(logging.Filter):
    """Megatron's TransformerLayer warns 'Unknown MLP type' for every MLP outside its own list, ours
    included; building with default kwargs is what we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMlpFilter())


def granular_moe_spec(
    router_type: str = "token_choice", kernels: str = "auto", shared_experts: Optional[Callable] = None
) -> Callable:
    """The builder of one granular MoE layer, as megatron-core's ``TransformerLayer`` calls its ``mlp``.

    ``shared_experts``: megatron-core's shared-expert builder (``MoESubmodules.shared_experts``); the layer
    builds it when ``--moe-shared-expert-intermediate-size`` is set. :func:`with_granular_moe` passes the
    one of the Megatron spec it replaces, so the shared expert uses that spec's linear layers (local or
    Transformer Engine).
    """
    if router_type not in ROUTER_TYPES:
        raise GranularMoEConfigError(
            f"--moe-router-type {router_type!r} is not valid; valid values: {', '.join(ROUTER_TYPES)}"
        )
    check_kernel_backend(kernels)
    return functools.partial(
        GranularMoELayer,
        submodules=GranularMoESubmodules(shared_experts=shared_experts),
        router_type=router_type,
        kernels=kernels,
    )


def is_megatron_moe(mlp) -> bool:
    """Whether a layer spec's ``mlp`` is megatron-core's ``MoELayer`` (a builder or a ``ModuleSpec``)."""
    if isinstance(mlp, functools.partial):
        return isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer)
    if isinstance(mlp, ModuleSpec):
        return isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)
    return False


def is_granular_moe(mlp) -> bool:
    """Whether a layer spec's ``mlp`` builds the granular layer."""
    return isinstance(mlp, functools.partial) and mlp.func is GranularMoELayer


def _megatron_shared_experts(mlp):
    submodules = mlp.keywords.get("submodules") if isinstance(mlp, functools.partial) else mlp.submodules
    return getattr(submodules, "shared_experts", None)


def with_granular_moe(layer_spec: ModuleSpec, router_type: str = "token_choice", kernels: str = "auto"):
    """``layer_spec`` with its Megatron ``MoELayer`` (if any) replaced by the granular layer (keeping the
    Megatron spec's shared-expert builder); other layers unchanged."""
    mlp = getattr(layer_spec.submodules, "mlp", None)
    if not is_megatron_moe(mlp):
        return layer_spec
    moe = granular_moe_spec(router_type, kernels, shared_experts=_megatron_shared_experts(mlp))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=moe))


def get_gpt_layer_local_spec(
    num_experts: int, router_type: str = "token_choice", kernels: str = "auto", **megatron_kwargs
) -> ModuleSpec:
    """A transformer layer of megatron-core modules whose MLP is the granular MoE layer.

    ``megatron_kwargs`` go to megatron-core's ``get_gpt_layer_local_spec`` (``qk_layernorm``,
    ``normalization``, ...).
    """
    spec = megatron_specs.get_gpt_layer_local_spec(num_experts=num_experts, **megatron_kwargs)
    return _require_granular(with_granular_moe(spec, router_type, kernels), "get_gpt_layer_local_spec")


def get_gpt_layer_with_transformer_engine_spec(
    num_experts: int, router_type: str = "token_choice", kernels: str = "auto", **megatron_kwargs
) -> ModuleSpec:
    """The Transformer-Engine variant of :func:`get_gpt_layer_local_spec` (TE attention and norms)."""
    _require_transformer_engine()
    spec = megatron_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, **megatron_kwargs)
    spec = with_granular_moe(spec, router_type, kernels)
    return _require_granular(spec, "get_gpt_layer_with_transformer_engine_spec")


def moe_layer_pattern(config) -> list[int]:
    """megatron-core's reading of ``moe_layer_freq``: 1 for an MoE layer, 0 for a dense one, per layer."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if layer % freq == 0 else 0 for layer in range(config.num_layers)]
    return list(freq)


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
    if config.num_moe_experts:
        layer_kwargs = {k: v for k, v in megatron_kwargs.items() if k in ("normalization", "qk_l2_norm")}
        every_layer = megatron_specs.get_gpt_decoder_layer_specs(config, use_transformer_engine, **layer_kwargs)
        placed = [is_megatron_moe(getattr(spec.submodules, "mlp", None)) for spec in every_layer]
        wanted = [bool(entry) for entry in moe_layer_pattern(config)]
        if placed != wanted:
            missing = [layer + 1 for layer, (p, w) in enumerate(zip(placed, wanted)) if w and not p]
            raise MissingMoEPositionError(
                f"--num-experts {config.num_moe_experts} with --moe-layer-freq {config.moe_layer_freq} puts MoE in "
                f"layers {[i + 1 for i, w in enumerate(wanted) if w]}, but megatron-core's decoder block spec holds "
                f"no MoELayer in layers {missing}: the granular layer cannot be placed there"
            )
    block = megatron_specs.get_gpt_decoder_block_spec(config, use_transformer_engine, **megatron_kwargs)
    block.layer_specs = [with_granular_moe(spec, router_type, kernels) for spec in block.layer_specs]
    return block


def _require_granular(spec: ModuleSpec, function: str) -> ModuleSpec:
    if not is_granular_moe(getattr(spec.submodules, "mlp", None)):
        raise MissingMoEPositionError(
            f"megatron-core's {function} gave a layer without an MoELayer to replace (is num_experts set?)"
        )
    return spec


def _require_transformer_engine() -> None:
    if not megatron_specs.HAVE_TE:
        raise ImportError(
            "the Transformer-Engine spec needs transformer_engine importable; use the local spec "
            "(--transformer-impl local / use_transformer_engine=False) without it"
        )
