"""Gradient reduction over the parallel groups, and the global gradient norm, following the parameter
attributes megatron-core sets (what its DDP and ``finalize_model_grads`` do, on any device).

- ``sequence_parallel`` params (norms, and the router with sequence parallelism) see only their rank's
  sequence shard: summed over the tensor-parallel group.
- The word embedding tied to the output layer lives on the first and last pipeline stage: summed over
  the embedding group.
- Expert params (``allreduce=False``) are summed over the expert-data-parallel group, every other param
  over the data-parallel group; both are divided by the data-parallel size (the loss is a mean over the
  data-parallel replicas' batches).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from granular_moe.parallel import expert_parallel_groups


def is_expert_param(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def _all_reduce_coalesced(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    """Sum ``grads`` over ``group`` in one collective per dtype, then multiply by ``scale``."""
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        for grad, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            grad.copy_(reduced)


def _grads(params) -> list[torch.Tensor]:
    """Gradients, made zero where a parameter received none, so every rank joins the same collectives."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    return [param.grad for param in params]


def finalize_gradients(model: torch.nn.Module) -> None:
    """Reduce this rank's gradients over the tensor, embedding, data and expert-data parallel groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and model.config.sequence_parallel:
        shard_params = [p for p in params if getattr(p, "sequence_parallel", False)]
        if shard_params:
            _all_reduce_coalesced(_grads(shard_params), parallel_state.get_tensor_model_parallel_group())
    if (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        and model.share_embeddings_and_output_weights
        and parallel_state.is_rank_in_embedding_group()
    ):
        _all_reduce_coalesced(_grads([model.shared_embedding_or_output_weight()]), parallel_state.get_embedding_group())
    data_parallel = parallel_state.get_data_parallel_group()
    scale = 1.0 / dist.get_world_size(data_parallel)
    _all_reduce_coalesced(_grads([p for p in params if not is_expert_param(p)]), data_parallel, scale)
    expert_params = [p for p in params if is_expert_param(p)]
    if expert_params:
        groups = expert_parallel_groups()
        expert_data_parallel = data_parallel if groups is None else groups.expert_data_parallel
        _all_reduce_coalesced(_grads(expert_params), expert_data_parallel, scale)


def _counted_once(param: torch.nn.Parameter) -> bool:
    """Whether this rank's copy enters the norm: experts always (each expert-parallel rank holds its own),
    other TP-replicated params on TP rank 0 only, the last stage's copy of a tied embedding never."""
    if getattr(param, "shared", False):
        return False
    if is_expert_param(param) or getattr(param, "tensor_model_parallel", False):
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """The L2 norm of the whole model's gradient (every parameter counted once over all ranks); scales the
    gradients down to ``max_norm`` when above it (``max_norm`` <= 0: no clipping). Call after
    :func:`finalize_gradients`."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None and _counted_once(p)]
    squares = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for param in params:
        squares[int(is_expert_param(param))] += param.grad.detach().double().square().sum()
    # Non-expert params: distinct over tensor x pipeline ranks; experts: over expert x pipeline ranks.
    dist.all_reduce(squares[:1], group=parallel_state.get_model_parallel_group())
    dist.all_reduce(squares[1:], group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    norm = math.sqrt(float(squares.sum()))
    if max_norm > 0 and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)
    return norm
