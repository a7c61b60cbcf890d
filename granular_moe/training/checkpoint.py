"""Checkpoints of the main job: every rank writes its own shard (model, optimizer, RNG states) under
``<save>/iter_NNNNNNN/``, and Megatron-LM's tracker file ``latest_checkpointed_iteration.txt`` names the
newest complete one.

A save is atomic: shards go to ``iter_NNNNNNN.tmp/``, which rank 0 renames into place once every rank has
written, and only then is the tracker replaced (write, fsync, rename). A save killed at any point leaves
the previous checkpoint and the tracker untouched. ``--save`` must be a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import get_cuda_rng_tracker

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this job (missing, or saved with another layout)."""


@dataclass(frozen=True)
class TrainingState:
    """Where training stands: what ``--load`` resumes from."""

    iteration: int  # iterations completed
    consumed_samples: int  # training samples consumed over all data-parallel ranks


def _shard_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _sync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk, so a crash of the machine cannot lose what a tracker
    already names (a killed process loses nothing written anyway)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _replaced(directory: Path) -> Path:
    return directory.with_name(directory.name + ".replaced")


def save_checkpoint(save: Path, state: TrainingState, model, optimizer, layout: dict) -> Path:
    """Write this rank's shard of the checkpoint at ``state.iteration``; collective over all ranks.

    The shards go to ``iter_N.tmp``, which becomes ``iter_N`` once complete, then the tracker names it. A
    checkpoint already at ``iter_N`` (an earlier run into the same ``--save``) is replaced, as Megatron does;
    until the new one is in place the old one stays whole, as ``iter_N`` or ``iter_N.replaced``.
    """
    save = Path(save)
    final = save / f"iter_{state.iteration:07d}"
    staging = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        for partial in save.glob("iter_*.tmp"):  # left by killed saves
            shutil.rmtree(partial)
        for moved in save.glob("iter_*.replaced"):  # left by a save killed while replacing a checkpoint
            original = moved.with_suffix("")
            if original.exists():
                shutil.rmtree(moved)
            else:
                os.replace(moved, original)
        staging.mkdir()
    dist.barrier()
    shard = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_states()}
    torch.save(shard, staging / _shard_name(rank))
    _sync(staging / _shard_name(rank))
    dist.barrier()
    if rank == 0:
        metadata = {"state": asdict(state), "layout": layout}
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=1))
        _sync(staging / "metadata.json")
        _sync(staging)
        if final.exists():  # no iter_N.replaced is left at this point: tidied above
            os.replace(final, _replaced(final))
        os.replace(staging, final)
        _sync(save)
        _write_atomically(save / TRACKER, str(state.iteration))
        if _replaced(final).exists():
            shutil.rmtree(_replaced(final))
    dist.barrier()
    return final


def latest_checkpoint(load: Path) -> Optional[Path]:
    """The checkpoint the tracker names under ``load`` (the one a save killed while replacing it moved
    aside, if that is where it is), or None when there is none yet."""
    tracker = Path(load) / TRACKER
    if not tracker.exists():
        return None
    directory = Path(load) / f"iter_{int(tracker.read_text().strip()):07d}"
    if not directory.exists() and _replaced(directory).exists():
        return _replaced(directory)
    return directory


def load_checkpoint(load: Path, model, optimizer, layout: dict) -> Optional[TrainingState]:
    """Restore this rank's shard of the newest checkpoint under ``load``; None when there is none."""
    directory = latest_checkpoint(load)
    if directory is None:
        return None
    metadata = json.loads((directory / "metadata.json").read_text())
    if metadata["layout"] != layout:
        raise CheckpointError(
            f"--load {load}: {directory.name} was saved with layout {metadata['layout']}, this job runs "
            f"{layout}; restart with the saved layout"
        )
    shard = torch.load(directory / _shard_name(dist.get_rank()), map_location="cpu", weights_only=False)
    model.load_state_dict(shard["model"])
    optimizer.load_state_dict(shard["optimizer"])
    _restore_rng(shard["rng"])
    return TrainingState(**metadata["state"])
