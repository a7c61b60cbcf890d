"""benchmarks/kernel_accuracy.py (the GPU numerics check of the Triton kernels) on the CPU interpreter:
its tiny cases pass, and it reports a kernel that is off, or that spreads a NaN, as a failure."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import kernel_cases  # noqa: F401  (sets TRITON_INTERPRET=1 before the kernels are imported)
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_accuracy.py"


@pytest.fixture(scope="module")
def accuracy():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run as a script: benchmarks/ is on the path
    spec = importlib.util.spec_from_file_location("kernel_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_accuracy"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_cases_pass_and_are_written(accuracy, tmp_path):
    assert accuracy.main(["--tiny", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "kernel_accuracy.json").read_text())
    assert payload["info"]["interpreted"] and payload["info"]["commit"]
    checked = [row for row in payload["rows"] if "worst" in row]
    assert {(row["case"], row["dtype"]) for row in checked} == {
        (case.name, dtype) for case in accuracy.TINY_CASES for dtype in ("float32", "float16")}
    assert all(row["passed"] and row["metadata_equal"] and row["worst"] < row["tolerance"] for row in checked)
    assert sum(row["case"].startswith("nan_in_one_token") and row["passed"] for row in payload["rows"]) == 2


def with_kernel(accuracy, monkeypatch, **replaced):
    """The script's Triton kernels with some functions replaced."""
    triton_kernels = accuracy.kernels_for("triton", "cpu")
    functions = {name: getattr(triton_kernels, name) for name in ("dispatch_plan", "grouped_mlp", "combine")}
    patched = SimpleNamespace(**(functions | {name: make(functions[name]) for name, make in replaced.items()}))
    monkeypatch.setattr(accuracy, "kernels_for", lambda backend, device: patched)


def test_an_error_above_the_target_fails(accuracy, monkeypatch):
    with_kernel(accuracy, monkeypatch, combine=lambda combine: lambda *a: combine(*a) * (1 + 1e-4))
    row = accuracy.check_case(accuracy.TINY_CASES[0], torch.float32, torch.device("cpu"))
    assert 5e-5 < row["output"] < 2e-4 and not row["passed"]


def test_a_nan_in_any_gradient_fails(accuracy, monkeypatch):
    def nan_grad_x(grouped_mlp):
        class PoisonGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, grad):
                return torch.full_like(grad, float("nan"))

        return lambda x, *rest: grouped_mlp(PoisonGrad.apply(x), *rest)

    with_kernel(accuracy, monkeypatch, grouped_mlp=nan_grad_x)
    row = accuracy.check_case(accuracy.TINY_CASES[0], torch.float32, torch.device("cpu"))
    assert row["output"] < 1e-5 and row["grad_x"] != row["grad_x"]  # a correct output, a NaN input gradient
    assert row["worst"] != row["worst"] and not row["passed"]


def test_a_nan_spreading_to_other_tokens_fails(accuracy, monkeypatch):
    def spread(grouped_mlp):
        return lambda x, *rest: grouped_mlp(x, *rest) + x.sum()  # one NaN poisons every row

    with_kernel(accuracy, monkeypatch, grouped_mlp=spread)
    assert not accuracy.check_nan_isolation(accuracy.TINY_CASES[0], torch.float32, torch.device("cpu"))["passed"]


def test_metadata_that_differs_fails(accuracy, monkeypatch):
    def reversed_rows(dispatch_plan):
        def plan(*args):
            result = dispatch_plan(*args)
            result.source_token = result.source_token.flip(0)
            return result
        return plan

    with_kernel(accuracy, monkeypatch, dispatch_plan=reversed_rows)
    row = accuracy.check_case(accuracy.TINY_CASES[0], torch.float32, torch.device("cpu"))
    assert not row["metadata_equal"] and not row["passed"]
