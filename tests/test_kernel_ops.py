"""The Triton kernels as torch operators: ``torch.library.opcheck`` on each (schema, fake implementation, autograd
registration, AOT dispatch with dynamic shapes), and the layer traced by torch.compile into one graph."""

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import REFERENCE, RoutingCase, small_tiles  # noqa: F401  (sets TRITON_INTERPRET=1 first)
from granular_moe import GranularMoELayer
from helpers import moe_config

ops = torch.ops.granular_moe
CASE = RoutingCase("k3_drops", 7, 5, 3, drop_rate=0.25, empty_experts=(2,), seed=4)


def routed():
    expert_index, token_offsets = CASE.build()
    return expert_index, token_offsets, REFERENCE.dispatch_plan(expert_index, token_offsets, CASE.num_experts)


def random(*shape, requires_grad=False, seed=0):
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return tensor.requires_grad_(requires_grad)


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_routing_operators(small_tiles):
    expert_index, token_offsets, _ = routed()
    opcheck(ops.dispatch_plan.default, (expert_index, token_offsets, CASE.num_experts))
    opcheck(ops.expert_parallel_plan.default, (expert_index, token_offsets, 2, 3))  # rows: a data-dependent count


def test_movement_operators(small_tiles):
    expert_index, token_offsets, plan = routed()
    rows = expert_index.numel()
    opcheck(ops.permute.default, (random(CASE.num_tokens, 20, requires_grad=True), plan.source_token))
    opcheck(ops.scatter_add_rows.default, (random(rows, 20), plan.source_token, CASE.num_tokens))
    opcheck(ops.combine.default, (random(rows, 20, requires_grad=True), None, plan.row_of_assignment, token_offsets))
    opcheck(ops.combine.default, (random(rows, 20, requires_grad=True), random(rows, requires_grad=True, seed=1),
                                  plan.row_of_assignment, token_offsets))
    opcheck(ops.combine_backward.default, (random(CASE.num_tokens, 20), random(rows, 20, seed=1), random(rows, seed=2),
                                           plan.row_of_assignment, token_offsets, rows, torch.float32, True, True))


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_grouped_mlp_operators(gated, small_tiles):
    expert_index, _, plan = routed()
    rows, hidden, expert_hidden = expert_index.numel(), 16, 24
    fc1 = expert_hidden * (2 if gated else 1)
    x = random(CASE.num_tokens, hidden, requires_grad=True)
    weight1 = (random(CASE.num_experts, hidden, fc1, seed=1) * 0.25).requires_grad_()
    weight2 = (random(CASE.num_experts, expert_hidden, hidden, seed=2) * 0.2).requires_grad_()
    probs = torch.rand(rows, generator=torch.Generator().manual_seed(3)).requires_grad_()
    activation = "silu" if gated else "gelu"
    opcheck(ops.grouped_mlp.default,
            (x, weight1, weight2, probs, plan.tokens_per_expert, plan.source_token, activation, gated))
    opcheck(ops.grouped_mlp.default, (x.detach()[plan.source_token].requires_grad_(), weight1, weight2, None,
                                      plan.tokens_per_expert, None, activation, gated))
    out, h = ops.grouped_mlp(x, weight1, weight2, probs, plan.tokens_per_expert, plan.source_token, activation, gated)
    opcheck(ops.grouped_mlp_backward.default,
            (random(rows, hidden, seed=4), x.detach(), weight1.detach(), weight2.detach(), probs.detach(),
             plan.tokens_per_expert, plan.source_token, h.detach(), activation, gated, True, True, True, True))


def test_the_layer_compiles_to_one_graph_on_the_triton_operators(small_tiles):
    """One process, dropless token choice, no balance-loss coefficient: torch.compile (fullgraph, AOT autograd)
    traces router, plan, grouped MLP and combine without a break, and the compiled layer's output and gradients
    equal the eager ones."""
    config = moe_config(4, dtype=torch.float32, hidden=16, ffn=64, moe_aux_loss_coeff=0.0, gated_linear_unit=True,
                        activation_func=F.silu)
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1, kernels="triton")
    x = torch.randn(6, 2, 16)
    results = []
    for run in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out, _ = run(leaf)
        out.square().sum().backward()
        results.append([out.detach(), leaf.grad] + [p.grad.clone() for p in layer.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
