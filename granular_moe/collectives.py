"""The layer's differentiable collectives: the expert-parallel all-to-all, started and finished in two steps
so work can run while rows travel, and the tensor-parallel token split and gather."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class InFlight:
    """An all-to-all started with ``async_op=True``: its work handle and the buffers it reads and writes,
    kept alive until :meth:`wait`."""

    def __init__(self, work, *buffers):
        self.work, self.buffers = work, buffers

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work, self.buffers = None, ()


def start_all_to_all(out: torch.Tensor, x: torch.Tensor, recv_splits: list, send_splits: list, group) -> InFlight:
    """``all_to_all_single`` along dim 0, asynchronous; ``out`` holds the result once the returned handle
    has been waited on."""
    x = x.contiguous()
    return InFlight(dist.all_to_all_single(out, x, recv_splits, send_splits, group=group, async_op=True), x, out)


class _StartAllToAll(torch.autograd.Function):
    """Forward: start the all-to-all (``ticket`` receives its handle). Backward: the reverse all-to-all of the
    gradient, synchronous."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, ticket):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        ticket.append(start_all_to_all(out, x, recv_splits, send_splits, group))
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None, None


class _FinishAllToAll(torch.autograd.Function):
    """Forward: wait for the all-to-all, then its output is readable. Backward: the gradient as it is."""

    @staticmethod
    def forward(ctx, out, in_flight: InFlight):
        in_flight.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PendingRows:
    """Rows on their way: :meth:`result` waits for them (differentiably)."""

    def __init__(self, out: torch.Tensor, in_flight: InFlight):
        self.out, self.in_flight = out, in_flight

    def result(self) -> torch.Tensor:
        return _FinishAllToAll.apply(self.out, self.in_flight)


def all_to_all_async(x: torch.Tensor, send_splits: list, recv_splits: list, group) -> PendingRows:
    """Start a differentiable all-to-all of ``x``'s rows (``send_splits[r]`` rows to rank ``r`` of ``group``,
    ``recv_splits[r]`` from it); its result is read through the returned :class:`PendingRows`."""
    ticket: list = []
    out = _StartAllToAll.apply(x, send_splits, recv_splits, group, ticket)
    return PendingRows(out, ticket[0])


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


def split_tokens(x: torch.Tensor, start: int, stop: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return _SplitTokens.apply(x, start, stop, group)


def gather_tokens(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return _GatherTokens.apply(x, group)
