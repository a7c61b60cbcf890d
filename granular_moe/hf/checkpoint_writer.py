"""A ``torch_dist`` checkpoint written a group of tensors at a time, as the main job's ``weights_only`` save
would write it.

What is stored is megatron-core's own layout (:func:`granular_moe.hf.skeleton.checkpoint_layout`: keys,
global shapes, chunks, the extra-state objects and the common state with the arguments); the bytes are
torch's distributed-checkpoint format (each chunk ``torch.save``'d at an offset of a ``.distcp`` file, its
place recorded in ``.metadata``, ``metadata.json`` and megatron-core's ``integrity.json`` beside them), so the
main job loads it with ``--load`` as it loads its own saves, at any layout. The checkpoint's files are fixed
before anything is written (one per decoder layer, one for the rest), each written whole by one worker in a
fixed order, so the folder holds the same bytes whatever the number of workers.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from granular_moe.hf.skeleton import Layout

METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class FilePlan:
    """One ``.distcp`` file: the groups of local tensors it holds (written group by group, each group's
    tensors produced together), and the objects."""

    name: str
    groups: tuple[tuple[str, ...], ...]
    objects: tuple[str, ...] = ()


def file_name(number: int) -> str:
    return f"__{number}_0.distcp"


def plan_files(layout: Layout, groups: list[tuple[Optional[int], tuple[str, ...]]]) -> list[FilePlan]:
    """The checkpoint's files: ``groups`` are ``(layer or None, local tensor names)`` in conversion order; a
    layer's groups go to that layer's file, the others (and every object) to the first."""
    by_layer: dict = {}
    for layer, names in groups:
        by_layer.setdefault(layer, []).append(tuple(names))
    layers = sorted(layer for layer in by_layer if layer is not None)
    files = [FilePlan(file_name(0), tuple(by_layer.get(None, [])), tuple(key for key, _ in layout.objects))]
    files += [FilePlan(file_name(number + 1), tuple(by_layer[layer])) for number, layer in enumerate(layers)]
    return files


def _write_items(layout: Layout) -> list[WriteItem]:
    items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key, _ in layout.objects]
    for local in layout.tensors.values():
        for chunk in local.chunks:
            items.append(WriteItem(
                index=MetadataIndex(chunk.key, torch.Size(chunk.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(chunk.offsets),
                                                                       torch.Size(chunk.sizes)),
                                            properties=TensorProperties(dtype=chunk.dtype),
                                            size=torch.Size(chunk.global_shape))))
    return items


def write_file(directory: Path, layout: Layout, plan: FilePlan,
               produce: Callable[[tuple[str, ...]], dict[str, torch.Tensor]]) -> list[tuple]:
    """Write one file: its objects, then each group's chunks (``produce(names)`` gives the group's local
    tensors). Returns ``(key, offsets, file, offset, length)`` of every entry written."""
    objects = dict(layout.objects)
    results = []
    with open(Path(directory) / plan.name, "wb") as stream:
        for key in plan.objects:
            start = stream.tell()
            stream.write(objects[key])
            results.append((key, None, plan.name, start, stream.tell() - start))
        for group in plan.groups:
            produced = produce(group)
            for name in group:
                local = layout.tensors[name]
                tensor = produced[name].to(local.dtype).contiguous()
                if tuple(tensor.shape) != local.shape:
                    raise ValueError(f"{name}: produced {list(tensor.shape)}, the model holds {list(local.shape)}")
                for chunk in local.chunks:
                    start = stream.tell()
                    torch.save(chunk.of(tensor).clone(), stream)  # the chunk's bytes only, not its base's
                    results.append((chunk.key, list(chunk.offsets), plan.name, start, stream.tell() - start))
            del produced
        stream.flush()
        os.fsync(stream.fileno())
    return results


def finish(directory: Path, layout: Layout, results: list[tuple], digests: Optional[dict[str, str]] = None) -> None:
    """``.metadata`` (torch's index of every entry: the global plan of the layout, where each entry lies),
    megatron-core's ``metadata.json``, then its ``integrity.json`` over every file (``digests``: the SHA-256 of
    the ``.distcp`` files, hashed by the workers that wrote them)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    from granular_moe.training.checkpoint_integrity import write_manifest

    items = _write_items(layout)
    _, metadata = create_default_global_save_plan([SavePlan(items)], rewrite_index_hints=False)
    metadata = Metadata(state_dict_metadata=metadata.state_dict_metadata, version=CURRENT_DCP_VERSION,
                        storage_meta=StorageMeta())
    # one string object per key and file name, whichever process reported it: pickle writes a repeated object
    # as a reference, so the bytes of .metadata would otherwise depend on who wrote which file
    keys = {key: key for key in metadata.state_dict_metadata}
    names: dict[str, str] = {}
    storage = {}
    for key, offsets, name, start, length in sorted(results, key=lambda entry: (entry[2], entry[3])):
        key, name = keys[key], names.setdefault(name, name)
        index = MetadataIndex(key) if offsets is None else MetadataIndex(key, torch.Size(offsets))
        storage[index] = _StorageInfo(name, start, length)
    expected = {item.index for item in items}
    if set(storage) != expected:
        raise RuntimeError(f"{directory}: {len(expected - set(storage))} checkpoint entries were not written")
    metadata.storage_data = storage
    with open(Path(directory) / METADATA_FILE, "wb") as stream:
        pickle.dump(metadata, stream)
        stream.flush()
        os.fsync(stream.fileno())
    save_config(CheckpointingConfig("torch_dist", 1), str(directory))
    write_manifest(directory, digests)

