"""Checkpoints: a save killed midway leaves the previous checkpoint and the tracker intact; loading
refuses another parallel layout."""

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


def test_loading_needs_the_saved_layout(gloo_world, tmp_path):
    model, optimizer = model_and_optimizer(0)
    save_checkpoint(tmp_path, TrainingState(2, 8), model, optimizer, LAYOUT)
    other = dict(LAYOUT, expert=2)
    with pytest.raises(CheckpointError, match="saved with layout .*'expert': 1.* this job runs .*'expert': 2"):
        load_checkpoint(tmp_path, model, optimizer, other)
    assert load_checkpoint(tmp_path / "empty", model, optimizer, LAYOUT) is None
