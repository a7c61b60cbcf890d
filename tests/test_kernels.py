"""Every Triton kernel, under the CPU interpreter, against its PyTorch reference: forward and backward."""

import functools

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import (  # noqa: F401  (small_tiles is a fixture)
    REFERENCE, ROUTING_CASES, TOLERANCE, TRITON, RoutingCase, relative_error, small_tiles,
)

GRAD_SEED = 1234


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- routing metadata


@pytest.mark.parametrize("case", ROUTING_CASES, ids=str)
def test_dispatch_plan_equals_reference(case, small_tiles):
    expert_index, token_offsets = case.build()
    plan = TRITON.dispatch_plan(expert_index, token_offsets, case.num_experts)
    expected = REFERENCE.dispatch_plan(expert_index, token_offsets, case.num_experts)
    assert torch.equal(plan.tokens_per_expert, expected.tokens_per_expert)
    assert torch.equal(plan.source_token, expected.source_token)
    assert torch.equal(plan.row_of_assignment, expected.row_of_assignment)
    for e in case.empty_experts:
        assert plan.tokens_per_expert[e] == 0


def test_dispatch_plan_sort_is_stable_for_repeated_experts(small_tiles):
    """Any expert sequence (a token may repeat an expert) sorts stably across several 16-wide blocks."""
    expert_index = torch.randint(0, 5, (53,), generator=seeded(0))
    token_offsets = torch.tensor([0, 0, 7, 7, 20, 21, 53])  # tokens with no assignment among them
    plan = TRITON.dispatch_plan(expert_index, token_offsets, 6)
    expected = REFERENCE.dispatch_plan(expert_index, token_offsets, 6)
    for got, want in zip(
        (plan.tokens_per_expert, plan.source_token, plan.row_of_assignment),
        (expected.tokens_per_expert, expected.source_token, expected.row_of_assignment),
    ):
        assert torch.equal(got, want)


def test_dispatch_plan_without_assignments():
    plan = TRITON.dispatch_plan(torch.empty(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 3)
    assert plan.source_token.numel() == plan.row_of_assignment.numel() == 0
    assert torch.equal(plan.tokens_per_expert, torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------- permute and combine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_matches_reference_with_repeated_rows(dtype, small_tiles):
    x = torch.randn(9, 37, generator=seeded(0)).to(dtype)
    index = torch.cat([torch.randint(0, 9, (30,), generator=seeded(1)), torch.tensor([4, 4, 4])])  # row 4 many times
    x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    out = TRITON.permute(x_ours, index)
    expected = REFERENCE.permute(x_ref, index)
    assert torch.equal(out.double(), expected)  # a gather is exact
    grad = torch.randn(out.shape, generator=seeded(2)).to(dtype)
    out.backward(grad)
    expected.backward(grad.double())
    assert relative_error(x_ours.grad, x_ref.grad) < TOLERANCE[dtype]
    assert x_ours.grad[[i for i in range(9) if i not in index]].eq(0).all()


def combine_inputs(case, dtype, weight_dtype=torch.float32, seed=0):
    expert_index, token_offsets = case.build()
    plan = REFERENCE.dispatch_plan(expert_index, token_offsets, case.num_experts)
    num_rows = expert_index.numel()
    expert_output = torch.randn(num_rows, 24, generator=seeded(seed)).to(dtype)
    weight = torch.rand(num_rows, generator=seeded(seed + 1)).to(weight_dtype)
    return expert_output, weight, plan.row_of_assignment, token_offsets


@pytest.mark.parametrize("case", ROUTING_CASES, ids=str)
def test_combine_matches_fp64_reference(case, small_tiles):
    expert_output, weight, rows, token_offsets = combine_inputs(case, torch.float32)
    ours = [expert_output.clone().requires_grad_(), weight.clone().requires_grad_()]
    ref = [expert_output.double().requires_grad_(), weight.double().requires_grad_()]
    out = TRITON.combine(ours[0], ours[1], rows, token_offsets)
    expected = REFERENCE.combine(ref[0], ref[1], rows, token_offsets)
    assert out.dtype == torch.float32 and out.shape == (case.num_tokens, 24)
    assert relative_error(out, expected) < 1e-6
    unrouted = token_offsets.diff() == 0
    assert out[unrouted].eq(0).all()
    grad = torch.randn(out.shape, generator=seeded(GRAD_SEED))
    out.backward(grad)
    expected.backward(grad.double())
    for got, want in zip(ours, ref):
        assert relative_error(got.grad, want.grad) < 1e-6


def test_combine_with_constant_gates(small_tiles):
    """Gates without gradient (the expert rows are then not kept for backward): row gradients only."""
    case = RoutingCase("k3_drops", 9, 6, 3, drop_rate=0.3)
    expert_output, weight, rows, token_offsets = combine_inputs(case, torch.float32)
    ours, ref = expert_output.clone().requires_grad_(), expert_output.double().requires_grad_()
    out = TRITON.combine(ours, weight, rows, token_offsets)
    expected = REFERENCE.combine(ref, weight.double(), rows, token_offsets)
    grad = torch.randn(out.shape, generator=seeded(GRAD_SEED))
    out.backward(grad)
    expected.backward(grad.double())
    assert relative_error(ours.grad, ref.grad) < 1e-6 and weight.grad is None


def test_combine_half_rows_with_fp32_gates():
    """fp16 expert rows, fp32 gates: accumulates in fp32, returns fp16, gate gradients in fp32."""
    case = RoutingCase("top64", 3, 70, 64)
    expert_output, weight, rows, token_offsets = combine_inputs(case, torch.float16)
    ours = [expert_output.clone().requires_grad_(), weight.clone().requires_grad_()]
    ref = [expert_output.double().requires_grad_(), weight.double().requires_grad_()]
    out = TRITON.combine(ours[0], ours[1], rows, token_offsets)
    expected = REFERENCE.combine(ref[0], ref[1], rows, token_offsets)
    assert out.dtype == torch.float16
    assert relative_error(out, expected) < TOLERANCE[torch.float16]
    grad = torch.randn(out.shape, generator=seeded(GRAD_SEED)).half()
    out.backward(grad)
    expected.backward(grad.double())
    assert ours[0].grad.dtype == torch.float16 and ours[1].grad.dtype == torch.float32
    for got, want in zip(ours, ref):
        assert relative_error(got.grad, want.grad) < TOLERANCE[torch.float16]


# ---------------------------------------------------------------- grouped expert MLP

GELU_TANH = functools.partial(F.gelu, approximate="tanh")


def mlp_inputs(case, hidden, expert_hidden, gated, dtype, seed=0):
    expert_index, token_offsets = case.build()
    plan = REFERENCE.dispatch_plan(expert_index, token_offsets, case.num_experts)
    x = torch.randn(case.num_tokens, hidden, generator=seeded(seed))
    weight1 = torch.randn(case.num_experts, hidden, expert_hidden * (2 if gated else 1), generator=seeded(seed + 1))
    weight2 = torch.randn(case.num_experts, expert_hidden, hidden, generator=seeded(seed + 2))
    scale1, scale2 = hidden ** -0.5, expert_hidden ** -0.5
    return [x.to(dtype), (weight1 * scale1).to(dtype), (weight2 * scale2).to(dtype)], plan


def run_mlp(kernels, tensors, plan, activation, gated, gather=True):
    """``tensors``: x, weight1, weight2 and optionally the rows' gates (probs)."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    gather_index = plan.source_token if gather else None
    probs = leaves[3] if len(leaves) > 3 else None
    out = kernels.grouped_mlp(leaves[0], plan.tokens_per_expert, leaves[1], leaves[2], activation, gated, gather_index,
                              probs)
    out.backward(torch.randn(out.shape, generator=seeded(GRAD_SEED)).to(out.dtype))
    return out, [leaf.grad for leaf in leaves]


def assert_mlp_matches_fp64_reference(case, activation, gated, dtype, hidden=24, expert_hidden=40, gather=True,
                                      gates=False):
    tensors, plan = mlp_inputs(case, hidden, expert_hidden, gated, dtype)
    if not gather:
        tensors[0] = tensors[0][plan.source_token]
    if gates:  # the router's gates stay fp32 whatever the experts' dtype
        tensors.append(torch.rand(plan.source_token.numel(), generator=seeded(5)) + 0.1)
    out, grads = run_mlp(TRITON, tensors, plan, activation, gated, gather)
    expected, expected_grads = run_mlp(REFERENCE, [t.double() for t in tensors], plan, activation, gated, gather)
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for name, tensor, got, want in zip(("x", "weight1", "weight2", "probs"), tensors, grads, expected_grads):
        assert got.dtype == tensor.dtype
        assert relative_error(got, want) < TOLERANCE[dtype], name
    for e in case.empty_experts:  # experts without rows: exactly zero weight gradients
        assert grads[1][e].eq(0).all() and grads[2][e].eq(0).all()
    return out, grads


MLP_CASES = [
    (case, gated) for case in ROUTING_CASES for gated in (False, True) if case.topk < 64 or gated  # top-64 is slow
]


@pytest.mark.parametrize("case, gated", MLP_CASES, ids=[f"{c}-{'swiglu' if g else 'gelu'}" for c, g in MLP_CASES])
def test_grouped_mlp_matches_fp64_reference(case, gated, small_tiles):
    """Shapes of 24 x 40 (x 80 gated) in 16-wide tiles: several tiles, partial at every edge (top-64 runs
    one tile of 16 x 16 per expert: 64 experts are many programs for the interpreter)."""
    hidden, expert_hidden = (16, 16) if case.topk == 64 else (24, 40)
    assert_mlp_matches_fp64_reference(case, F.silu if gated else F.gelu, gated, torch.float32, hidden, expert_hidden)


@pytest.mark.parametrize(
    "activation, gated",
    [(GELU_TANH, False), (F.gelu, True), (torch.nn.SiLU(), False)],
    ids=["gelu_tanh", "geglu", "silu"],
)
def test_grouped_mlp_other_activations(activation, gated, small_tiles):
    assert_mlp_matches_fp64_reference(RoutingCase("k2", 6, 5, 2, empty_experts=(1,)), activation, gated, torch.float32)


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_grouped_mlp_half_precision(gated, small_tiles):
    case = RoutingCase("k3", 11, 7, 3, empty_experts=(2,))
    assert_mlp_matches_fp64_reference(case, F.silu if gated else F.gelu, gated, torch.float16)


@pytest.mark.parametrize("case, gated", [(ROUTING_CASES[1], False), (ROUTING_CASES[3], True), (ROUTING_CASES[4], True)],
                         ids=["top1-gelu", "drops-swiglu", "random-swiglu"])
def test_grouped_mlp_with_gates_matches_fp64_reference(case, gated, small_tiles):
    """Gates scale each row's activation; their gradient comes out of the activation backward's epilogue as
    partial sums over 16-wide column tiles (40 expert columns: three tiles, the last partial)."""
    assert_mlp_matches_fp64_reference(case, F.silu if gated else F.gelu, gated, torch.float32, gates=True)


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_grouped_mlp_with_gates_half_precision(gated, small_tiles):
    case = RoutingCase("k3", 11, 7, 3, empty_experts=(2,))
    assert_mlp_matches_fp64_reference(case, F.silu if gated else F.gelu, gated, torch.float16, gates=True)


def autograd_expert_block(x, weight1, weight2, probs, plan, token_offsets, activation, gated):
    """The layer's expert block written with autograd alone (no custom backward): gather, per-expert MLP, the
    gated outputs summed per token."""
    rows = x[plan.source_token]
    outputs = []
    for e, part in enumerate(rows.split(plan.tokens_per_expert.tolist())):
        h = part @ weight1[e]
        if gated:
            a, g = h.chunk(2, dim=-1)
            act = activation(a) * g
        else:
            act = activation(h)
        outputs.append(act @ weight2[e])
    expert_rows = torch.cat(outputs)
    gate_of_row = torch.empty_like(probs).index_put((plan.row_of_assignment,), probs)
    gated_rows = expert_rows * gate_of_row.unsqueeze(-1)
    token = torch.repeat_interleave(torch.arange(token_offsets.numel() - 1), token_offsets.diff())
    return torch.zeros(token_offsets.numel() - 1, x.shape[1], dtype=x.dtype).index_add(
        0, token, gated_rows[plan.row_of_assignment])


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_expert_block_with_gates_in_the_experts_equals_autograd(kernels, gated, small_tiles):
    """What the layer runs (gates into ``grouped_mlp`` in expert order, a plain-sum ``combine``) against the
    autograd-only expert block in fp64 (fp32 for Triton), forward and the gradients of x, both weights and the
    token-major gates."""
    from granular_moe.dispatch import expert_order

    ops = REFERENCE if kernels == "torch" else TRITON
    dtype = torch.float64 if kernels == "torch" else torch.float32
    case = RoutingCase("k3_drops", 10, 6, 3, drop_rate=0.3, empty_experts=(4,), seed=2)
    expert_index, token_offsets = case.build()
    (x, weight1, weight2), plan = mlp_inputs(case, 24, 40, gated, torch.float64)
    gates = torch.rand(expert_index.numel(), generator=seeded(9), dtype=torch.float64)
    activation = F.silu if gated else F.gelu
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight1, weight2, gates)]
    probs = expert_order(leaves[3], plan.row_of_assignment)
    rows = ops.grouped_mlp(leaves[0], plan.tokens_per_expert, leaves[1], leaves[2], activation, gated,
                           plan.source_token, probs)
    out = ops.combine(rows, None, plan.row_of_assignment, token_offsets)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, weight1, weight2, gates)]
    expected = autograd_expert_block(*ref_leaves, plan, token_offsets, activation, gated)
    grad = torch.randn(expected.shape, generator=seeded(GRAD_SEED), dtype=torch.float64)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(out, expected) < tolerance
    for name, got, want in zip(("x", "weight1", "weight2", "gates"), leaves, ref_leaves):
        assert relative_error(got.grad, want.grad) < tolerance, name


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_expert_block_keeps_no_row_of_the_model_width(kernels, small_tiles):
    """Saved for the backward by the expert block (plan, gates in expert order, grouped MLP, plain-sum combine),
    parameters and the input excluded: the first GEMM's output, the gates and integer metadata; no tensor with
    as many elements as the assignments' rows of the model's width."""
    from granular_moe.dispatch import expert_order
    from granular_moe.memory import SavedForBackward

    ops = REFERENCE if kernels == "torch" else TRITON
    case = RoutingCase("k4", 12, 8, 4, empty_experts=(3,))
    expert_index, token_offsets = case.build()
    hidden, expert_hidden = 48, 16  # the model is wider than the expert (fine-grained)
    (x, weight1, weight2), _ = mlp_inputs(case, hidden, expert_hidden, True, torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight1, weight2)]
    gates = torch.rand(expert_index.numel(), generator=seeded(9)).requires_grad_()
    with SavedForBackward(exclude=[*leaves, gates]) as saved:
        plan = ops.dispatch_plan(expert_index, token_offsets, case.num_experts)
        probs = expert_order(gates, plan.row_of_assignment)
        rows = ops.grouped_mlp(x, plan.tokens_per_expert, weight1, weight2, F.silu, True, plan.source_token, probs)
        out = ops.combine(rows, None, plan.row_of_assignment, token_offsets)
    assignments = expert_index.numel()
    first_gemm_output = assignments * 2 * expert_hidden * 4
    # int32 row and token indices, fp32 gates; the token offsets, and the expert counts (Triton)
    metadata = assignments * (4 + 4 + 4) + (case.num_tokens + 1) * 8 + case.num_experts * 8
    assert max(t.nbytes for t in saved.tensors) == first_gemm_output
    assert all(t.nbytes < assignments * hidden * 4 for t in saved.tensors)
    assert first_gemm_output < saved.nbytes <= first_gemm_output + metadata
    out.sum().backward()
    assert all(t.grad is not None for t in (*leaves, gates))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain_sum_combine_matches_reference(dtype, small_tiles):
    case = RoutingCase("k3_drops", 9, 6, 3, drop_rate=0.3)
    expert_output, _, rows, token_offsets = combine_inputs(case, dtype)
    ours, ref = expert_output.clone().requires_grad_(), expert_output.double().requires_grad_()
    out = TRITON.combine(ours, None, rows, token_offsets)
    expected = REFERENCE.combine(ref, None, rows, token_offsets)
    assert out.dtype == dtype
    assert relative_error(out, expected) < TOLERANCE[dtype]
    grad = torch.randn(out.shape, generator=seeded(GRAD_SEED)).to(dtype)
    out.backward(grad)
    expected.backward(grad.double())
    assert relative_error(ours.grad, ref.grad) < TOLERANCE[dtype]


def test_grouped_mlp_default_tiles_and_expert_sorted_input():
    """The shipped tile table (one tile per expert here) and rows given already in expert order."""
    case = RoutingCase("k2_default_tiles", 13, 6, 2, empty_experts=(4,))
    assert_mlp_matches_fp64_reference(case, F.gelu, False, torch.float32, hidden=40, expert_hidden=32, gather=False)


def test_grouped_mlp_strided_gather_index(small_tiles):
    """A gather index that is a column of a wider tensor (stride 2) reads the same rows as a contiguous one."""
    case = RoutingCase("k2_strided_index", 9, 5, 2, empty_experts=(3,))
    tensors, plan = mlp_inputs(case, 24, 40, False, torch.float32)
    strided = torch.stack([plan.source_token, torch.zeros_like(plan.source_token)], dim=1)[:, 0]
    assert strided.stride(0) == 2
    expected, expected_grads = run_mlp(TRITON, tensors, plan, F.gelu, False)
    plan.source_token = strided
    out, grads = run_mlp(TRITON, tensors, plan, F.gelu, False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_assignments_at_all():
    """Every assignment dropped: empty expert rows, zero outputs, zero gradients."""
    x = torch.randn(3, 16, requires_grad=True)
    weight1, weight2 = torch.randn(4, 16, 32, requires_grad=True), torch.randn(4, 16, 16, requires_grad=True)
    gates = torch.empty(0, requires_grad=True)
    token_offsets = torch.zeros(4, dtype=torch.int64)
    plan = TRITON.dispatch_plan(torch.empty(0, dtype=torch.int64), token_offsets, 4)
    rows = TRITON.grouped_mlp(x, plan.tokens_per_expert, weight1, weight2, F.silu, True, plan.source_token)
    out = TRITON.combine(rows, gates, plan.row_of_assignment, token_offsets)
    assert rows.shape == (0, 16) and torch.equal(out, torch.zeros(3, 16))
    out.sum().backward()
    for tensor in (x, weight1, weight2):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor))


# ---------------------------------------------------------------- NaN and padding


def test_nan_in_one_token_reaches_that_token_only(small_tiles):
    """A NaN input row comes out NaN in its token's output (never masked), every other token stays finite."""
    case = RoutingCase("k3", 11, 7, 3, empty_experts=(2,))
    expert_index, token_offsets = case.build()
    (x, weight1, weight2), plan = mlp_inputs(case, 24, 40, False, torch.float32)
    x[5, 3] = float("nan")
    plan = TRITON.dispatch_plan(expert_index, token_offsets, case.num_experts)
    rows = TRITON.grouped_mlp(x, plan.tokens_per_expert, weight1, weight2, F.gelu, False, plan.source_token)
    gates = torch.rand(expert_index.numel(), generator=seeded(3))
    out = TRITON.combine(rows, gates, plan.row_of_assignment, token_offsets)
    assert out[5].isnan().all()
    assert torch.isfinite(out[torch.arange(11) != 5]).all()


def test_nan_expert_row_reaches_its_token_in_combine(small_tiles):
    expert_output, weight, rows, token_offsets = combine_inputs(RoutingCase("k3", 8, 6, 3), torch.float32)
    nan_row = int(rows[4])  # assignment 4 belongs to token 1
    expert_output[nan_row, 0] = float("nan")
    out = TRITON.combine(expert_output, weight, rows, token_offsets)
    assert out[1, 0].isnan() and torch.isfinite(out[1, 1:]).all()
    assert torch.isfinite(out[torch.arange(8) != 1]).all()


def test_padding_lanes_and_empty_experts_inject_nothing(monkeypatch, small_tiles):
    """Fresh buffers full of NaN: every output element is written from real rows, never left or padded."""
    real_empty = torch.empty

    def nan_filled(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-1)

    monkeypatch.setattr(torch, "empty", nan_filled)
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: nan_filled(t.shape, dtype=kw.get("dtype", t.dtype)))
    case = RoutingCase("top1_empty_experts", 9, 6, 1, empty_experts=(0, 3, 5))
    _, grads = assert_mlp_matches_fp64_reference(case, F.silu, True, torch.float32, hidden=20, expert_hidden=36)
    assert all(torch.isfinite(g).all() for g in grads)
    plan = TRITON.dispatch_plan(*case.build(), case.num_experts)
    assert (plan.source_token >= 0).all() and (plan.row_of_assignment >= 0).all()
