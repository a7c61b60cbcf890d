"""``GranularMoE``: the granular layer as a drop-in for DeepSpeed's ``deepspeed.moe.layer.MoE``.

It takes ``MoE``'s arguments and returns what ``MoE.forward`` returns, ``(output, l_aux, exp_counts)``; inside runs
:class:`~granular_moe.layer.GranularMoELayer` (the plugin's router, de-duplicated dispatcher, two-level across
nodes, and kernels) on DeepSpeed's expert groups (:mod:`granular_moe.deepspeed.groups`). It is a subclass of
``MoE``, so that DeepSpeed's engine treats it as one of its own MoE layers: expert weights marked ``allreduce =
False`` with ``group_name = "ep_size_N"`` (``split_params_into_different_moe_groups_for_optimizer`` puts them in
their own optimizer groups, the engine and ZeRO 1/2 reduce their gradients over the expert-data-parallel group), and
DeepSpeed's checkpoints hold one file per expert (the state dict presents the experts in ``MoE``'s layout, see
:mod:`granular_moe.deepspeed.state`).

Beyond ``MoE``: ``granularity`` ``G`` (``num_experts * G`` experts of ``1/G`` the expert size, each token routed to
``k * G`` of them; any ``k`` up to ``num_experts``), the plugin's routing options (score function, aux-loss-free
expert bias, group-limited routing, a shared expert, expert choice), and ``expert`` as a plain FFN size.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
from deepspeed.moe.layer import MoE

from granular_moe.config import GranularMoEConfigError
from granular_moe.deepspeed import state
from granular_moe.deepspeed.expert_spec import ResidualMLP, cut_experts, expert_spec
from granular_moe.deepspeed.groups import check_expert_layout, expert_groups, group_name, single_rank_group
from granular_moe.deepspeed.options import Routing, check_options, check_unsupported, layer_config, positive_int
from granular_moe.layer import GranularMoELayer


class GranularMoE(MoE):
    """A fine-grained MoE layer with the arguments and return value of DeepSpeed's ``deepspeed.moe.layer.MoE``.

    DeepSpeed's arguments, as ``MoE`` reads them:
        hidden_size: input and output width.
        expert: the base expert: its FFN hidden size (an int, activation ``activation``), or a module every expert
            starts from, as ``MoE`` deep-copies it (see :mod:`granular_moe.deepspeed.expert_spec` for the modules
            taken).
        num_experts: base experts ``E`` (the layer holds ``E * granularity``).
        ep_size: expert-parallel ranks; must divide the world and ``E * granularity``.
        k: experts per token at granularity 1 (``k * granularity`` fine-grained ones); any ``k <= num_experts``.
        capacity_factor, eval_capacity_factor, min_capacity, drop_tokens: each expert keeps at most
            ``max(ceil(T * k * factor / E), min_capacity)`` assignments (the fine-grained ``k`` and ``E``; the factor
            ``capacity_factor`` in training, ``eval_capacity_factor`` in eval mode); ``drop_tokens=False``: dropless.
            Over capacity, assignments are dropped by ``drop_policy`` (DeepSpeed picks randomly with ``use_rts`` at
            top-1 and first choices first at top-2).
        use_residual: Residual MoE: ``output * c0 + mlp(x) * c1`` with ``c = softmax(coefficient(x))``, ``mlp`` the
            ``expert`` module (a SwiGLU/GELU MLP of the expert size for an int ``expert``).
        noisy_gate_policy, use_rts, use_tutel, enable_expert_tensor_parallelism, top2_2nd_expert_sampling: taken
            for ``MoE``'s signature; their features (noisy gates, random token selection, Tutel, expert tensor
            parallelism, a sampled second expert) are not implemented: any value that asks for one is refused.
            ``use_rts`` and ``top2_2nd_expert_sampling`` default to False here (True in ``MoE``).

    Beyond ``MoE``:
        granularity: ``G``, dividing the expert FFN size.
        activation: for an int ``expert``: ``swiglu`` (default), ``geglu``, ``gelu``, ``relu``, ``silu``.
        router_type: ``token_choice`` (default) or ``expert_choice`` (each expert takes its top-C tokens).
        score_function: ``softmax`` (default), ``sigmoid`` or ``sqrtsoftplus``.
        pre_softmax: softmax over all experts before the top-k (gates not renormalised); default: only for top-1
            (``k * G == 1``), as ``MoE``'s top-1 gate.
        topk_scaling_factor: multiplies the gates.
        expert_bias, bias_update_rate: aux-loss-free balancing (sigmoid / sqrt-softplus scores): the bias steers
            the choice of experts; call :func:`granular_moe.deepspeed.update_expert_bias` once per optimizer step.
        num_groups, group_topk: group-limited routing (each token picks ``group_topk`` of ``num_groups`` groups of
            consecutive experts first).
        shared_expert_size, shared_expert_gate: a shared expert (SwiGLU/GELU like the routed ones) of this FFN size,
            optionally gated by ``sigmoid(x w)``; it runs while the routed tokens travel.
        aux_loss_type: what ``l_aux`` is: ``aux_loss`` (Switch, per micro-batch; default for token choice),
            ``seq_aux_loss`` (per sequence; needs 3-D input), ``none`` (``l_aux`` is 0; default for expert choice).
        drop_policy: ``probs`` (default: the lowest gates go first) or ``position`` (the last tokens go first).
        sequence_first: a 3-D input is ``[s, b, h]`` (Megatron-DeepSpeed) rather than ``[b, s, h]`` (default); only
            the per-sequence loss depends on it.
        ranks_per_node: processes per node (default ``LOCAL_WORLD_SIZE``); an expert-parallel group spanning nodes
            sends a token once per destination node.
        kernels: ``auto`` (Triton on CUDA, else torch) or ``torch``.
        params_dtype: dtype of the parameters (default fp32, as ``MoE``'s are).

    ``forward(hidden_states [..., h], used_token=None) -> (output [..., h], l_aux, exp_counts)``: ``l_aux`` the
    configured balance loss without coefficient, differentiable (add ``coef * l_aux`` to the loss, as with ``MoE``;
    at top-2 ``MoE``'s counts each token's first expert only, this one all ``k``, as ``MoE``'s top-k > 2 does);
    ``exp_counts [E * G]`` the assignments each expert processed (after the capacity drop). After a forward
    ``z_loss`` holds the router's z-loss (differentiable, without coefficient) and ``stats`` the layer's
    :class:`~granular_moe.router.RoutingStats`.
    """

    def __init__(self, hidden_size: int, expert, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = False, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = False, *, granularity: int = 1, activation: str = "swiglu",
                 router_type: str = "token_choice", score_function: str = "softmax",
                 pre_softmax: Optional[bool] = None, topk_scaling_factor: Optional[float] = None,
                 expert_bias: bool = False, bias_update_rate: float = 1e-3, num_groups: Optional[int] = None,
                 group_topk: Optional[int] = None, shared_expert_size: Optional[int] = None,
                 shared_expert_gate: bool = False, aux_loss_type: Optional[str] = None, drop_policy: str = "probs",
                 sequence_first: bool = False, ranks_per_node: Optional[int] = None, kernels: str = "auto",
                 params_dtype: torch.dtype = torch.float32):
        spec, routing = validated_arguments(dict(locals()))  # every argument, before anything is built
        torch.nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts
        groups = expert_groups(ep_size, ranks_per_node)
        self.hidden_size, self.granularity, self.ep_size, self.ranks_per_node = (hidden_size, granularity, ep_size,
                                                                                 ranks_per_node)
        self.num_experts = num_experts * granularity  # what DeepSpeed's engine and checkpoints count
        self.num_local_experts = self.num_experts // ep_size
        self.expert_group_name = group_name(ep_size)
        self.k, self.topk = k, k * granularity
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.drop_tokens = min_capacity, drop_tokens
        self.aux_loss_type = routing.resolved_aux_loss_type()
        self.sequence_first, self.use_residual = sequence_first, use_residual
        self.enable_expert_tensor_parallelism = False

        dropping = drop_tokens or router_type == "expert_choice"
        config = layer_config(hidden_size, spec, num_experts, ep_size, k, granularity, params_dtype, routing,
                              capacity_factor if dropping else None)
        pg_collection = _single_rank_tensor_group() if shared_expert_size else None
        self.deepspeed_moe = GranularMoELayer(config, pg_collection=pg_collection, router_type=router_type,
                                              kernels=kernels, expert_groups=groups)
        router = self.deepspeed_moe.router
        router.attach_losses = False  # l_aux goes back to the caller, as MoE's does
        router.eval_capacity_factor, router.min_capacity = eval_capacity_factor, min_capacity  # MoE's capacity rule
        for weight in (self.deepspeed_moe.experts.weight1, self.deepspeed_moe.experts.weight2):
            weight.allreduce, weight.group_name = False, self.expert_group_name
        self._initialize(spec)
        if use_residual:
            self.mlp = expert if isinstance(expert, torch.nn.Module) else ResidualMLP(hidden_size, spec, params_dtype)
            self.coefficient = torch.nn.Linear(hidden_size, 2, dtype=params_dtype)
        self.l_aux = self.exp_counts = self.z_loss = self.stats = None
        state.register_deepspeed_layout(self)

    # ------------------------------------------------------------------ construction

    @torch.no_grad()
    def _initialize(self, spec) -> None:
        """Router, experts, shared expert, drawn in an order that does not depend on ``ep_size``: every rank draws
        every expert (one at a time) and keeps its own, so a seed gives the same layer at any expert-parallel size.
        With an expert module, every base expert is a copy of it, cut into ``G``."""
        layer, config = self.deepspeed_moe, self.deepspeed_moe.config
        config.init_method(layer.router.weight)
        experts = layer.experts
        first = int(experts.global_expert_ids[0])
        local = range(first, first + self.num_local_experts)
        if spec.fc1 is not None:
            weight1, weight2 = cut_experts(spec.fc1, spec.fc2, spec.gated, self.granularity, local,
                                           experts.weight1.dtype)
            experts.weight1.copy_(weight1)
            experts.weight2.copy_(weight2)
        else:
            for expert in range(self.num_experts):
                weight1 = torch.empty(experts.weight1.shape[1:], dtype=experts.weight1.dtype)
                weight2 = torch.empty(experts.weight2.shape[1:], dtype=experts.weight2.dtype)
                config.init_method(weight1)
                config.output_layer_init_method(weight2)
                if expert in local:
                    experts.weight1[expert - first].copy_(weight1)
                    experts.weight2[expert - first].copy_(weight2)
        if layer.shared_experts is not None:
            shared = layer.shared_experts
            config.init_method(shared.linear_fc1.weight)
            config.output_layer_init_method(shared.linear_fc2.weight)
            if getattr(shared, "gate_weight", None) is not None:
                config.init_method(shared.gate_weight)

    @torch.no_grad()
    def load_base_experts(self, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
        """Set the experts from ``E`` base experts, each cut into ``G``: ``fc1 [E, ffn (x2 gated: gate rows first),
        hidden]`` and ``fc2 [E, hidden, ffn]`` (``nn.Linear`` layouts, as Hugging Face's fused experts hold them)."""
        experts = self.deepspeed_moe.experts
        first, G = int(experts.global_expert_ids[0]), self.granularity
        gated = self.deepspeed_moe.config.gated_linear_unit
        for base in range(first // G, (first + self.num_local_experts - 1) // G + 1):
            ids = [i for i in range(base * G, (base + 1) * G) if first <= i < first + self.num_local_experts]
            weight1, weight2 = cut_experts(fc1[base], fc2[base], gated, G, ids, experts.weight1.dtype)
            experts.weight1[ids[0] - first: ids[-1] - first + 1].copy_(weight1)
            experts.weight2[ids[0] - first: ids[-1] - first + 1].copy_(weight2)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize``: the expert groups exist already (built with the layer, consecutive
        ranks per expert-parallel group, DeepSpeed's default)."""
        if use_data_before_expert_parallel_:
            raise GranularMoEConfigError(
                "the DeepSpeed config's use_data_before_expert_parallelism true is not supported by GranularMoE: its "
                "expert-parallel groups are consecutive ranks (DeepSpeed's default); valid values: false")
        expert_groups(self.ep_size, self.ranks_per_node)  # DeepSpeed's ep_size_1 groups for a layer built alone

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        """``hidden_states [..., h]`` -> ``(output [..., h], l_aux, exp_counts)``; ``used_token`` (1 for a used token,
        the input's shape without ``h``) leaves the others out of the losses (they are still routed)."""
        x, used, back = self._layer_view(hidden_states, used_token)
        padding_mask = None if used is None else (used == 0).transpose(0, 1)
        output, _ = self.deepspeed_moe(x, padding_mask)
        output = back(output)
        stats = self.stats = self.deepspeed_moe.stats
        losses = stats.balance_losses or {}
        if self.aux_loss_type in losses:
            self.l_aux = losses[self.aux_loss_type]
        else:  # aux_loss_type none, or the expert-choice router: nothing to balance
            self.l_aux = torch.zeros((), dtype=torch.float32, device=output.device)
        self.z_loss, self.exp_counts = stats.z_loss, stats.tokens_per_expert
        if self.use_residual:
            residual = self.mlp(hidden_states)
            residual = residual[0] if isinstance(residual, tuple) else residual
            coefficient = torch.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coefficient[..., 0:1] + residual * coefficient[..., 1:]
        return output, self.l_aux, self.exp_counts

    def _layer_view(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor]):
        """The input as the layer's ``[s, b, h]`` (a view where the order of the tokens does not matter), the
        used-token mask in the same ``[s, b]`` layout, and the map from the layer's output back to the input's
        shape."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise GranularMoEConfigError(
                f"GranularMoE input of shape {tuple(hidden_states.shape)}: the last dimension must be hidden_size "
                f"{self.hidden_size}")
        shape = hidden_states.shape
        used = None if used_token is None else used_token.reshape(shape[:-1])
        if self.aux_loss_type == "seq_aux_loss":
            if hidden_states.dim() != 3:
                raise GranularMoEConfigError(
                    f"aux_loss_type 'seq_aux_loss' needs 3-D input ([b, s, h], or [s, b, h] with sequence_first); "
                    f"got shape {tuple(shape)}")
            if not self.sequence_first:
                return (hidden_states.transpose(0, 1), None if used is None else used.transpose(0, 1),
                        lambda out: out.transpose(0, 1))
            return hidden_states, used, lambda out: out
        tokens = hidden_states.reshape(-1, 1, shape[-1])
        return tokens, None if used is None else used.reshape(-1, 1), lambda out: out.reshape(shape)


ROUTING_ARGUMENTS = tuple(f.name for f in dataclasses.fields(Routing))


def validated_arguments(arguments: dict):
    """:class:`GranularMoE`'s arguments (a dict by name, with its defaults where missing) checked as the layer checks
    them before building anything: ``(ExpertSpec, Routing)``, or the named error."""
    bound = inspect.signature(GranularMoE.__init__).bind_partial(**{k: v for k, v in arguments.items() if k != "self"})
    bound.apply_defaults()
    a = bound.arguments
    check_unsupported(a["noisy_gate_policy"], a["use_rts"], a["use_tutel"], a["enable_expert_tensor_parallelism"],
                      a["top2_2nd_expert_sampling"])
    spec = expert_spec(a["expert"], positive_int(a["hidden_size"], "hidden_size"), a["activation"])
    routing = Routing(**{name: a[name] for name in ROUTING_ARGUMENTS})
    check_options(spec.ffn_hidden_size, a["num_experts"], a["ep_size"], a["k"], a["granularity"], routing,
                  a["drop_tokens"], a["capacity_factor"], a["eval_capacity_factor"], a["min_capacity"])
    check_expert_layout(a["ep_size"], a["ranks_per_node"])
    return spec, routing


def _single_rank_tensor_group():
    """The process-group collection megatron-core's shared-expert MLP takes: a tensor-parallel group of this rank
    alone (GranularMoE does not split a layer's experts over tensor parallelism)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(tp=single_rank_group())

