"""The job's model without its weights: megatron-core's ``GPTModel`` at TP = PP = EP = 1 with every parameter
on the meta device (no memory; the small buffers it computes stay real), and what the model itself says of
its ``torch_dist`` checkpoint.

The checkpoint's layout is megatron-core's (and the granular layer's) own: :func:`checkpoint_layout` runs the
sharded state dict the main job's ``save_checkpoint`` makes (``weights_only``) through megatron-core's
``save_preprocess`` (factories applied, sharding validated, the common state split off), so the stored keys,
global shapes, chunks, objects and common state are exactly those of a save by the job, whatever megatron-core
does with a tensor (layer-stacked keys, per-layer keys, the SwiGLU halves, TE-style norm names). Each chunk
records which view of its local (TP = 1) tensor it is, so a conversion can fill or read it one tensor at a
time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode


class _ParametersOnMeta(TorchFunctionMode):
    """``torch.empty`` (how megatron-core and the plugin allocate parameters, an explicit ``device`` included)
    on the meta device; everything else as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.empty:
            kwargs = {**(kwargs or {}), "device": "meta"}
        return func(*args, **(kwargs or {}))


def skeleton(args: argparse.Namespace, padded_vocab_size: int):
    """The job's one-process ``GPTModel`` for ``args``, its parameters on the meta device. Call inside
    :func:`granular_moe.hf.megatron_io.single_process_world`."""
    from granular_moe.hf.megatron_io import build_model

    with _ParametersOnMeta():
        model = build_model(args, padded_vocab_size)
    allocated = [name for name, param in model.named_parameters() if not param.is_meta]
    if allocated:
        raise RuntimeError(f"the model skeleton allocated parameters {allocated[:4]}: they are created otherwise "
                           "than with torch.empty")
    return model


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a local tensor: its place in the checkpoint's global tensor ``key`` (offsets and
    sizes, prepended axes included) and the view of the local tensor it holds (size, stride, storage offset)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    view: tuple[tuple[int, ...], tuple[int, ...], int]

    def of(self, local: torch.Tensor) -> torch.Tensor:
        """The chunk of ``local`` (a contiguous tensor of the local shape), shaped as stored (a view)."""
        size, stride, offset = self.view
        return local.as_strided(size, stride, local.storage_offset() + offset).view(self.sizes)


@dataclass(frozen=True)
class LocalTensor:
    """A tensor of the one-process model's state dict and its chunks in the checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Layout:
    """What a ``weights_only`` save of the model writes: its tensors (by state-dict name), its other objects
    (``(checkpoint key, serialised bytes)``, the extra states and the common state) and the content metadata."""

    tensors: dict[str, LocalTensor]
    objects: tuple[tuple[str, bytes], ...]


def sharding_metadata(args: argparse.Namespace, stored: dict | None = None) -> dict:
    """The sharded-state-dict metadata the main job uses (the checkpoint's own ``stored`` over its defaults)."""
    from granular_moe.training.checkpoint import _sharding_metadata, with_stored

    return with_stored(_sharding_metadata(args), stored)


def checkpoint_layout(model, args: argparse.Namespace, metadata: dict) -> Layout:
    """The layout of ``model``'s ``weights_only`` checkpoint (iteration 0, as the job's ``save_checkpoint``
    writes it, ``args`` saved with it), from megatron-core's own preprocessing."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict

    from granular_moe.training.checkpoint import _serializable, sharded_state_dict

    saved_args = argparse.Namespace(**vars(args))
    saved_args.consumed_train_samples = 0
    content = sharded_state_dict(SimpleNamespace(modules=[model]), saved_args, metadata, optimizer=False, rng=False)
    content["content_metadata"] = _serializable(metadata)  # what dist_checkpointing.save adds
    sharded, common = save_preprocess(content)
    params = model.state_dict(keep_vars=True)
    tensors, objects = {}, []
    for name, entry in sharded.pop("model").items():
        values = list(nested_values(entry)) if isinstance(entry, (dict, list)) else [entry]
        chunks = tuple(_chunk(value, params[name]) for value in values if isinstance(value, ShardedTensor))
        if chunks:
            base = params[name]
            tensors[name] = LocalTensor(name, tuple(base.shape), base.dtype, chunks)
        for value in values:
            if isinstance(value, ShardedObject):
                objects.append(value)
    leftover = [value for value in nested_values(sharded)]
    if leftover:
        raise RuntimeError(f"the checkpoint holds sharded entries outside the model: {leftover[:4]}")
    objects.append(ShardedObject("common_state", common, (1,), (0,), replica_id=0))
    serialised = mcore_to_pyt_state_dict({obj.unique_key: [obj] for obj in objects})
    return Layout(tensors, tuple((key, value.getvalue()) for key, value in serialised.items()))


def _chunk(sharded, base: torch.Tensor) -> Chunk:
    if sharded.flattened_range is not None:
        raise RuntimeError(f"{sharded.key}: a flattened chunk; the model's weights are stored whole")
    data = sharded.data
    view = (tuple(data.shape), tuple(data.stride()), data.storage_offset() - base.storage_offset())
    sizes = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
    return Chunk(sharded.key, tuple(sharded.global_offset), sizes, tuple(sharded.global_shape), data.dtype, view)

