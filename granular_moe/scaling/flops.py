"""The paper's architecture and FLOPs model (Krajewski et al. 2024, arXiv 2402.07871, Section 6.1, Eq. 10,
Appendix E).

Per transformer block and token, training (forward + backward) costs::

    F_block = 12 d_model**2 c_f + d_model E G c_r

``12 d_model**2`` are the active parameters of a block (``4 d_model**2`` attention projections, ``8 d_model**2``
active expert / feed-forward weights with ``d_ff = 4 d_model``), ``c_f = 6`` FLOPs per active parameter and
token (Hoffmann et al. 2022), and ``d_model E G`` the router's weights, at ``c_r = 14`` FLOPs each (router
projection forward/backward, dispatch and combine). Embeddings and attention scores are not counted.
The model size follows ``d_model = 64 n_blocks`` and ``N = d_model**2 (8E + 4) n_blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass

from granular_moe.scaling.errors import require_positive

FLOPS_PER_ACTIVE_PARAM = 6  # c_f, Appendix E
FLOPS_PER_ROUTER_PARAM = 14  # c_r, Appendix E
D_MODEL_PER_BLOCK = 64  # Section 6.1: "d_model = 64 n_blocks"
HEAD_DIM = 64  # Appendix A, Tables 3 and 4: n_heads = d_model / 64 in every model
FFN_MULTIPLIER = 4  # Section 3.1: d_ff = 4 d_model


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token, by part of the model."""

    attention: float
    feed_forward: float
    routing: float

    @property
    def total(self) -> float:
        return self.attention + self.feed_forward + self.routing


@dataclass(frozen=True)
class PaperArchitecture:
    """A model of the paper's family: ``d_model = 64 n_blocks``, ``d_ff = 4 d_model``, expansion rate ``E``
    (``None``: dense). ``n_blocks`` may be fractional while solving, an integer once realised."""

    n_blocks: float
    expansion_rate: int | None

    @classmethod
    def from_active_params(cls, active_params: float, expansion_rate: int | None) -> "PaperArchitecture":
        """The architecture with ``12 d_model**2 n_blocks = active_params`` (the paper's "E x N_act" names)."""
        require_positive(active_params, "active parameters")
        return cls((active_params / (12 * D_MODEL_PER_BLOCK**2)) ** (1 / 3), expansion_rate)

    @property
    def d_model(self) -> float:
        return D_MODEL_PER_BLOCK * self.n_blocks

    @property
    def active_params(self) -> float:
        """Non-embedding parameters a token uses, routers excluded: ``12 d_model**2 n_blocks``."""
        return 12 * self.d_model**2 * self.n_blocks

    @property
    def params(self) -> float:
        """The law's ``N``: ``d_model**2 (8E + 4) n_blocks`` (dense: ``E = 1``)."""
        return self.d_model**2 * (8 * (self.expansion_rate or 1) + 4) * self.n_blocks

    def flops_per_token(self, granularity: int = 1) -> FlopsPerToken:
        """Eq. 10 per token: attention and feed-forward at ``c_f``, routing at ``c_r`` (zero when dense)."""
        per_block_attention = 4 * self.d_model**2 * FLOPS_PER_ACTIVE_PARAM
        per_block_feed_forward = 8 * self.d_model**2 * FLOPS_PER_ACTIVE_PARAM
        router_params = 0 if self.expansion_rate is None else self.d_model * self.expansion_rate * granularity
        return FlopsPerToken(
            attention=per_block_attention * self.n_blocks,
            feed_forward=per_block_feed_forward * self.n_blocks,
            routing=router_params * FLOPS_PER_ROUTER_PARAM * self.n_blocks,
        )

    def training_flops(self, tokens: float, granularity: int = 1) -> float:
        """``F = (12 d_model**2 c_f + d_model E G c_r) D n_blocks`` (Eq. 10)."""
        return self.flops_per_token(granularity).total * tokens

    def tokens_for_flops(self, flops: float, granularity: int = 1) -> float:
        """The ``D`` that a budget of ``flops`` buys (Eq. 10 solved for ``D``)."""
        return flops / self.flops_per_token(granularity).total
