"""Checkpoints in Megatron-LM's torch_dist format: a save killed at any point leaves the last complete
checkpoint and the tracker as they were (for a new iteration and for a re-save of one); a damaged checkpoint
is named with what is wrong; one of another model is refused naming each differing flag's two values."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from granular_moe.training import checkpoint
from granular_moe.training.arguments import parse_args
from granular_moe.training.checkpoint import (
    TRACKER,
    CheckpointError,
    TrainingState,
    find_checkpoint,
    load_checkpoint,
    require_checkpoint,
    save_checkpoint,
)

VOCAB = 64
FLAGS = ["--num-layers", "2", "--hidden-size", "16", "--ffn-hidden-size", "64", "--num-attention-heads", "2",
         "--seq-length", "8",
         "--num-experts", "2", "--moe-router-topk", "1", "--moe-granularity", "2", "--micro-batch-size", "2",
         "--train-iters", "10", "--use-distributed-optimizer"]


def engine(flags=(), seed=0):
    from megatron.core import tensor_parallel

    from granular_moe.training.engine import build_engine
    from granular_moe.training.model import padded_vocab_size, transformer_config_from_args

    args = parse_args(FLAGS + list(flags))
    args.global_batch_size = args.micro_batch_size
    args.padded_vocab_size = padded_vocab_size(VOCAB, 1)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the experts' stream too: no state from earlier tests
    return args, build_engine(args, transformer_config_from_args(args), VOCAB)


def trained(flags=(), seed=0, steps=1):
    from granular_moe.training.engine import train_step

    args, built = engine(flags, seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (2, 9), generator=generator)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 8),
                 "position_ids": torch.arange(8).expand(2, 8)}
        train_step(built, [batch], torch.device("cpu"))
    return args, built


def weights(built):
    return {name: p.detach().clone() for name, p in built.modules[0].named_parameters()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_round_trip_restores_weights_optimizer_and_schedule(gloo_world, tmp_path):
    args, built = trained(steps=2)
    save_checkpoint(tmp_path, TrainingState(2, 4), built, args)
    assert (tmp_path / TRACKER).read_text() == "2"
    assert {".metadata", "metadata.json"} <= {p.name for p in (tmp_path / "iter_0000002").iterdir()}
    fresh_args, fresh = engine(seed=1)
    state, notes = load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)
    assert (state, notes) == (TrainingState(2, 4), [])
    assert_same_weights(weights(fresh), weights(built))
    assert fresh.scheduler.num_steps == built.scheduler.num_steps == 4
    assert fresh.optimizer.param_groups[0]["lr"] == built.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("kill_point", ["writing shards", "before the rename", "before the tracker"])
def test_a_save_of_a_new_iteration_killed_at_any_point_leaves_the_last_checkpoint(
        gloo_world, tmp_path, monkeypatch, kill_point):
    args, built = trained()
    save_checkpoint(tmp_path, TrainingState(4, 64), built, args)
    saved = weights(built)
    trained_further_args, further = trained(seed=3)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt(f"killed {kill_point}")

    if kill_point == "writing shards":
        from megatron.core import dist_checkpointing

        def killed_writing(state, directory, **kwargs):
            (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
            killed()

        monkeypatch.setattr(dist_checkpointing, "save", killed_writing)
    elif kill_point == "before the rename":
        real_replace = checkpoint.os.replace

        def replace(source, target):
            if str(source).endswith("iter_0000008.tmp"):
                killed()
            real_replace(source, target)

        monkeypatch.setattr(checkpoint.os, "replace", replace)
    else:
        monkeypatch.setattr(checkpoint, "_write_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, TrainingState(8, 128), further, trained_further_args)
    monkeypatch.undo()
    assert (tmp_path / TRACKER).read_text() == "4"
    assert find_checkpoint(tmp_path).name == "iter_0000004"
    fresh_args, fresh = engine(seed=1)
    assert load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)[0] == TrainingState(4, 64)
    assert_same_weights(weights(fresh), saved)

    save_checkpoint(tmp_path, TrainingState(8, 128), further, trained_further_args)  # the resumed run saves 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000008", TRACKER]
    assert load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)[0] == TrainingState(8, 128)
    assert_same_weights(weights(fresh), weights(further))


def test_a_save_replaces_a_checkpoint_of_the_same_iteration(gloo_world, tmp_path, monkeypatch):
    """An earlier run's iter_N in the same --save is replaced, not kept in place of this run's; a kill while
    replacing it leaves the earlier one whole, and the next save puts it back."""
    earlier_args, earlier = trained(seed=0)
    save_checkpoint(tmp_path, TrainingState(4, 64), earlier, earlier_args)
    args, built = trained(seed=1)
    real_replace = checkpoint.os.replace

    def killed_at_the_swap(source, target):
        if str(source).endswith("iter_0000004.tmp"):
            raise KeyboardInterrupt("killed while replacing iter_0000004")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", killed_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, TrainingState(4, 64), built, args)
    monkeypatch.undo()
    assert find_checkpoint(tmp_path).name == "iter_0000004.replaced"
    fresh_args, fresh = engine(seed=2)
    load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)
    assert_same_weights(weights(fresh), weights(earlier))
    save_checkpoint(tmp_path, TrainingState(2, 32), built, args)  # the next save puts it back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000004", TRACKER]
    shutil.rmtree(tmp_path / "iter_0000002")
    save_checkpoint(tmp_path, TrainingState(4, 64), built, args)
    load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)
    assert_same_weights(weights(fresh), weights(built))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d.parent / TRACKER).write_text("abc"), r"latest_checkpointed_iteration.txt: the tracker holds 'abc'"),
    (lambda d: (d.parent / TRACKER).write_text("9"), r"names iteration 9, but .*iter_0000009 does not exist"),
    (lambda d: (d / "metadata.json").write_text('{"sharded_ba'), r"iter_0000002/metadata.json is damaged"),
    (lambda d: (d / ".metadata").unlink(), r"iter_0000002: .metadata is missing"),
    (lambda d: [shard.write_bytes(shard.read_bytes()[:100]) for shard in d.glob("*.distcp")],
     r"iter_0000002/__0_0\.distcp: its entry '.*' is damaged"),  # named by file, even unverified
    (lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:50]),
     r"iter_0000002/\.metadata is damaged \(not a torch.distributed.checkpoint index"),
])
def test_a_damaged_checkpoint_is_named_with_what_is_wrong(gloo_world, tmp_path, damage, message):
    args, built = trained()
    directory = save_checkpoint(tmp_path, TrainingState(2, 4), built, args)
    damage(directory)
    fresh_args, fresh = engine(seed=1)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)


def test_another_model_is_refused_naming_each_flag_saved_and_requested(gloo_world, tmp_path):
    args, built = trained()
    save_checkpoint(tmp_path, TrainingState(2, 4), built, args)
    other_args, other = engine(["--moe-granularity", "1", "--hidden-size", "32"])
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(find_checkpoint(tmp_path), other, other_args)
    lines = str(refused.value).splitlines()
    assert "holds another model than this job builds" in lines[0]
    assert sorted(lines[1:]) == ["  - --hidden-size: saved 16, this job 32",
                                 "  - --moe-granularity: saved 2, this job 1"]
    # the flags as the user gave them, not the fine-grained values (4 experts, top-2) the layer holds
    other_args, other = engine(["--num-experts", "4", "--moe-granularity", "1"])
    with pytest.raises(CheckpointError, match=re.escape("--num-experts: saved 2, this job 4")):
        load_checkpoint(find_checkpoint(tmp_path), other, other_args)
    # what changes the tensors' shapes besides the sizes: q/k norms, a shared expert
    other_args, other = engine(["--qk-layernorm", "--moe-shared-expert-intermediate-size", "8"])
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(find_checkpoint(tmp_path), other, other_args)
    assert sorted(str(refused.value).splitlines()[1:]) == [
        "  - --moe-shared-expert-intermediate-size: saved None, this job 8",
        "  - --qk-layernorm: saved False, this job True"]
    # the attention variants of the Hugging Face families: q/k/v biases, partial rope, one norm across heads
    other_args, other = engine(["--add-qkv-bias", "--rotary-percent", "0.5", "--qk-layernorm",
                                "--qk-layernorm-across-heads", "--normalization", "RMSNorm",
                                "--position-embedding-type", "rope"])
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(find_checkpoint(tmp_path), other, other_args)
    assert sorted(str(refused.value).splitlines()[1:]) == [
        "  - --add-qkv-bias: saved False, this job True",
        "  - --normalization: saved 'LayerNorm', this job 'RMSNorm'",
        "  - --position-embedding-type: saved 'learned_absolute', this job 'rope'",
        "  - --qk-layernorm-across-heads: saved False, this job True",
        "  - --qk-layernorm: saved False, this job True",
        "  - --rotary-percent: saved 1.0, this job 0.5"]


def test_a_load_that_names_no_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"--load .*typo: no such folder \(a typo\? to start from scratch"):
        require_checkpoint(tmp_path / "typo")
    with pytest.raises(CheckpointError, match=r"holds no checkpoint .*--resume-if-exists"):
        require_checkpoint(tmp_path)
    assert find_checkpoint(tmp_path) is None


def test_saved_metadata_is_megatron_lms(gloo_world, tmp_path):
    args, built = trained()
    directory = save_checkpoint(tmp_path, TrainingState(2, 4), built, args)
    assert json.loads((directory / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(directory))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 2
    assert common["args"].consumed_train_samples == 4 and common["args"].num_layers == 2
    content = dist_checkpointing.load_content_metadata(str(directory))
    assert content["distrib_optim_sharding_type"] == "fully_reshardable"


def test_the_expert_bias_and_the_shared_expert_round_trip(gloo_world, tmp_path):
    routing = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
               "--moe-router-bias-update-rate", "0.1", "--moe-shared-expert-intermediate-size", "24",
               "--moe-shared-expert-gate"]
    args, built = trained(routing, steps=2)
    biases = {n: b.clone() for n, b in built.modules[0].named_buffers() if n.endswith("expert_bias")}
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases.values())  # updated by the steps
    assert any("shared_experts.linear_fc1" in name for name in weights(built))
    save_checkpoint(tmp_path, TrainingState(2, 4), built, args)
    fresh_args, fresh = engine(routing, seed=1)
    load_checkpoint(find_checkpoint(tmp_path), fresh, fresh_args)
    assert_same_weights(weights(fresh), weights(built))
    for name, bias in fresh.modules[0].named_buffers():
        if name.endswith("expert_bias"):
            assert bias.dtype == torch.float32
            torch.testing.assert_close(bias, biases[name], rtol=0, atol=0)
