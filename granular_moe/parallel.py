"""Process groups: megatron-core's parallel state, expert-parallel groups from DeepSpeed, and the check
that the two agree.

Expert tensor parallelism is 1 (fine-grained experts are too small to split), so megatron-core lays the
expert-parallel (EP) groups over consecutive ranks of a pipeline stage and the expert-data-parallel
(EDP) groups across them; DeepSpeed builds the same rank sets when handed megatron's ``parallel_state``
as ``mpu`` (its MoE path without expert tensor parallelism). :func:`initialize_model_parallel` builds
both and refuses to start if they differ.

Nodes: a rank's node is ``rank // ranks_per_node`` (``ranks_per_node`` defaults to ``LOCAL_WORLD_SIZE``, which
torchrun and the launchers set). When an expert-parallel group spans several nodes, each holding the same
number of its ranks, two more groups per rank carry the two-level all-to-all: ``intra_node`` (this rank's
expert-parallel peers on its node) and ``inter_node`` (the expert-parallel ranks of this rank's local index on
every node the group spans).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from granular_moe.config import GranularMoEConfigError
from granular_moe.parallel_layout import expert_node_problem, parallel_size_problems


class ParallelLayoutError(GranularMoEConfigError):
    """Parallel sizes that do not fit the world, or DeepSpeed's and megatron-core's groups disagreeing."""


@dataclass(frozen=True)
class NodeGroups:
    """How this rank's expert-parallel group spans ``nodes`` nodes of ``ranks_per_node`` of its ranks each:
    ``intra_node`` holds this rank's peers on its node, ``inter_node`` one rank per node (the same local
    index). Expert-parallel rank ``n * ranks_per_node + l`` is local rank ``l`` of node ``n``."""

    nodes: int
    ranks_per_node: int
    intra_node: dist.ProcessGroup
    inter_node: dist.ProcessGroup
    intra_node_ranks: tuple
    inter_node_ranks: tuple


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's expert-parallel and expert-data-parallel groups (DeepSpeed's), and, when the expert-parallel
    group spans nodes, its node groups."""

    expert_parallel: dist.ProcessGroup
    expert_data_parallel: dist.ProcessGroup
    expert_parallel_ranks: tuple
    expert_data_parallel_ranks: tuple
    ranks_per_node: int = 1  # processes per node
    nodes: Optional[NodeGroups] = None  # None: the expert-parallel group lies in one node

    @property
    def ep_size(self) -> int:
        return len(self.expert_parallel_ranks)

    @property
    def ep_rank(self) -> int:
        return self.expert_parallel_ranks.index(dist.get_rank())


_GROUPS: Optional[ExpertParallelGroups] = None


def initialize_model_parallel(tensor: int = 1, pipeline: int = 1, expert: int = 1,
                              virtual_pipeline: Optional[int] = None,
                              num_experts: Optional[int] = None,
                              ranks_per_node: Optional[int] = None) -> ExpertParallelGroups:
    """megatron-core's parallel state (expert tensor parallel 1) and DeepSpeed's expert groups, checked equal,
    and the node groups of expert-parallel groups that span nodes.

    Needs an initialised ``torch.distributed`` default group. ``virtual_pipeline``: model chunks per pipeline
    rank (interleaved 1F1B); ``num_experts``, when given, is checked against ``expert``; ``ranks_per_node``:
    processes per node (default ``LOCAL_WORLD_SIZE``, else the world: one node). Any value dividing the world
    works, so processes on one machine can stand in for nodes; the world size keeps the flat all-to-all.
    """
    from megatron.core import parallel_state

    ranks_per_node = default_ranks_per_node(ranks_per_node)
    problems = parallel_size_problems(dist.get_world_size(), tensor, pipeline, expert, num_experts,
                                      ranks_per_node=ranks_per_node)
    if problems:
        raise ParallelLayoutError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert,
        expert_tensor_parallel_size=1,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
    )
    return expert_groups_from_megatron(ranks_per_node)


def default_ranks_per_node(ranks_per_node: Optional[int] = None) -> int:
    """``ranks_per_node``, else ``LOCAL_WORLD_SIZE`` (torchrun, the launchers), else the world size."""
    if ranks_per_node is not None:
        return ranks_per_node
    return int(os.environ.get("LOCAL_WORLD_SIZE") or dist.get_world_size())


def expert_groups_from_megatron(ranks_per_node: Optional[int] = None) -> ExpertParallelGroups:
    """DeepSpeed's expert groups for the layout megatron-core's ``parallel_state`` already holds (as
    Megatron-LM's ``pretrain`` makes it), checked equal to megatron-core's, with the node groups when an
    expert-parallel group spans nodes of ``ranks_per_node`` processes (default ``LOCAL_WORLD_SIZE``).

    Collective over all ranks (it creates process groups); returns the existing groups when called again.
    """
    global _GROUPS
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise ParallelLayoutError("megatron-core's model-parallel state is not initialised")
    if _GROUPS is not None:
        megatron_ranks = tuple(dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()))
        wanted = default_ranks_per_node(ranks_per_node)
        if megatron_ranks != _GROUPS.expert_parallel_ranks or wanted != _GROUPS.ranks_per_node:
            raise ParallelLayoutError(
                f"megatron-core's expert-parallel ranks {megatron_ranks} with {wanted} ranks per node are not the "
                f"expert groups already built ({_GROUPS.expert_parallel_ranks}, {_GROUPS.ranks_per_node} per node): "
                f"call granular_moe.parallel.destroy_model_parallel() before initialising another layout"
            )
        return _GROUPS
    expert_tensor = parallel_state.get_expert_tensor_parallel_world_size()
    if expert_tensor != 1:
        raise ParallelLayoutError(
            f"--expert-tensor-parallel-size {expert_tensor} is not supported; valid values: 1"
        )
    expert = parallel_state.get_expert_model_parallel_world_size()
    deepspeed_comm_over_torch_distributed()
    ds_groups.mpu = parallel_state
    name = f"ep_size_{expert}"
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(expert)
    ranks_per_node = default_ranks_per_node(ranks_per_node)
    groups = ExpertParallelGroups(
        expert_parallel=ds_groups._get_expert_parallel_group(name),
        expert_data_parallel=ds_groups._get_expert_data_parallel_group(name),
        expert_parallel_ranks=tuple(ds_groups._get_expert_parallel_group_ranks(name)),
        expert_data_parallel_ranks=tuple(ds_groups._get_expert_data_parallel_group_ranks(name)),
        ranks_per_node=ranks_per_node,
    )
    every_group = _check_against_megatron(groups, parallel_state)
    groups = dataclasses.replace(groups, nodes=node_groups(groups.expert_parallel_ranks, every_group, ranks_per_node))
    _GROUPS = groups
    return groups


def node_groups(expert_ranks: tuple, every_expert_group: list, ranks_per_node: int) -> Optional[NodeGroups]:
    """The intra- and inter-node groups of every expert-parallel group that spans nodes, created in the same
    order on every rank (``dist.new_group`` is collective); this rank's, or None when its group lies in one
    node."""
    problems = sorted({problem for ranks in every_expert_group
                       if (problem := expert_node_problem(ranks, ranks_per_node))})
    if problems:
        raise ParallelLayoutError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
    mine = None
    for ranks in every_expert_group:
        nodes = len({rank // ranks_per_node for rank in ranks})
        if nodes == 1:
            continue
        per_node = len(ranks) // nodes
        intra = [tuple(ranks[n * per_node:(n + 1) * per_node]) for n in range(nodes)]
        inter = [tuple(ranks[local::per_node]) for local in range(per_node)]
        created = {members: dist.new_group(list(members)) for members in intra + inter}
        if ranks == expert_ranks:
            mine_intra = next(members for members in intra if dist.get_rank() in members)
            mine_inter = next(members for members in inter if dist.get_rank() in members)
            mine = NodeGroups(nodes, per_node, created[mine_intra], created[mine_inter], mine_intra, mine_inter)
    return mine


def deepspeed_comm_over_torch_distributed() -> None:
    """Point DeepSpeed's communication layer at the process group torch.distributed already has, without the
    CPU shared-memory collective op ``deepspeed.init_distributed`` builds on a machine without a GPU: only
    DeepSpeed's group helpers are used here, and that op's compile (first use on a machine) leaves a lock
    under the torch extensions folder which hangs every later job if the compile is killed."""
    import importlib

    import deepspeed

    deepspeed_torch = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm.torch is torch itself

    build_shm_op = deepspeed_torch.build_shm_op
    deepspeed_torch.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    finally:
        deepspeed_torch.build_shm_op = build_shm_op


def _check_against_megatron(groups: ExpertParallelGroups, parallel_state) -> list:
    """Raise if DeepSpeed's groups differ from megatron-core's on any rank; else every expert-parallel group
    (sorted rank tuples, the same list on every rank)."""
    megatron = (
        tuple(dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())),
        tuple(sorted(dist.get_process_group_ranks(parallel_state.get_expert_data_parallel_group()))),
    )
    deepspeed_sets = (groups.expert_parallel_ranks, tuple(sorted(groups.expert_data_parallel_ranks)))
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, (deepspeed_sets, megatron))
    if any(ds != mg for ds, mg in layouts):
        def describe(index):
            return sorted({layout[index] for layout in layouts})
        raise ParallelLayoutError(
            "DeepSpeed's expert groups differ from megatron-core's: DeepSpeed (EP, EDP) per rank "
            f"{describe(0)} vs megatron-core {describe(1)}"
        )
    return sorted({layout[0][0] for layout in layouts})


def expert_parallel_groups() -> Optional[ExpertParallelGroups]:
    """The groups made by :func:`initialize_model_parallel`, or None in a single-process setting."""
    return _GROUPS


def expert_groups_for(pg_collection=None) -> Optional[ExpertParallelGroups]:
    """The groups a layer spreads its experts over: those of megatron-core's ``pg_collection`` (its ``ep`` and
    ``expt_dp`` groups; megatron-core 0.19 hands the collection to every module it builds) when it carries an
    expert-parallel group, else the module-level ones (:func:`expert_parallel_groups`).

    When the collection's expert-parallel ranks are those of the module-level groups, the module-level groups
    are used (DeepSpeed's, with their node groups for the two-level all-to-all). A collection whose group differs
    gets one all-to-all level over it (node groups are created collectively, by
    :func:`expert_groups_from_megatron`, not per layer)."""
    group = None if pg_collection is None else getattr(pg_collection, "ep", None)
    if group is None:
        return _GROUPS
    ranks = tuple(dist.get_process_group_ranks(group))
    if _GROUPS is not None and _GROUPS.expert_parallel_ranks == ranks:
        return _GROUPS
    if len(ranks) == 1:
        return None
    replicas = getattr(pg_collection, "expt_dp", None)
    if replicas is None:
        raise ParallelLayoutError(
            f"the process-group collection has an expert-parallel group of ranks {list(ranks)} but no expert-data-"
            f"parallel group (expt_dp): give both, as ProcessGroupCollection.use_mpu_process_groups() does"
        )
    return ExpertParallelGroups(
        expert_parallel=group, expert_data_parallel=replicas, expert_parallel_ranks=ranks,
        expert_data_parallel_ranks=tuple(dist.get_process_group_ranks(replicas)),
        ranks_per_node=default_ranks_per_node(),
    )


def destroy_model_parallel() -> None:
    """Forget the groups (megatron-core's and DeepSpeed's) so a new layout can be initialised."""
    global _GROUPS
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    for registry in (
        ds_groups._EXPERT_PARALLEL_GROUP,
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        registry.clear()
    _GROUPS = None
