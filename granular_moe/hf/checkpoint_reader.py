"""A ``torch_dist`` checkpoint read a few tensors at a time, whatever (TP, PP, EP, DP) layout saved it.

torch's distributed checkpoint reads only what a load plan asks for: here the chunks of the requested
tensors of the one-process model (:mod:`granular_moe.hf.skeleton`), each filled from every stored chunk it
overlaps (the tensor-parallel slices, the expert-parallel experts, the layers of each pipeline stage), so
nothing but the requested tensors is ever in memory. Every read goes through the project's trust boundary
(:class:`~granular_moe.training.trusted_reader.TrustedFileSystemReader`: ``.metadata`` through the
allow-list unpickler, shards inside the folder), with the metadata read once; the files are checked against
their ``integrity.json`` by the caller first.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from granular_moe.hf.skeleton import LocalTensor
from granular_moe.training.checkpoint import READ_ERRORS, CheckpointError, reading_error
from granular_moe.training.trusted_reader import TrustedFileSystemReader


class _OnceReadMetadata(TrustedFileSystemReader):
    """The trusted reader, its ``.metadata`` unpickled once (it does not change while it is read)."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _ChunkPlanner(LoadPlanner):
    """A load plan of explicit chunks: ``requests[(key, offsets)]`` is the tensor (of the chunk's sizes) to
    fill from the stored chunks of ``key`` it overlaps."""

    def __init__(self, requests: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for (key, offsets), target in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise AssertionError(f"asked for tensors only, got the object {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.requests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for axis, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(axis, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def open_checkpoint(load: Path, verify: bool, share: tuple[int, int] = (0, 1)) -> tuple[Path, object, dict]:
    """The checkpoint a conversion reads: ``(directory, the arguments it was saved with, its content
    metadata)``, from one read of its common state, after its files (``share`` of them: this rank's) are checked
    against their digests when ``verify``. ``load``: a ``--save`` folder (its newest) or one iteration folder."""
    from granular_moe.training.checkpoint import checkpoint_folder, read_saved

    directory = checkpoint_folder(load)
    if verify:
        from granular_moe.training.checkpoint_integrity import verify_checkpoint

        verify_checkpoint(directory, share=share)
    saved, stored = read_saved(directory)
    return directory, saved, stored


class CheckpointReader:
    """The one-process model's tensors (``tensors``: the layout of :func:`~granular_moe.hf.skeleton.
    checkpoint_layout`) from the checkpoint in ``directory``, a few at a time (:meth:`read`)."""

    def __init__(self, directory: Path, tensors: dict[str, LocalTensor]) -> None:
        self.directory = Path(directory)
        self.tensors = tensors
        self.reader = _OnceReadMetadata(str(self.directory))
        try:
            stored = self.reader.read_metadata().state_dict_metadata
        except READ_ERRORS as error:
            raise reading_error(error, f"{self.directory}: its .metadata cannot be read") from None
        problems = []
        for local in tensors.values():
            for chunk in local.chunks:
                found = stored.get(chunk.key)
                if not isinstance(found, TensorStorageMetadata):
                    problems.append(f"{chunk.key} (for {local.name}) is not in the checkpoint")
                elif tuple(found.size) != chunk.global_shape:
                    problems.append(f"{chunk.key}: the checkpoint holds {list(found.size)}, the model of its "
                                    f"arguments {list(chunk.global_shape)}")
        if problems:
            unique = list(dict.fromkeys(problems))
            raise CheckpointError(f"{self.directory} does not hold the model its arguments describe:\n  - "
                                  + "\n  - ".join(unique[:8]) + ("\n  - ..." if len(unique) > 8 else ""))

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (state-dict names of the one-process model), whole."""
        out, requests = {}, {}
        for name in names:
            local = self.tensors[name]
            out[name] = torch.empty(local.shape, dtype=local.dtype)
            for chunk in local.chunks:
                requests[(chunk.key, chunk.offsets)] = chunk.of(out[name])
        try:
            with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": no_dist, by design
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load({}, storage_reader=self.reader, planner=_ChunkPlanner(requests), no_dist=True)
        except READ_ERRORS as error:
            raise reading_error(error, f"{self.directory} could not be read; the checkpoint is damaged or "
                                       "incomplete") from None
        return out
