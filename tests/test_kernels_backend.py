"""The ``--moe-kernels`` switch, the fused activations, and the layer end to end on the Triton kernels."""

import functools

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from megatron.core.activations import fast_gelu, quick_gelu

from kernel_cases import REFERENCE, RoutingCase  # sets TRITON_INTERPRET=1 before the kernels are imported
from granular_moe import GranularMoELayer
from granular_moe.config import GranularMoEConfigError
from granular_moe.ops import KERNEL_OPS, check_kernel_backend, kernels_for
from granular_moe.ops import triton as triton_ops
from granular_moe.ops.triton import tiles
from granular_moe.ops.triton.activations import (
    FUSED_ACTIVATIONS, activation_derivative, activation_name, apply_activation,
)
from helpers import moe_config

# ---------------------------------------------------------------- backend selection


def test_auto_picks_torch_on_cpu_and_triton_forces_the_kernels():
    assert kernels_for("auto", "cpu") is REFERENCE
    assert kernels_for("torch", "cpu") is REFERENCE
    assert kernels_for("triton", "cpu") is triton_ops.STRICT
    assert kernels_for("auto", torch.device("cuda", 0)) is triton_ops.WITH_TORCH_FALLBACK
    assert kernels_for("torch", "cuda") is REFERENCE


def test_every_backend_implements_the_five_ops_with_the_reference_signatures():
    import inspect

    assert KERNEL_OPS == ("dispatch_plan", "expert_parallel_plan", "permute", "grouped_mlp", "combine")
    for backend in (REFERENCE, triton_ops.STRICT, triton_ops.WITH_TORCH_FALLBACK):
        for name in KERNEL_OPS:
            op = getattr(backend, name)
            assert callable(op), (backend, name)
            assert (list(inspect.signature(op).parameters)
                    == list(inspect.signature(getattr(REFERENCE, name)).parameters)), (backend, name)


def test_unknown_backend_names_the_flag():
    message = "--moe-kernels 'cuda' is not valid; valid values: auto, torch, triton"
    with pytest.raises(GranularMoEConfigError, match=message):
        check_kernel_backend("cuda")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    with pytest.raises(GranularMoEConfigError, match="--moe-kernels triton on cpu tensors .* TRITON_INTERPRET=1"):
        kernels_for("triton", "cpu")


def mlp_arguments(activation, dtype=torch.float32):
    case = RoutingCase("k2", 5, 4, 2)
    plan = REFERENCE.dispatch_plan(*case.build(), case.num_experts)
    x = torch.randn(5, 16, dtype=dtype)
    weight1, weight2 = torch.randn(4, 16, 16, dtype=dtype), torch.randn(4, 16, 16, dtype=dtype)
    return (x, plan.tokens_per_expert, weight1, weight2, activation, False, plan.source_token)


@pytest.mark.parametrize(
    "activation, dtype, problem",
    [
        (F.relu, torch.float32, "the activation .*relu.* is not fused"),
        (F.gelu, torch.float64, "dtypes x torch.float64"),
    ],
)
def test_unfused_work_raises_when_forced_and_falls_back_under_auto(activation, dtype, problem):
    arguments = mlp_arguments(activation, dtype)
    message = f"--moe-kernels triton: {problem}.*use --moe-kernels auto or torch"
    with pytest.raises(GranularMoEConfigError, match=message):
        triton_ops.STRICT.grouped_mlp(*arguments)
    fallback = triton_ops.WITH_TORCH_FALLBACK.grouped_mlp(*arguments)
    torch.testing.assert_close(fallback, REFERENCE.grouped_mlp(*arguments))


# ---------------------------------------------------------------- tile table

H100_SHARED_MEMORY = 227 * 1024


def is_power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tile_table_covers_expert_widths_32_to_8192(dtype):
    """Every GEMM of the expert block, d_expert 32..8192 (odd widths too), any rows per expert: power-of-two
    tiles of at least 16 (tl.dot's minimum), no wider than the next power of two of the matrix, whose
    pipelined operand tiles fit an H100's shared memory."""
    size = dtype.itemsize
    hidden = 2048
    for d_expert in (32, 48, 100, 128, 256, 1024, 4096, 8000, 8192):
        for rows_per_expert in (0.5, 37, 2048, 1e6):
            for gated in (False, True):
                width = d_expert * (2 if gated else 1)
                row_gemms = [  # (n, k, wide epilogue, two accumulators): fc1, fc2, d act, d x
                    (d_expert, hidden, gated, gated),
                    (hidden, d_expert, False, False),
                    (d_expert, hidden, True, False),
                    (hidden, width, False, False),
                ]
                for n, k, wide, two in row_gemms:
                    t = tiles.row_gemm_tiles(rows_per_expert, n, k, dtype, wide)
                    for block, extent in ((t.block_m, None), (t.block_n, n), (t.block_k, k)):
                        assert is_power_of_two(block) and block >= 16
                        assert extent is None or block <= max(16, 2 ** (extent - 1).bit_length())
                    operands = t.block_m * t.block_k + (2 if two else 1) * t.block_k * t.block_n
                    assert t.num_stages * operands * size <= H100_SHARED_MEMORY
                for k, n in ((d_expert, hidden), (hidden, width)):  # dW2, dW1
                    t = tiles.weight_grad_tiles(k, n, dtype)
                    assert all(is_power_of_two(b) and b >= 16 for b in (t.block_m, t.block_n, t.block_k))
                    assert t.num_stages * (t.block_m * t.block_k + t.block_m * t.block_n) * size <= H100_SHARED_MEMORY


# ---------------------------------------------------------------- fused activations


def test_activation_names_of_megatron_and_torch_callables():
    assert activation_name(F.gelu) == "gelu"
    assert activation_name(functools.partial(F.gelu, approximate="tanh")) == "gelu_tanh"
    assert activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name(fast_gelu) == "gelu_tanh"
    assert activation_name(F.silu) == activation_name(torch.nn.SiLU()) == "silu"
    assert activation_name(quick_gelu) == "quick_gelu"
    for unfused in (F.relu, torch.tanh, functools.partial(F.gelu, torch.ones(1)), lambda x: x):
        assert activation_name(unfused) is None


@triton.jit
def _activation_kernel(x_ptr, value_ptr, derivative_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(value_ptr + offsets, apply_activation(x, ACTIVATION), mask=mask)
    tl.store(derivative_ptr + offsets, activation_derivative(x, ACTIVATION), mask=mask)


TORCH_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(-x) -> inf saturates
@pytest.mark.parametrize("name", FUSED_ACTIVATIONS)
def test_fused_activation_and_derivative_match_torch_autograd(name):
    x = torch.cat([torch.linspace(-12, 12, 97), torch.tensor([0.0, float("nan")])])
    value, derivative = torch.empty_like(x), torch.empty_like(x)
    _activation_kernel[(1,)](x, value, derivative, x.numel(), ACTIVATION=name, BLOCK=128)
    x64 = x.double().requires_grad_()
    expected = TORCH_ACTIVATIONS[name](x64)
    (expected_derivative,) = torch.autograd.grad(expected.sum(), x64)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(derivative.double(), expected_derivative, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert value[-1].isnan() and derivative[-1].isnan()


# ---------------------------------------------------------------- the layer end to end


@pytest.mark.parametrize(
    "granularity, overrides",
    [
        (4, dict()),
        (2, dict(gated_linear_unit=True, activation_func=F.silu, moe_expert_capacity_factor=0.5)),
    ],
    ids=["gelu_g4", "swiglu_g2_capacity"],
)
def test_layer_on_triton_kernels_equals_torch_kernels(granularity, overrides):
    config = moe_config(granularity, dtype=torch.float32, **overrides)
    torch.manual_seed(0)
    layers = {name: GranularMoELayer(config, layer_number=1, kernels=name) for name in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(6, 2, config.hidden_size)
    projection = torch.randn_like(x)
    results = {}
    for name, layer in layers.items():
        x_leaf = x.clone().requires_grad_()
        out, _ = layer(x_leaf)
        (out * projection).sum().backward()
        grads = [x_leaf.grad] + [p.grad for p in layer.parameters()]
        results[name] = (out, grads)
    out, grads = results["triton"]
    torch.testing.assert_close(out, results["torch"][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, results["torch"][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "moe_expert_capacity_factor" in overrides:
        assert int(layers["triton"].stats.dropped) > 0
