"""Parameter counts of a megatron-core GPT built with the granular MoE layer (local or Transformer-Engine spec).

Counts what the model holds: word (and learned position) embeddings, an untied output layer, per layer the
attention projections (grouped-query attention included), norms (LayerNorm: weight and bias; RMSNorm: weight),
and either Megatron's dense MLP or the granular MoE layer (``router [E*G, h]``, ``experts.weight1
[E*G, h, d_e]`` (``2 d_e`` gated), ``experts.weight2 [E*G, d_e, h]``, ``d_e = d_ff / G``; a shared expert of
``--moe-shared-expert-intermediate-size`` (its own size, not cut by G), plus ``[1, h]`` with its gate), then the
final norm.

* ``active``: what one token uses: everything except the experts it is not routed to (``k*G`` of ``E*G``
  experts are active; the whole router and the shared expert are).
* ``law``: the scaling law's ``N``: linear weights of attention, dense MLPs and all experts; no embeddings,
  norms or routers (Krajewski et al. 2024, Section 6.1: ``N = d_model**2 (8E + 4) n_blocks`` for their models).
"""

from __future__ import annotations

from dataclasses import dataclass

from granular_moe.config import GranularMoEConfigError, granular_shape

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")


@dataclass(frozen=True)
class ModelShape:
    """A GPT's sizes as Megatron-LM's flags give them; MoE values are the base (G = 1) ones."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_experts: int | None = None  # base E; None or 0: a dense model
    moe_router_topk: int = 1  # base k
    moe_granularity: int = 1
    moe_ffn_hidden_size: int | None = None  # base expert size; default ffn_hidden_size
    moe_layer_freq: int | list = 1
    swiglu: bool = False
    normalization: str = "LayerNorm"
    num_query_groups: int | None = None
    kv_channels: int | None = None
    qk_layernorm: bool = False
    position_embedding_type: str = "learned_absolute"
    max_position_embeddings: int = 0
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = False
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise GranularMoEConfigError(
                f"--normalization {self.normalization!r} is not valid; valid values: {', '.join(NORMALIZATIONS)}"
            )
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise GranularMoEConfigError(
                f"--position-embedding-type {self.position_embedding_type!r} is not valid; valid values: "
                f"{', '.join(POSITION_EMBEDDINGS)}"
            )
        if self.num_experts and self.add_bias_linear:
            raise GranularMoEConfigError("the granular MoE layer has no linear biases: set --disable-bias-linear")
        if not isinstance(self.moe_layer_freq, int) and len(self.moe_layer_freq) != self.num_layers:
            raise GranularMoEConfigError(
                f"--moe-layer-freq pattern has {len(self.moe_layer_freq)} entries for --num-layers {self.num_layers}"
            )

    @property
    def moe_layers(self) -> list[bool]:
        """Which layers are MoE, as Megatron reads ``--moe-layer-freq`` (every N-th from the first, or a 0/1
        pattern)."""
        if not self.num_experts:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]
        return [bool(entry) for entry in self.moe_layer_freq]


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by kind; ``experts`` counts all experts, ``active_experts`` those one token uses."""

    embedding: int
    attention: int
    norms: int
    dense_mlp: int
    router: int
    experts: int
    active_experts: int
    shared_experts: int = 0

    @property
    def total(self) -> int:
        return (self.embedding + self.attention + self.norms + self.dense_mlp + self.router + self.experts
                + self.shared_experts)

    @property
    def active(self) -> int:
        return self.total - self.experts + self.active_experts

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def law(self) -> int:
        return self.attention + self.dense_mlp + self.experts + self.shared_experts

    def training_flops_per_token(self) -> int:
        """``6 x`` the active weights a token's forward multiplies with (linear layers of attention, dense MLPs,
        active and shared experts, the router, the output layer), the usual count without attention scores."""
        return 6 * (self.active - self.norms)


def count_parameters(shape: ModelShape) -> ParameterCount:
    """Count ``shape``'s parameters exactly as the built megatron-core model holds them."""
    h, layers = shape.hidden_size, shape.num_layers
    norm = 2 if shape.normalization == "LayerNorm" else 1  # weight (+ bias)
    bias = 1 if shape.add_bias_linear else 0
    kv_channels = shape.kv_channels or h // shape.num_attention_heads
    query_width = shape.num_attention_heads * kv_channels
    qkv_width = query_width + 2 * (shape.num_query_groups or shape.num_attention_heads) * kv_channels
    attention = qkv_width * h + bias * qkv_width + query_width * h + bias * h
    norms_per_layer = 2 * norm * h + (2 * norm * kv_channels if shape.qk_layernorm else 0)
    gate = 2 if shape.swiglu else 1
    dense_mlp = (gate + 1) * shape.ffn_hidden_size * h + bias * (gate * shape.ffn_hidden_size + h)

    router = experts = active_experts = shared = 0
    n_moe = sum(shape.moe_layers)
    if n_moe:
        fine = granular_shape(
            num_experts=shape.num_experts,
            topk=shape.moe_router_topk,
            ffn_hidden_size=shape.ffn_hidden_size,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            granularity=shape.moe_granularity,
        )
        per_expert = (gate + 1) * h * fine.expert_hidden_size
        router = n_moe * fine.num_experts * h
        experts = n_moe * fine.num_experts * per_expert
        active_experts = n_moe * fine.topk * per_expert
        if shape.moe_shared_expert_intermediate_size:
            shared = n_moe * ((gate + 1) * h * shape.moe_shared_expert_intermediate_size
                              + (h if shape.moe_shared_expert_gate else 0))

    embedding = shape.vocab_size * h * (2 if shape.untie_embeddings_and_output_weights else 1)
    if shape.position_embedding_type == "learned_absolute":
        embedding += shape.max_position_embeddings * h
    return ParameterCount(
        embedding=embedding,
        attention=layers * attention,
        norms=layers * norms_per_layer + norm * h,
        dense_mlp=(layers - n_moe) * dense_mlp,
        router=router,
        experts=experts,
        active_experts=active_experts,
        shared_experts=shared,
    )


def shape_from_args(args) -> ModelShape:
    """The :class:`ModelShape` of parsed main-job arguments (``granular_moe.training.arguments.parse_args``,
    whose MoE values are already fine-grained: they are turned back into base values here)."""
    from granular_moe.megatron.arguments import megatron_default_ffn_hidden_size

    granularity = args.moe_granularity
    ffn = args.ffn_hidden_size or megatron_default_ffn_hidden_size(args.hidden_size, args.swiglu)
    moe = bool(args.num_experts)
    return ModelShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=ffn,
        vocab_size=args.vocab_size,
        num_experts=args.num_experts // granularity if moe else None,
        moe_router_topk=args.moe_router_topk // granularity if moe else 1,
        moe_granularity=granularity,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size * granularity if moe else None,
        moe_layer_freq=args.moe_layer_freq,
        swiglu=args.swiglu,
        normalization=args.normalization,
        position_embedding_type=args.position_embedding_type,
        max_position_embeddings=args.max_position_embeddings,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        qk_layernorm=args.qk_layernorm,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size if moe else None,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
    )
