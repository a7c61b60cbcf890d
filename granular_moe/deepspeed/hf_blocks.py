"""Hugging Face MoE models with :class:`~granular_moe.deepspeed.GranularMoE` blocks: :func:`replace_moe_blocks` swaps
the sparse MoE blocks of a ``transformers`` Qwen3-MoE, Mixtral or DeepSeek-V3 model for ``GranularMoE`` layers that
compute the same thing, weights carried over, so the model can be fine-tuned with DeepSpeed and expert parallelism.

What each block becomes (``E`` experts of FFN size ``I``, top-``k``, granularity ``G``):

- router: ``E * G`` rows, row ``i`` the block's router row ``i // G`` (the ``G`` pieces of one expert score alike,
  the main job's upcycling rule), so top-``k * G`` routing picks the ``k`` experts the block picks, all ``G``
  pieces of each;
- experts: fine expert ``i`` the slice ``i % G`` of expert ``i // G`` (``I / G`` hidden units of both the gate and
  the up projection, and of the down projection), the down projection times ``G``: each piece gets ``1/G`` of its
  expert's gate, so the pieces add up to the expert's output;
- Qwen3-MoE: softmax scores, gates renormalised over the top-k (``norm_topk_prob``) or not (pre-softmax);
  Mixtral: softmax over the top-k; DeepSeek-V3: sigmoid scores, ``e_score_correction_bias`` as the aux-loss-free
  expert bias (each row repeated ``G`` times), gates renormalised and times ``routed_scaling_factor``, group-limited
  top-k (``n_group``, ``topk_group``), the shared expert as GranularMoE's shared expert.

Before any training the replaced model's logits equal the original's to fp32 rounding, at any ``G``. Each replaced
block is a :class:`GranularMoEBlock` whose ``moe`` is the ``GranularMoE``; the blocks return the hidden states as
the originals do, and :func:`moe_aux_loss` sums their last forward's ``l_aux`` (the router's balance loss without
coefficient) for the training loop to add. What a block's config holds that the layer cannot compute the same way
is refused before anything is replaced (:class:`UnsupportedMoEBlockError`, naming the config field).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from granular_moe.config import GranularMoEConfigError

SUPPORTED = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock", "DeepseekV3MoE")
ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}  # transformers' hidden_act -> GranularMoE's gated activation


class UnsupportedMoEBlockError(GranularMoEConfigError):
    """A model whose MoE blocks are not of a supported class, or whose config the granular layer cannot compute the
    same way; the message names the class or config field and the supported values."""


class GranularMoEBlock(torch.nn.Module):
    """A Hugging Face sparse MoE block's replacement: ``forward(hidden_states [b, s, h]) -> hidden_states``, as the
    original; ``moe`` holds the :class:`~granular_moe.deepspeed.GranularMoE`, ``source`` the original class's name."""

    def __init__(self, moe, source: str):
        super().__init__()
        self.moe, self.source = moe, source

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output, _, _ = self.moe(hidden_states)
        return output


@dataclass
class BlockPlan:
    """How one block becomes a GranularMoE: the layer's arguments and the weights to carry over."""

    name: str
    source: str
    kwargs: dict
    router: torch.Tensor  # [E, h]
    gate_up: torch.Tensor  # [E, 2 I, h]
    down: torch.Tensor  # [E, h, I]
    expert_bias: torch.Tensor | None = None
    shared: dict = field(default_factory=dict)  # gate_proj, up_proj, down_proj weights


def _block_classes() -> dict:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return {Qwen3MoeSparseMoeBlock: "qwen3_moe", MixtralSparseMoeBlock: "mixtral", DeepseekV3MoE: "deepseek_v3"}


def _routing(kind: str, block, config, granularity: int) -> tuple[dict, list]:
    """The GranularMoE routing arguments of a block, and the config fields it cannot represent."""
    gate, k = block.gate, block.gate.top_k
    problems = []
    if kind == "mixtral":
        if config.router_jitter_noise:
            problems.append(f"router_jitter_noise {config.router_jitter_noise} (valid: 0): GranularMoE does not "
                            f"jitter its input")
        routing = dict(score_function="softmax", pre_softmax=False)
    elif kind == "qwen3_moe":
        routing = dict(score_function="softmax", pre_softmax=not gate.norm_topk_prob)
    else:
        routing = dict(score_function="sigmoid", expert_bias=True, aux_loss_type="none")
        if gate.routed_scaling_factor != 1.0:
            routing["topk_scaling_factor"] = float(gate.routed_scaling_factor)
        if k * granularity > 1 and not gate.norm_topk_prob:
            problems.append("norm_topk_prob false with num_experts_per_tok x granularity > 1: megatron-core's sigmoid "
                            "routing renormalises the top-k gates (valid: true)")
        if gate.num_group > 1 and gate.topk_group < gate.num_group:
            if k != 2 * gate.topk_group:
                problems.append(f"num_experts_per_tok {k} with topk_group {gate.topk_group}: DeepSeek-V3 scores a "
                                f"group by its 2 best experts, GranularMoE by its top-k / group-topk; valid: "
                                f"num_experts_per_tok = 2 x topk_group")
            routing.update(num_groups=gate.num_group, group_topk=gate.topk_group)
        routing["shared_expert_size"] = block.shared_experts.intermediate_size
    renormalised = routing.get("pre_softmax") is False or (kind == "deepseek_v3" and gate.norm_topk_prob)
    if k * granularity == 1 and renormalised:
        problems.append("one expert per token with its gate renormalised to 1 (norm_topk_prob, or Mixtral's softmax "
                        "over the top-k): GranularMoE's top-1 gate is the expert's score; valid: granularity >= 2")
    return routing, problems


def plan_blocks(model: torch.nn.Module, ep_size: int, granularity: int, **options) -> list[BlockPlan]:
    """Every sparse MoE block of ``model`` and how it becomes a GranularMoE, every argument checked; raises
    :class:`UnsupportedMoEBlockError` (or the layer's named errors) before anything is built."""
    classes = _block_classes()
    config = model.config
    plans, problems, unsupported = [], [], set()
    for name, module in model.named_modules():
        kind = classes.get(type(module))
        if kind is None:
            if hasattr(module, "experts") and hasattr(module, "gate") and not isinstance(module, GranularMoEBlock):
                unsupported.add(type(module).__name__)
            continue
        experts = module.experts
        routing, found = _routing(kind, module, config, granularity)
        problems += [f"{type(module).__name__} ({name}): {problem}" for problem in found]
        activation = getattr(config, "hidden_act", "silu")
        if activation not in ACTIVATIONS:
            problems.append(f"hidden_act {activation!r} (valid: {', '.join(ACTIVATIONS)})")
        kwargs = dict(hidden_size=experts.hidden_dim, expert=experts.intermediate_dim, num_experts=experts.num_experts,
                      ep_size=ep_size, k=module.gate.top_k, drop_tokens=False, granularity=granularity,
                      activation=ACTIVATIONS.get(activation, "swiglu"), params_dtype=experts.gate_up_proj.dtype)
        kwargs.update(routing)
        kwargs.update(options)  # the caller's GranularMoE arguments win (e.g. drop_tokens, capacity_factor)
        plans.append(BlockPlan(name, type(module).__name__, kwargs, module.gate.weight.detach(),
                               experts.gate_up_proj.detach(), experts.down_proj.detach(),
                               getattr(module.gate, "e_score_correction_bias", None),
                               {part: getattr(module.shared_experts, part).weight.detach()
                                for part in ("gate_proj", "up_proj", "down_proj")} if kind == "deepseek_v3" else {}))
    if unsupported:
        raise UnsupportedMoEBlockError(
            f"{type(model).__name__} has MoE blocks of class {', '.join(sorted(unsupported))}: not supported; "
            f"supported: {', '.join(SUPPORTED)}")
    if not plans:
        raise UnsupportedMoEBlockError(
            f"{type(model).__name__} has no sparse MoE block of a supported class ({', '.join(SUPPORTED)})")
    if problems:
        raise UnsupportedMoEBlockError("the MoE blocks cannot be computed the same way by GranularMoE:\n  - "
                                       + "\n  - ".join(sorted(set(problems))))
    from granular_moe.deepspeed.layer import validated_arguments

    for plan in plans:
        validated_arguments(plan.kwargs)
    return plans


@torch.no_grad()
def build_block(plan: BlockPlan) -> GranularMoEBlock:
    """The GranularMoE of one planned block with its weights (this rank's experts)."""
    from granular_moe.deepspeed.layer import GranularMoE

    moe = GranularMoE(**plan.kwargs)
    layer, G = moe.deepspeed_moe, moe.granularity
    router = layer.router
    # the main job's upcycling rule: expert i takes router row i // G
    router.weight.copy_(plan.router.repeat_interleave(G, dim=0).to(router.weight.dtype))
    if plan.expert_bias is not None:
        router.expert_bias.copy_(plan.expert_bias.repeat_interleave(G).to(router.expert_bias.dtype))
    moe.load_base_experts(plan.gate_up, plan.down)
    if plan.shared:
        shared = layer.shared_experts
        shared.linear_fc1.weight.copy_(torch.cat([plan.shared["gate_proj"], plan.shared["up_proj"]]))
        shared.linear_fc2.weight.copy_(plan.shared["down_proj"])
    return GranularMoEBlock(moe, plan.source)


def replace_moe_blocks(model: torch.nn.Module, ep_size: int = 1, granularity: int = 1, **options) -> torch.nn.Module:
    """Swap every Qwen3-MoE / Mixtral / DeepSeek-V3 sparse MoE block of ``model`` for a :class:`GranularMoEBlock`
    (in place; returns ``model``). ``options``: further :class:`~granular_moe.deepspeed.GranularMoE` arguments
    (e.g. ``kernels``, ``aux_loss_type``, ``bias_update_rate``, ``capacity_factor`` with ``drop_tokens=True``).

    Collective when ``ep_size > 1`` or a block has a shared expert (process groups are created): every rank replaces
    the same model. Every block is checked before the first is replaced."""
    plans = plan_blocks(model, ep_size, granularity, **options)
    for plan in plans:
        parent_name, _, child = plan.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_block(plan))
    model.config.output_router_logits = False  # the routers' losses come from moe_aux_loss
    return model


def moe_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    """The sum of the GranularMoE layers' ``l_aux`` from the last forward (differentiable; 0 without MoE layers):
    add ``coefficient * moe_aux_loss(model)`` to the loss, as with DeepSpeed's ``MoE``."""
    from granular_moe.deepspeed.layer import GranularMoE

    losses = [module.l_aux for module in model.modules()
              if isinstance(module, GranularMoE) and module.l_aux is not None]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else torch.zeros(())
