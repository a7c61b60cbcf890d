"""A compute optimum as a job to run: whole layers, whole iterations, Megatron-LM flags or a YAML config.

Architecture rule (the paper's conventions): ``d_model = 64 n_blocks`` (Section 6.1), heads of dimension 64
(Appendix A, Tables 3-4: ``n_heads = n_blocks``), ``d_ff = 4 d_model`` (Section 3.1), one expert per token at
``G = 1`` (``--num-experts E --moe-router-topk 1``: active parameters match the dense model, Appendix A), and
``--moe-granularity G`` on top. The continuous optimum's ``n_blocks`` is rounded down or up, whichever
predicts the lower loss with the tokens the budget then buys; the iteration count is rounded down, so the job
never exceeds the budget. Batch defaults are the paper's: 2048-token sequences, 0.5M tokens per batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import yaml

from granular_moe.scaling.errors import ImpossibleConstraintsError, require_positive
from granular_moe.scaling.flops import FFN_MULTIPLIER, PaperArchitecture
from granular_moe.scaling.optimal import ComputeOptimum

PAPER_SEQ_LENGTH = 2048  # Appendix A: 0.5M tokens per batch, packed into 2048-token sequences
PAPER_GLOBAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class MegatronPlan:
    """Whole-number sizes of a planned job (base MoE values; ``--moe-granularity`` makes them fine-grained)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_experts: int
    moe_router_topk: int
    moe_granularity: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    swiglu: bool = False

    @property
    def tokens(self) -> int:
        return self.train_iters * self.global_batch_size * self.seq_length

    def flag_values(self) -> dict:
        """Flag name -> value (``True``: a switch), in the order the argument line prints them."""
        values = {f"--{name.replace('_', '-')}": value for name, value in asdict(self).items() if value is not False}
        values["--max-position-embeddings"] = self.seq_length
        values["--disable-bias-linear"] = True  # the granular layer has no linear biases
        if self.moe_router_topk * self.moe_granularity == 1:
            values["--moe-router-pre-softmax"] = True  # Megatron requires it for top-1 routing
        return values

    def megatron_args(self) -> list[str]:
        """The Megatron-LM argument list (``granular_moe.training.arguments.parse_args`` reads it too)."""
        argv = []
        for flag, value in self.flag_values().items():
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    def yaml_text(self) -> str:
        """The plan as a ``--config`` YAML (keys are flag names)."""
        return yaml.safe_dump({flag[2:]: value for flag, value in self.flag_values().items()}, sort_keys=False)


@dataclass(frozen=True)
class RealizedPlan:
    """A :class:`MegatronPlan` with the law's prediction for it."""

    megatron: MegatronPlan
    architecture: PaperArchitecture
    flops: float
    loss: float


def realize(
    optimum: ComputeOptimum,
    seq_length: int = PAPER_SEQ_LENGTH,
    global_batch_size: int = PAPER_GLOBAL_BATCH_SIZE,
    micro_batch_size: int = 1,
    max_params: float | None = None,
    max_tokens: float | None = None,
) -> RealizedPlan:
    """The best whole-layer, whole-iteration job within ``optimum``'s budget and constraints."""
    for value, flag in ((seq_length, "--seq-length"), (global_batch_size, "--global-batch-size"),
                        (micro_batch_size, "--micro-batch-size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ImpossibleConstraintsError(f"{flag} must be an integer >= 1, got {value!r}")
    if global_batch_size % micro_batch_size:
        raise ImpossibleConstraintsError(
            f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size {micro_batch_size}"
        )
    law, granularity = optimum.law, optimum.granularity
    if law.is_dense:
        raise ValueError("realize() plans MoE jobs; the dense law is for comparison only")
    tokens_per_iter = global_batch_size * seq_length
    n_continuous = optimum.architecture.n_blocks
    candidates = []
    for n_blocks in sorted({max(1, math.floor(n_continuous)), max(1, math.ceil(n_continuous))}):
        architecture = PaperArchitecture(n_blocks, law.expansion_rate)
        if max_params is not None and architecture.params > require_positive(max_params, "--max-params"):
            continue
        iters = math.floor(architecture.tokens_for_flops(optimum.flops, granularity) / tokens_per_iter)
        if max_tokens is not None:
            iters = min(iters, math.floor(require_positive(max_tokens, "--max-tokens") / tokens_per_iter))
        if iters < 1:
            continue
        tokens = iters * tokens_per_iter
        loss = law.loss_unchecked(architecture.params, tokens, granularity)
        candidates.append((loss, n_blocks, iters, architecture))
    if not candidates:
        raise ImpossibleConstraintsError(
            f"a budget of {optimum.flops:.3g} FLOPs does not buy one iteration of {tokens_per_iter} tokens "
            f"(--global-batch-size x --seq-length) for a {n_continuous:.2f}-layer model within the constraints: "
            "raise the budget or lower --global-batch-size / --seq-length"
        )
    loss, n_blocks, iters, architecture = min(candidates)
    hidden = round(architecture.d_model)
    plan = MegatronPlan(
        num_layers=n_blocks,
        hidden_size=hidden,
        num_attention_heads=n_blocks,
        ffn_hidden_size=FFN_MULTIPLIER * hidden,
        num_experts=law.expansion_rate,
        moe_router_topk=1,
        moe_granularity=granularity,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        train_iters=iters,
    )
    return RealizedPlan(plan, architecture, architecture.training_flops(plan.tokens, granularity), loss)
