"""Checkpoints of the main job in Megatron-LM's ``torch_dist`` format (``megatron.core.dist_checkpointing``).

``<save>/iter_NNNNNNN/`` holds what Megatron-LM's ``save_checkpoint`` writes: the model chunks under
``model`` (``model0``, ``model1``, ... with virtual pipeline stages), the optimizer (the distributed
optimizer's state ``fully_reshardable``), the learning-rate scheduler, the RNG states per (PP, TP) rank, the
iteration, the arguments (with ``consumed_train_samples``) and ``checkpoint_version`` 3.0; Megatron-LM's
tracker ``latest_checkpointed_iteration.txt`` names the newest complete one. Every tensor is stored as a
shard of its global tensor (experts at their global expert index), so a checkpoint saved at one
(TP, PP, EP, DP) layout loads at another, the optimizer state included.

A save is atomic: the checkpoint is written to ``iter_N.tmp/``, which rank 0 renames into place once every
rank is done, and only then is the tracker replaced (write, fsync, rename). A save killed at any point leaves
the previous checkpoint and the tracker untouched; the next save tidies what it left. Each save records the
SHA-256 of every file in ``integrity.json`` (megatron-core's integrity manifest) before the rename, so the
tracker never names a checkpoint without it (:mod:`granular_moe.training.checkpoint_integrity` checks it).

Every read goes through :mod:`granular_moe.training.trusted_reader`: nothing in a checkpoint is unpickled but
torch's checkpoint metadata classes and plain data.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import api as dist_checkpoint_api

from granular_moe.config import GranularMoEConfigError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# Flags that fix the model's tensors: a checkpoint loads only into the same values.
ARCHITECTURE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "swiglu", "normalization",
    "position_embedding_type", "untie_embeddings_and_output_weights", "max_position_embeddings",
    "padded_vocab_size", "num_experts", "moe_granularity", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_layer_freq", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_enable_expert_bias",
    "qk_layernorm", "group_query_attention", "num_query_groups", "kv_channels", "multi_latent_attention",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "add_qkv_bias",
    "rotary_percent", "qk_layernorm_across_heads",
)


# What reading a damaged checkpoint raises: torch's CheckpointException derives from BaseException.
READ_ERRORS = (Exception, dist_checkpoint_api.CheckpointException)


class CheckpointError(GranularMoEConfigError):
    """A checkpoint that cannot be loaded into this job: missing, damaged, or of another model. The message
    names the path and what is wrong."""


@dataclass(frozen=True)
class TrainingState:
    """Where training stands: what ``--load`` resumes from."""

    iteration: int  # iterations completed
    consumed_samples: int  # training samples consumed over all data-parallel ranks


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


def _replaced(directory: Path) -> Path:
    return directory.with_name(directory.name + ".replaced")


def checkpoint_directory(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


# --------------------------------------------------------------------------- finding and checking


def find_checkpoint(load: Path) -> Optional[Path]:
    """The checkpoint the tracker names under ``load`` (the one a save killed while replacing it moved aside,
    if that is where it is), or None when ``load`` holds no tracker. A tracker that names no iteration, or an
    iteration whose folder is gone, is an error naming the file."""
    tracker = Path(load) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(
            f"{tracker}: the tracker holds {text[:40]!r}, not an iteration number (Megatron-LM writes the "
            f"iteration of the newest complete checkpoint there)"
        )
    directory = checkpoint_directory(load, int(text))
    if not directory.is_dir() and _replaced(directory).is_dir():
        return _replaced(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{tracker} names iteration {int(text)}, but {directory} does not exist")
    return directory


def require_checkpoint(load: Path, flag: str = "--load") -> Path:
    """The checkpoint under ``load``; an error naming the flag when there is none."""
    if not Path(load).exists():
        raise CheckpointError(f"{flag} {load}: no such folder (a typo? to start from scratch, drop {flag})")
    directory = find_checkpoint(load)
    if directory is None:
        raise CheckpointError(
            f"{flag} {load} holds no checkpoint (no {TRACKER}); drop {flag} to start from scratch, or pass "
            f"--resume-if-exists to start from scratch when there is none yet"
        )
    return directory


def reading_error(error: BaseException, what: str) -> CheckpointError:
    """The error to raise for a reader's failure: one of ours (a damaged or untrusted file, named) as it is,
    else ``what`` with the reader's message (torch's distributed-checkpoint errors wrap each rank's)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        error = inner[0] if isinstance(inner, tuple) else inner
    if isinstance(error, CheckpointError):
        return error
    return CheckpointError(f"{what} ({_describe(error)})")


def _read_common(directory: Path) -> dict:
    """The checkpoint's common state (arguments, iteration, ...), its files checked first."""
    from megatron.core import dist_checkpointing

    from granular_moe.training import trusted_reader

    trusted_reader.install()

    config = directory / "metadata.json"
    if not config.is_file():
        raise CheckpointError(f"{directory}: no metadata.json; not a torch_dist checkpoint, or an incomplete save")
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config} is damaged (not JSON: {error})") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{config}: sharded_backend {backend!r}; this job reads torch_dist checkpoints")
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: .metadata is missing (an incomplete or damaged checkpoint)")
    # read here first, so a damaged or untrusted index is named as such (torch's reader would log a traceback)
    trusted_reader.read_metadata_file(directory / ".metadata")
    try:
        return dist_checkpointing.load_common_state_dict(str(directory))
    except READ_ERRORS as error:
        raise reading_error(error, f"{directory}: its common state (arguments, iteration) cannot be read; the "
                                    "checkpoint is damaged") from None


def _describe(error: BaseException) -> str:
    """One line for a reader's error (torch's distributed-checkpoint errors carry each rank's traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))
        if isinstance(error, tuple):  # (exception, traceback) in some torch releases
            error = error[0]
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300] if str(error).strip() else ''}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


MLA_FLAGS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


def _as_given(args, name: str):
    """A flag's value as the user gave it (the MoE flags hold fine-grained values after parsing), or as the
    model uses it: ``--kv-channels`` unset is hidden / heads; ``--num-query-groups`` and the MLA sizes are not
    read without ``--group-query-attention`` / ``--multi-latent-attention`` (Megatron-LM fills them anyway)."""
    value = getattr(args, name, None)
    if name == "num_query_groups" and not getattr(args, "group_query_attention", False):
        return None
    if name in MLA_FLAGS and not getattr(args, "multi_latent_attention", False):
        return None
    if name == "kv_channels" and value is None and getattr(args, "num_attention_heads", None):
        return args.hidden_size // args.num_attention_heads
    granularity = getattr(args, "moe_granularity", 1) or 1
    if getattr(args, "moe_granularity_applied", False) and value is not None:
        if name in ("num_experts", "moe_router_topk"):
            return value // granularity
        if name == "moe_ffn_hidden_size":
            return value * granularity
    return value


def check_compatible(saved: argparse.Namespace, args: argparse.Namespace, directory: Path,
                     load_optimizer: bool) -> list[str]:
    """Refuse, in one message naming each differing flag's saved and requested value, a checkpoint whose
    model this job cannot hold. Returns notes on what will not be restored (another layout's RNG states)."""
    differing = [
        f"{_flag(name)}: saved {_as_given(saved, name)!r}, this job {_as_given(args, name)!r}"
        for name in ARCHITECTURE_FLAGS
        if hasattr(saved, name) and _as_given(saved, name) != _as_given(args, name)
        # an unset head width follows --hidden-size / --num-attention-heads, whose own lines say what differs
        and not (name == "kv_channels" and getattr(saved, name) is None and getattr(args, name) is None)
    ]
    if load_optimizer and getattr(saved, "use_distributed_optimizer", False) != args.use_distributed_optimizer:
        differing.append(
            f"--use-distributed-optimizer: saved {getattr(saved, 'use_distributed_optimizer', False)}, this job "
            f"{args.use_distributed_optimizer} (pass --no-load-optim to start the optimizer state afresh)"
        )
    if differing:
        raise CheckpointError(
            f"{directory} holds another model than this job builds:\n  - " + "\n  - ".join(differing)
        )
    notes = []
    layout = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    if any(getattr(saved, name, None) != getattr(args, name) for name in layout):
        notes.append("the RNG states of another (TP, PP) layout are not restored; this run seeds its own")
    return notes


# --------------------------------------------------------------------------- the state dict


def _sharding_metadata(args: argparse.Namespace) -> dict:
    """Megatron-LM's ``sharded_state_dict`` metadata: the distributed optimizer's state fully reshardable."""
    from megatron.core import parallel_state

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def _rng_state():
    """This rank's RNG states as Megatron-LM stores them: one entry per (PP, TP) rank, data-parallel
    replicas hold the same ones."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": numpy.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    sizes = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    ranks = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", [state], sizes, ranks,
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    numpy.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def _model_keys(modules: list) -> list[str]:
    return ["model"] if len(modules) == 1 else [f"model{index}" for index in range(len(modules))]


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors before a checkpoint is loaded into it: torch's Adam makes them
    at its first step, and megatron-core's loading reads their layout (and the step count) from them. One
    step at learning rate 0 on zero gradients changes no parameter; the loaded state replaces what it made."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        if torch_optimizer.state:
            continue
        rates = [group["lr"] for group in torch_optimizer.param_groups]
        for group in torch_optimizer.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        for group, rate in zip(torch_optimizer.param_groups, rates):
            group["lr"] = rate


def sharded_state_dict(engine, args: argparse.Namespace, metadata: dict, *, optimizer: bool, rng: bool,
                       loading: bool = False) -> dict:
    """The state dict Megatron-LM's ``generate_state_dict`` makes for ``--ckpt-format torch_dist``."""
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
             "num_floating_point_operations_so_far": 0}
    for key, module in zip(_model_keys(engine.modules), engine.modules):
        state[key] = module.sharded_state_dict(metadata=metadata)
    if optimizer:
        if loading:
            _materialize_optimizer_state(engine.optimizer)
        state["optimizer"] = engine.optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
        state["opt_param_scheduler"] = engine.scheduler.state_dict()
    if rng:
        state["rng_state"] = _rng_state()
    return state


# --------------------------------------------------------------------------- save and load


def _write_results_in_process() -> None:
    """Collect the checkpoint writer's results in this process. megatron-core's filesystem writer hands them
    over through a ``multiprocessing`` manager queue, a server process it spawns at the first save: for the
    synchronous saves made here the writes run in this process's threads, so a plain queue carries them, and
    no server process is left behind by a rank that is killed (it would hold the job's output pipes open and
    keep re-importing the launch script)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(save: Path, state: TrainingState, engine, args: argparse.Namespace, *,
                    weights_only: bool = False) -> Path:
    """Write the checkpoint of ``state.iteration``; collective over all ranks. ``weights_only``: the model
    and the arguments without optimizer, scheduler or RNG states (``engine`` needs only ``modules``; load it
    with ``--finetune`` or ``--no-load-optim --no-load-rng``), as converted checkpoints are.

    The checkpoint goes to ``iter_N.tmp``, which becomes ``iter_N`` once complete, then the tracker names it.
    A checkpoint already at ``iter_N`` (an earlier run into the same ``--save``) is replaced, as Megatron-LM
    does; until the new one is in place the old one stays whole, as ``iter_N`` or ``iter_N.replaced``.
    """
    from megatron.core import dist_checkpointing

    save = Path(save)
    final = checkpoint_directory(save, state.iteration)
    staging = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        tidy_leftovers(save)
        staging.mkdir()
    dist.barrier()
    saved_args = argparse.Namespace(**vars(args))
    saved_args.consumed_train_samples = state.consumed_samples
    metadata = _sharding_metadata(args)
    content = sharded_state_dict(engine, saved_args, metadata, optimizer=not weights_only, rng=not weights_only)
    content["iteration"] = state.iteration
    _write_results_in_process()
    dist_checkpointing.save(content, str(staging), content_metadata=_serializable(metadata), verify_integrity=True)
    dist.barrier()
    if rank == 0:
        for path in sorted(staging.iterdir()):
            _sync(path)
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


def tidy_leftovers(save: Path) -> None:
    """Remove what killed saves left: partial ``iter_N.tmp`` folders; a checkpoint a killed save had moved
    aside while replacing it goes back into place unless its replacement completed."""
    for partial in save.glob("iter_*.tmp"):
        shutil.rmtree(partial)
    for moved in save.glob("iter_*.replaced"):
        original = moved.with_suffix("")
        if original.exists():
            shutil.rmtree(moved)
        else:
            os.replace(moved, original)


def _serializable(metadata: dict) -> dict:
    """The metadata without its process group (Megatron-LM's ``_clean_metadata_for_serialization``)."""
    return {key: value for key, value in metadata.items() if key != "dp_cp_group"}


def with_stored(metadata: dict, stored: Optional[dict]) -> dict:
    """The sharded-state-dict ``metadata`` a load uses, with the checkpoint's own ``stored`` content metadata
    (what its save recorded of its layout) over it."""
    return {**metadata, **_serializable(stored or {})}


def read_saved(directory: Path) -> tuple[argparse.Namespace, dict]:
    """The arguments a checkpoint was saved with and its content metadata, from one read of its common
    state (its files checked on the way)."""
    from megatron.core import dist_checkpointing

    common = _read_common(Path(directory))
    saved = common.get("args")
    if saved is None:
        raise CheckpointError(f"{directory}: common.pt holds no arguments ('args')")
    return saved, dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}


def read_checkpoint(directory: Path) -> argparse.Namespace:
    """The arguments a checkpoint was saved with (its files checked on the way)."""
    return read_saved(directory)[0]


def checkpoint_folder(load: Path) -> Path:
    """One ``iter_NNNNNNN`` folder as it is, else the newest checkpoint of a ``--save`` folder."""
    load = Path(load)
    return load if (load / "metadata.json").is_file() else require_checkpoint(load)


def load_checkpoint(directory: Path, engine, args: argparse.Namespace, *, load_optimizer: bool = True,
                    load_rng: bool = True, finetune: bool = False) -> tuple[TrainingState, list[str]]:
    """Load the checkpoint in ``directory`` into this job's model (and optimizer, scheduler, RNG states);
    returns where training stands and notes on what was not restored. ``finetune``: the weights only, from
    iteration 0, as Megatron-LM's ``--finetune``. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    saved, stored = read_saved(directory)  # installs the trusted reader
    if finetune:
        load_optimizer = load_rng = False
    notes = check_compatible(saved, args, directory, load_optimizer)
    if notes:
        load_rng = False
    metadata = with_stored(_sharding_metadata(args), stored)
    request = sharded_state_dict(engine, args, metadata, optimizer=load_optimizer, rng=load_rng, loading=True)
    try:
        loaded = dist_checkpointing.load(request, str(directory))
    except READ_ERRORS as error:
        raise reading_error(error, f"{directory} could not be read; the checkpoint is damaged or incomplete") \
            from None
    for key, module in zip(_model_keys(engine.modules), engine.modules):
        module.load_state_dict(loaded[key], strict=True)
    if load_optimizer:
        engine.optimizer.load_state_dict(loaded["optimizer"])
        engine.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _restore_rng(loaded["rng_state"][0])
    if finetune:
        return TrainingState(0, 0), notes
    iteration = int(loaded["iteration"])
    return TrainingState(iteration, int(getattr(saved, "consumed_train_samples", 0))), notes
