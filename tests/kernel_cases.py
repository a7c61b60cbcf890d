"""Shared by the Triton kernel tests: runs the kernels under Triton's CPU interpreter and builds routings.

Import this module before anything imports :mod:`granular_moe.ops.triton`: Triton decides whether a kernel
is compiled or interpreted when the kernel is defined.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from granular_moe.ops import kernels_for, reference  # noqa: E402
from granular_moe.ops import triton as triton_ops  # noqa: E402
from granular_moe.ops.triton import tiles  # noqa: E402

assert triton_ops.INTERPRETED, "granular_moe.ops.triton was imported before TRITON_INTERPRET=1 was set"

TRITON = kernels_for("triton", "cpu")
REFERENCE = reference


@dataclass
class RoutingCase:
    """Token-major assignments of ``num_tokens`` tokens to ``num_experts`` experts."""

    name: str
    num_tokens: int
    num_experts: int
    topk: int
    empty_experts: tuple = ()  # experts no token picks
    drop_rate: float = 0.0  # share of assignments dropped (tokens keep fewer than topk, some none)
    seed: int = 0

    def __str__(self):
        return self.name

    def build(self):
        """``(expert_index [A], token_offsets [T + 1])``: each token's experts distinct and ascending."""
        generator = torch.Generator().manual_seed(self.seed)
        allowed = torch.tensor([e for e in range(self.num_experts) if e not in self.empty_experts])
        assert self.topk <= allowed.numel()
        picks = torch.stack(
            [allowed[torch.randperm(allowed.numel(), generator=generator)[: self.topk]] for _ in range(self.num_tokens)]
        ).sort(dim=-1).values
        kept = torch.rand(picks.shape, generator=generator) >= self.drop_rate
        token_offsets = torch.zeros(self.num_tokens + 1, dtype=torch.int64)
        token_offsets[1:] = kept.sum(dim=-1).cumsum(0)
        return picks[kept].to(torch.int64), token_offsets


def _random_shape_cases(count: int, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    cases = []
    for i in range(count):
        num_experts = draw(3, 12)
        topk = draw(1, min(4, num_experts - 1))
        empty = (draw(0, num_experts - 1),)
        cases.append(RoutingCase(f"random{i}", draw(2, 13), num_experts, topk, empty_experts=empty, seed=i))
    return cases


ROUTING_CASES = [
    RoutingCase("one_token", 1, 4, 2),
    RoutingCase("top1_empty_experts", 9, 6, 1, empty_experts=(0, 3, 5)),
    RoutingCase("top64", 3, 70, 64),
    RoutingCase("dropped_tokens", 10, 5, 3, drop_rate=0.5, seed=3),
    *_random_shape_cases(2),
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in fp64 (NaN if either holds NaN)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.isnan().any() or expected.isnan().any():
        return float("nan")
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)) if expected.numel() else 0.0


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 (the smallest ``tl.dot`` takes), 4-row movement steps and 16-assignment routing blocks
    compared 8 at a time, so that small shapes span several tiles and end in partial ones."""
    monkeypatch.setattr(tiles, "row_gemm_tiles", lambda *a, **k: tiles.GemmTiles(16, 16, 16, 4, 1))
    monkeypatch.setattr(tiles, "weight_grad_tiles", lambda *a, **k: tiles.GemmTiles(16, 16, 16, 4, 1))
    monkeypatch.setattr(tiles, "movement_tiles", lambda *a, **k: tiles.MovementTiles(4, 16, 2))
    monkeypatch.setattr(tiles, "routing_tiles", lambda *a, **k: (16, 8))
