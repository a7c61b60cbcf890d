"""Expert weights are saved as shards of the layer's global experts: megatron-core's distributed checkpoint
places each rank's experts at their global index, so checkpoints load at any expert-parallel size."""

import torch

from distributed import run_distributed
from granular_moe import GranularMoELayer
from granular_moe.experts import GroupedExperts
from helpers import moe_config


def test_the_expert_ids_are_not_saved_so_any_layout_loads_a_state_dict():
    """Which experts a rank holds follows from its layout, not from the checkpoint: a strict load of another
    rank's (or another layout's) expert weights needs no buffer that would tie it to the saving layout."""
    config = moe_config(4, expert_model_parallel_size=2)
    mine = GroupedExperts(config, 8, first_expert=0)
    theirs = GroupedExperts(config, 8, first_expert=8)
    assert theirs.global_expert_ids.tolist() == list(range(8, 16))
    assert sorted(theirs.state_dict()) == ["weight1", "weight2"]
    mine.load_state_dict(theirs.state_dict(), strict=True)
    assert mine.global_expert_ids.tolist() == list(range(8))
    torch.testing.assert_close(mine.weight1, theirs.weight1)


def expert_shards(rank, world_size):
    """Each rank's distributed-checkpoint view of its experts (megatron-core's ShardedTensor fields)."""
    from megatron.core import tensor_parallel

    from granular_moe.parallel import initialize_model_parallel

    initialize_model_parallel(expert=2)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    layer = GranularMoELayer(moe_config(4, expert_model_parallel_size=2), layer_number=1)
    sharded = layer.sharded_state_dict(prefix="mlp.", sharded_offsets=((0, 3, 8),))
    return {
        key: (tensor.key, tensor.global_shape, tensor.global_offset, tensor.replica_id, tensor.data.clone())
        for key, tensor in sharded.items()
        if key.startswith("mlp.experts.weight")
    }


def test_distributed_checkpoint_view_places_each_rank_at_its_global_experts(gloo_world):
    """What megatron-core's dist_checkpointing reshards by: with the layer at pipeline offset (3 of 8
    layers), the experts of EP rank r sit at offset (3, 8r, 0, 0) of a [8, 16, ...] global tensor."""
    shards = run_distributed(expert_shards, 2)
    single = GranularMoELayer(moe_config(4), layer_number=1).sharded_state_dict(
        prefix="mlp.", sharded_offsets=((0, 3, 8),)
    )
    for name, width in (("weight1", 64 // 4), ("weight2", 16)):
        key = f"mlp.experts.{name}"
        global_shape = single[key].global_shape
        assert global_shape == ((8, 16, 16, width) if name == "weight1" else (8, 16, 16, 16))
        covered = []
        for rank, shard in enumerate(shards):
            saved_key, shape, offset, replica, data = shard[key]
            assert (saved_key, shape, replica) == (key, global_shape, 0)
            assert offset == (3, 8 * rank, 0, 0) and data.shape == (8, *global_shape[2:])
            covered += range(offset[1], offset[1] + data.shape[0])
        assert covered == list(range(16))  # the two ranks tile the layer's experts exactly once
        assert single[key].global_offset == (3, 0, 0, 0) and single[key].data.shape == global_shape[1:]


def validate_with_megatron_groups_only(rank, world_size):
    """Megatron-LM's layout at EP 1: megatron-core's groups alone (data parallel 2); the sharding check
    megatron-core's distributed save runs first (the save itself needs CUDA)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.validation import determine_global_metadata, validate_sharding_integrity

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    layer = GranularMoELayer(moe_config(2), layer_number=1)
    sharded = layer.sharded_state_dict(prefix="mlp.")
    validate_sharding_integrity(determine_global_metadata(sharded)[1])
    return {key: tensor.replica_id for key, tensor in sharded.items() if key.startswith("mlp.experts.weight")}


def test_data_parallel_replicas_save_one_copy_of_the_experts():
    """Each data-parallel replica marks its copy of the experts with its expert-data-parallel rank, so
    megatron-core's checkpoint validation sees one main copy (replica 0), not two."""
    replicas = run_distributed(validate_with_megatron_groups_only, 2)
    for rank, ids in enumerate(replicas):
        assert ids == {"mlp.experts.weight1": rank, "mlp.experts.weight2": rank}


def test_cpu_initialisation_on_a_gpu_machine_gives_each_rank_its_own_experts(monkeypatch):
    """--use-cpu-initialization with CUDA present: Megatron's expert RNG stream would not reach the CPU
    generator, so each expert-parallel rank (same CPU seed) takes its slice of the whole layer's draw."""
    config = moe_config(4, expert_model_parallel_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ranks = []
    for first in (0, 8):
        torch.manual_seed(3)
        ranks.append(GroupedExperts(config, 8, first_expert=first))
    torch.manual_seed(3)
    whole = GroupedExperts(moe_config(4), 16)
    for name in ("weight1", "weight2"):
        local = [getattr(rank, name) for rank in ranks]
        assert not torch.equal(local[0], local[1])
        torch.testing.assert_close(torch.cat(local), getattr(whole, name), rtol=0, atol=0)
