"""Checkpoints: a save killed midway leaves the previous checkpoint and the tracker intact; a save replaces
an earlier run's checkpoint of the same iteration safely; loading refuses another parallel layout."""

import shutil

import pytest
import torch

from granular_moe.training import checkpoint
from granular_moe.training.checkpoint import (
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

LAYOUT = {"world_size": 1, "tensor": 1, "pipeline": 1, "expert": 1}


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_save_killed_midway_leaves_the_last_checkpoint(gloo_world, tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer(0)
    save_checkpoint(tmp_path, TrainingState(4, 64), model, optimizer, LAYOUT)
    saved_weight = model.weight.detach().clone()

    def dies_midway(obj, path):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    model.weight.data.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, TrainingState(8, 128), model, optimizer, LAYOUT)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert latest_checkpoint(tmp_path).name == "iter_0000004"
    assert (tmp_path / "iter_0000008.tmp").exists() and not (tmp_path / "iter_0000008").exists()

    fresh, fresh_optimizer = model_and_optimizer(1)
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, LAYOUT) == TrainingState(4, 64)
    torch.testing.assert_close(fresh.weight, saved_weight)

    monkeypatch.undo()
    save_checkpoint(tmp_path, TrainingState(8, 128), model, optimizer, LAYOUT)
    assert not (tmp_path / "iter_0000008.tmp").exists()
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, LAYOUT) == TrainingState(8, 128)
    torch.testing.assert_close(fresh.weight, model.weight)


def test_a_save_replaces_a_checkpoint_of_the_same_iteration(gloo_world, tmp_path, monkeypatch):
    """An earlier run's iter_N in the same --save is replaced, not kept in place of this run's; a kill while
    replacing it leaves the earlier one whole, and a kill before the tracker is written costs no checkpoint."""
    earlier, earlier_optimizer = model_and_optimizer(0)
    save_checkpoint(tmp_path, TrainingState(4, 64), earlier, earlier_optimizer, LAYOUT)
    model, optimizer = model_and_optimizer(1)
    fresh, fresh_optimizer = model_and_optimizer(2)

    real_replace = checkpoint.os.replace

    def killed_at_the_swap(source, target):
        if str(source).endswith(".tmp") and "iter_" in str(source):
            raise KeyboardInterrupt("killed while replacing iter_0000004")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", killed_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, TrainingState(4, 64), model, optimizer, LAYOUT)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "iter_0000004.replaced"
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, LAYOUT) == TrainingState(4, 64)
    torch.testing.assert_close(fresh.weight, earlier.weight)
    save_checkpoint(tmp_path, TrainingState(2, 32), model, optimizer, LAYOUT)  # the next save puts it back
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    shutil.rmtree(tmp_path / "iter_0000002")

    save_checkpoint(tmp_path, TrainingState(4, 64), model, optimizer, LAYOUT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    load_checkpoint(tmp_path, fresh, fresh_optimizer, LAYOUT)
    torch.testing.assert_close(fresh.weight, model.weight)

    def killed_before_the_tracker(path, text):
        raise KeyboardInterrupt("killed before the tracker names the new checkpoint")

    monkeypatch.setattr(checkpoint, "_write_atomically", killed_before_the_tracker)
    with pytest.raises(KeyboardInterrupt):  # iter_0000008 is in place, the tracker still says 4
        save_checkpoint(tmp_path, TrainingState(8, 128), model, optimizer, LAYOUT)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "iter_0000004"
    save_checkpoint(tmp_path, TrainingState(8, 128), model, optimizer, LAYOUT)  # the resumed run saves 8 again
    assert latest_checkpoint(tmp_path).name == "iter_0000008"


def test_loading_needs_the_saved_layout(gloo_world, tmp_path):
    model, optimizer = model_and_optimizer(0)
    save_checkpoint(tmp_path, TrainingState(2, 8), model, optimizer, LAYOUT)
    other = dict(LAYOUT, expert=2)
    with pytest.raises(CheckpointError, match="saved with layout .*'expert': 1.* this job runs .*'expert': 2"):
        load_checkpoint(tmp_path, model, optimizer, other)
    assert load_checkpoint(tmp_path / "empty", model, optimizer, LAYOUT) is None
