"""Expert-parallel groups: DeepSpeed's equal megatron-core's across (world, TP, PP, EP) layouts, a
disagreement stops the start with both layouts named, and impossible sizes fail before any group exists."""

import pytest
import torch.distributed as dist

from distributed import run_distributed
from granular_moe.parallel import ParallelLayoutError
from granular_moe.parallel_layout import parallel_size_problems


def layouts_worker(rank, world_size, layouts):
    from megatron.core import parallel_state

    from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel

    found = []
    for tensor, pipeline, expert in layouts:
        groups = initialize_model_parallel(tensor, pipeline, expert)
        found.append({
            "deepspeed": (groups.expert_parallel_ranks, tuple(sorted(groups.expert_data_parallel_ranks))),
            "megatron": (
                tuple(dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())),
                tuple(sorted(dist.get_process_group_ranks(parallel_state.get_expert_data_parallel_group()))),
            ),
            "tensor": tuple(dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())),
            "ep_rank": groups.ep_rank,
        })
        destroy_model_parallel()
    return found


@pytest.mark.parametrize("world, layouts", [
    (4, [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 1), (1, 1, 4), (4, 1, 4)]),
    (8, [(2, 2, 2), (1, 2, 4), (2, 1, 4), (2, 1, 8)]),
])
def test_deepspeed_groups_equal_megatron_core_groups(world, layouts):
    results = run_distributed(layouts_worker, world, layouts)
    for index, (tensor, pipeline, expert) in enumerate(layouts):
        per_rank = [result[index] for result in results]
        for rank, found in enumerate(per_rank):
            assert found["deepspeed"] == found["megatron"], (world, tensor, pipeline, expert, rank)
            ep_group, edp_group = found["deepspeed"]
            assert len(ep_group) == expert and len(edp_group) == world // (expert * pipeline)
            assert ep_group[found["ep_rank"]] == rank
        # expert groups of a pipeline stage stay inside it (expert tensor parallel 1)
        stage = world // pipeline
        assert all(len({r // stage for r in found["deepspeed"][0] + found["deepspeed"][1]}) == 1 for found in per_rank)


def mismatch_worker(rank, world_size):
    from deepspeed.utils import groups as ds_groups

    from granular_moe import parallel

    # DeepSpeed's expert-tensor-parallel layout (TP-strided) instead of the one megatron-core uses with
    # expert tensor parallelism 1.
    original = ds_groups._create_expert_and_data_parallel
    ds_groups._create_expert_and_data_parallel = lambda ep: ds_groups._create_expert_data_and_model_parallel(
        ep, mpu=ds_groups.mpu
    )
    try:
        parallel.initialize_model_parallel(2, 1, 2)
    except ParallelLayoutError as error:
        return str(error)
    finally:
        ds_groups._create_expert_and_data_parallel = original
    return None


def test_disagreeing_groups_stop_the_start_naming_both_layouts():
    messages = run_distributed(mismatch_worker, 4)
    assert all(m is not None for m in messages)
    assert "DeepSpeed's expert groups differ from megatron-core's" in messages[0]
    # rank 0's (expert-parallel, expert-data-parallel) ranks in each layout
    assert "DeepSpeed (EP, EDP) per rank [((0, 2), (0,))," in messages[0]
    assert "megatron-core [((0, 1), (0, 2))," in messages[0]


def relayout_worker(rank, world_size):
    """Groups built for EP 2, then megatron-core alone re-initialised for EP 1."""
    from megatron.core import parallel_state

    from granular_moe import parallel

    parallel.initialize_model_parallel(expert=2)
    same = parallel.expert_groups_from_megatron()  # the same layout: the groups already built
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=1)
    try:
        parallel.expert_groups_from_megatron()
    except ParallelLayoutError as error:
        return same.expert_parallel_ranks, str(error)
    return same.expert_parallel_ranks, None


def test_groups_of_an_earlier_layout_are_not_handed_out():
    for ranks, message in run_distributed(relayout_worker, 2):
        assert ranks == (0, 1)
        assert message is not None and "call granular_moe.parallel.destroy_model_parallel()" in message


@pytest.mark.parametrize(
    "sizes, message",
    [
        (
            (8, 3, 1, 1),
            "--tensor-model-parallel-size (TP) 3 x --pipeline-model-parallel-size (PP) 1 = 3 does not divide the "
            "8 processes",
        ),
        (
            (8, 1, 2, 3),
            "--expert-model-parallel-size (EP) 3 x --pipeline-model-parallel-size (PP) 2 = 6 does not divide the 8 "
            "processes",
        ),
        ((8, 0, 1, 1), "--tensor-model-parallel-size (TP) must be >= 1, got 0"),
    ],
)
def test_impossible_sizes_are_named(sizes, message):
    """The one check of parallel sizes, shared by initialize_model_parallel and the launchers."""
    problems = parallel_size_problems(*sizes)
    assert any(message in problem for problem in problems), problems
    assert parallel_size_problems(8, 2, 2, 4, num_experts=16) == []
    assert "12 experts (--num-experts x --moe-granularity) are not divisible by" in " ".join(
        parallel_size_problems(8, 1, 1, 8, num_experts=12))
