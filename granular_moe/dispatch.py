"""Token movement between the router and the experts: on one rank, across the expert-parallel group
(de-duplicated all-to-all), and across the tensor-parallel group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from granular_moe.ops import kernels_for
from granular_moe.router import Routing


class LocalDispatcher:
    """Every expert lives on this rank: sort by expert (the gather is fused into the expert kernel's
    loads), run the experts, and combine each token's gated outputs."""

    def __init__(self, kernels: str = "auto"):
        self.kernels = kernels

    def __call__(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        ops = kernels_for(self.kernels, x.device)
        plan = ops.dispatch_plan(routing.expert_index, routing.token_offsets, routing.num_experts)
        expert_output = experts(x, plan.tokens_per_expert, gather_index=plan.source_token)
        return ops.combine(expert_output, routing.weight, plan.row_of_assignment, routing.token_offsets)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with split sizes; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list, recv_splits: list, group) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


@dataclass
class AllToAllTraffic:
    """What one forward dispatch sent from this rank (the combine returns the same rows).

    ``rows_sent`` counts (token, destination rank) rows, self included; a dispatcher without
    de-duplication sends ``assignments`` rows (one per routed (token, expert)).
    """

    rows_sent: int
    remote_rows_sent: int
    remote_bytes_sent: int  # token rows, gate weights and metadata that left this rank
    assignments: int


class AllToAllDispatcher:
    """Experts spread over the expert-parallel group, ``num_local_experts`` per rank.

    De-duplicated: a token routed to several experts of one rank crosses to it once, with its local
    expert ids and gate weights; the destination runs the local pipeline on what it received (expand,
    expert MLPs, weighted combine) and returns one row per (token, rank), which the source sums. Counts
    go first (one small all-to-all), then the payload with exact split sizes.
    """

    def __init__(self, group: dist.ProcessGroup, num_local_experts: int, kernels: str = "auto"):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_local_experts = num_local_experts
        self.local = LocalDispatcher(kernels)
        self.kernels = kernels
        self.traffic: Optional[AllToAllTraffic] = None

    def __call__(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        ops = kernels_for(self.kernels, x.device)
        plan = ops.expert_parallel_plan(
            routing.expert_index, routing.token_offsets, self.num_local_experts, self.ep_size
        )
        counts = torch.stack([plan.rows_per_rank, plan.assignments_per_rank], dim=1)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        send_rows, send_assignments = counts.t().tolist()
        recv_rows, recv_assignments = received_counts.t().tolist()

        # Integer metadata in one all-to-all: per destination, its rows' sizes then its local expert ids.
        local_expert = (routing.expert_index % self.num_local_experts)[plan.send_assignments]
        metadata = torch.cat([
            torch.cat(pair)
            for pair in zip(plan.send_row_size.split(send_rows), local_expert.split(send_assignments))
        ])
        received_metadata = metadata.new_empty(sum(recv_rows) + sum(recv_assignments))
        dist.all_to_all_single(
            received_metadata,
            metadata,
            [r + a for r, a in zip(recv_rows, recv_assignments)],
            [r + a for r, a in zip(send_rows, send_assignments)],
            group=self.group,
        )
        segments = received_metadata.split([n for pair in zip(recv_rows, recv_assignments) for n in pair])
        received_sizes, received_experts = torch.cat(segments[0::2]), torch.cat(segments[1::2])

        x_sent = all_to_all(ops.permute(x, plan.send_token), send_rows, recv_rows, self.group)
        weight_sent = all_to_all(routing.weight[plan.send_assignments], send_assignments, recv_assignments, self.group)
        received = Routing(
            expert_index=received_experts,
            weight=weight_sent,
            token_offsets=torch.nn.functional.pad(torch.cumsum(received_sizes, 0), (1, 0)),
            num_experts=self.num_local_experts,
        )
        returned = all_to_all(self.local(x_sent, received, experts), recv_rows, send_rows, self.group)
        self.traffic = _traffic(send_rows, send_assignments, self.ep_rank, x, weight_sent, metadata)

        # Each token sums the rows it got back (one per rank it visited).
        ones = torch.ones(plan.send_token.numel(), dtype=routing.weight.dtype, device=x.device)
        return ops.combine(returned, ones, plan.sent_row_of_pair, plan.pair_offsets)


def _traffic(send_rows, send_assignments, ep_rank, x, weights, metadata) -> AllToAllTraffic:
    remote_rows = sum(send_rows) - send_rows[ep_rank]
    remote_assignments = sum(send_assignments) - send_assignments[ep_rank]
    return AllToAllTraffic(
        rows_sent=sum(send_rows),
        remote_rows_sent=remote_rows,
        remote_bytes_sent=(
            remote_rows * (x.shape[1] * x.element_size() + metadata.element_size())
            + remote_assignments * (weights.element_size() + metadata.element_size())
        ),
        assignments=sum(send_assignments),
    )


class _SplitTokens(torch.autograd.Function):
    """Rows ``start:stop`` of a tensor replicated over the tensor-parallel group. Backward: every rank
    gets the full gradient (each rank's rows summed in over the group)."""

    @staticmethod
    def forward(ctx, x, start, stop, group):
        ctx.shape, ctx.start, ctx.stop, ctx.group = x.shape, start, stop, group
        return x[start:stop]

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[ctx.start : ctx.stop] = grad
        dist.all_reduce(full, group=ctx.group)
        return full, None, None, None


class _GatherTokens(torch.autograd.Function):
    """Concatenate equal-sized row blocks over the tensor-parallel group; backward keeps this rank's
    block (the gathered tensor feeds replicated computation)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.rows, ctx.group = dist.get_rank(group), x.shape[0], group
        blocks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(blocks, x.contiguous(), group=group)
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def split_tokens(x: torch.Tensor, start: int, stop: int, group) -> torch.Tensor:
    return _SplitTokens.apply(x, start, stop, group)


def gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherTokens.apply(x, group)


def slice_routing(routing: Routing, start: int, stop: int, group) -> Routing:
    """The routing of tokens ``start:stop`` of a replicated routing (gate gradients summed back over
    ``group``)."""
    first, last = routing.token_offsets[start], routing.token_offsets[stop]
    first_index, last_index = int(first), int(last)
    return Routing(
        expert_index=routing.expert_index[first_index:last_index],
        weight=split_tokens(routing.weight, first_index, last_index, group),
        token_offsets=routing.token_offsets[start : stop + 1] - first,
        num_experts=routing.num_experts,
    )
