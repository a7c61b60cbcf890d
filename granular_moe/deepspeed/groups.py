"""The expert groups of a :class:`~granular_moe.deepspeed.GranularMoE` layer: DeepSpeed's own
(``deepspeed.utils.groups``, named ``ep_size_N``), without megatron-core's parallel state.

DeepSpeed lays an expert-parallel group of ``N`` ranks over consecutive ranks (``[0, N)``, ``[N, 2N)``, ...) and
the expert-data-parallel groups across them; its engine reduces the expert weights' gradients over the latter. The
layer's dispatcher needs the groups when it is built, before ``deepspeed.initialize`` calls the layer's
``set_deepspeed_parallelism``, so :func:`expert_groups` creates them (DeepSpeed's ``_create_expert_and_data_parallel``,
as DeepSpeed's ``MoE`` does later) when they do not exist yet, and the engine finds them there.

Nodes: a rank's node is ``rank // ranks_per_node`` (default ``LOCAL_WORLD_SIZE``); an expert-parallel group spanning
nodes gets the node groups of the two-level all-to-all (:func:`granular_moe.parallel.node_groups`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.distributed as dist

from granular_moe.parallel import (
    ExpertParallelGroups,
    ParallelLayoutError,
    deepspeed_comm_over_torch_distributed,
    node_groups,
    default_ranks_per_node,
)
from granular_moe.parallel_layout import divisors

_BUILT: dict = {}  # (ep_size, ranks_per_node) -> ExpertParallelGroups, per process
_SINGLE_RANK: list = []  # this rank's one-rank group


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of size ``ep_size`` (what ``param.group_name`` holds)."""
    return f"ep_size_{ep_size}"


def layout_problem(ep_size: int, world_size: int, ranks_per_node: int) -> Optional[str]:
    """Why ``world_size`` ranks with ``ranks_per_node`` per node cannot hold expert-parallel groups of ``ep_size``
    consecutive ranks (DeepSpeed's layout); None when they can."""
    if world_size % ep_size:
        return (f"ep_size {ep_size} does not divide the {world_size} processes of the world; "
                f"valid values: {divisors(world_size)}")
    if world_size % ranks_per_node:
        return (f"{ranks_per_node} ranks per node (ranks_per_node / LOCAL_WORLD_SIZE) do not divide the "
                f"{world_size} processes; valid values: {divisors(world_size)}")
    if ep_size > ranks_per_node and ep_size % ranks_per_node or ep_size < ranks_per_node and ranks_per_node % ep_size:
        return (f"ep_size {ep_size} spans nodes of {ranks_per_node} ranks unevenly: it must divide the ranks per "
                f"node (ranks_per_node / LOCAL_WORLD_SIZE) or be a multiple of them")
    return None


def check_expert_layout(ep_size: int, ranks_per_node: Optional[int] = None) -> None:
    """Raise :class:`~granular_moe.parallel.ParallelLayoutError` naming ``ep_size`` when this world cannot hold it.

    Without ``torch.distributed`` initialised only ``ep_size`` 1 fits (one process)."""
    if not dist.is_initialized():
        if ep_size != 1:
            raise ParallelLayoutError(
                f"ep_size {ep_size} needs torch.distributed initialised before the layer is built "
                f"(deepspeed.init_distributed() or torch.distributed.init_process_group()); one process: ep_size 1"
            )
        return
    problem = layout_problem(ep_size, dist.get_world_size(), default_ranks_per_node(ranks_per_node))
    if problem:
        raise ParallelLayoutError(problem)


def ensure_deepspeed_comm() -> None:
    """DeepSpeed's communication layer over the process group ``torch.distributed`` already has (gloo or NCCL),
    set up once (:func:`granular_moe.parallel.deepspeed_comm_over_torch_distributed`)."""
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed_comm_over_torch_distributed()


def expert_groups(ep_size: int, ranks_per_node: Optional[int] = None) -> Optional[ExpertParallelGroups]:
    """This rank's expert-parallel groups of ``ep_size`` ranks (DeepSpeed's ``ep_size_N``), created when missing;
    None without ``torch.distributed`` (one process).

    Collective over the world the first time for a given size (it creates process groups): every rank builds its
    layers in the same order."""
    check_expert_layout(ep_size, ranks_per_node)
    if not dist.is_initialized():
        return None
    from deepspeed.utils import groups as ds_groups

    ranks_per_node = default_ranks_per_node(ranks_per_node)
    key, name = (ep_size, ranks_per_node), group_name(ep_size)
    registered = name in ds_groups._get_expert_parallel_group_dict()
    if key in _BUILT and registered:
        return _BUILT[key]
    ensure_deepspeed_comm()
    if not registered:
        ds_groups._create_expert_and_data_parallel(ep_size)
    groups = ExpertParallelGroups(
        expert_parallel=ds_groups._get_expert_parallel_group(name),
        expert_data_parallel=ds_groups._get_expert_data_parallel_group(name),
        expert_parallel_ranks=tuple(ds_groups._get_expert_parallel_group_ranks(name)),
        expert_data_parallel_ranks=tuple(ds_groups._get_expert_data_parallel_group_ranks(name)),
        ranks_per_node=ranks_per_node,
    )
    every_group = [None] * dist.get_world_size()
    dist.all_gather_object(every_group, groups.expert_parallel_ranks)
    nodes = node_groups(groups.expert_parallel_ranks, sorted(set(every_group)), ranks_per_node)
    groups = dataclasses.replace(groups, nodes=nodes)
    _BUILT[key] = groups
    return groups


def single_rank_group() -> dist.ProcessGroup:
    """A process group of this rank alone (megatron-core's shared-expert MLP takes its tensor-parallel group),
    created once: collective over the world (every rank creates every rank's group, in rank order)."""
    if not dist.is_initialized():
        raise ParallelLayoutError(
            "shared_expert_size needs torch.distributed initialised before the layer is built (megatron-core's "
            "shared-expert MLP takes a process group): deepspeed.init_distributed(), or a one-process gloo group")
    if not _SINGLE_RANK:
        created = [dist.new_group([rank]) for rank in range(dist.get_world_size())]
        _SINGLE_RANK.append(created[dist.get_rank()])
    return _SINGLE_RANK[0]

