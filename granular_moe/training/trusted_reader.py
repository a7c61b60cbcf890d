"""What reading a checkpoint may unpickle: torch's distributed-checkpoint metadata classes and plain data, never
code.

A ``torch_dist`` checkpoint holds pickles in two places: ``.metadata`` (the index of every tensor and object,
which torch's ``FileSystemReader`` reads with ``pickle.load``) and the non-tensor entries of the ``.distcp``
shards (the arguments, the scheduler, the RNG states, ...; torch's load planner reads them with
``torch.load(weights_only=False)``). Either can be made to run any command when it is read. Here both are read
by :class:`TrustedFileSystemReader`, a ``FileSystemReader`` that

- unpickles ``.metadata`` with :class:`MetadataUnpickler`, which resolves only the classes of
  :data:`METADATA_GLOBALS` (torch's checkpoint metadata dataclasses, ``torch.Size``, the dtypes and layouts)
  and builds nothing else;
- loads every non-tensor entry with ``torch.load(weights_only=True)``: plain Python data, tensors, and the
  classes megatron-core registers with ``torch.serialization.add_safe_globals`` (``argparse.Namespace``,
  ``pathlib.PosixPath``, numpy arrays and dtypes, its enums and ``OptimizerConfig``);
- reads only files inside the checkpoint's folder (a ``.metadata`` naming ``../x`` is refused).

:func:`install` makes megatron-core's ``dist_checkpointing`` use it for every read (its one factory of
storage readers, and its reader of a legacy ``common.pt``), so ``load``, ``load_common_state_dict``,
``load_content_metadata`` and ``load_tensors_metadata`` are all covered. Anything else is refused with
:class:`UntrustedCheckpointError`, naming the file, the entry and the class, before it is built.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.metadata import StorageMeta

from granular_moe.training.checkpoint import CheckpointError

METADATA_FILE = ".metadata"
LEGACY_COMMON_FILE = "common.pt"

# What a .metadata file written by torch.distributed.checkpoint refers to (module, name), nothing more.
METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
       ("torch", "Size"), ("collections", "OrderedDict")]
    + [("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)]
)
_MODULES = {"torch": torch, "torch.distributed.checkpoint.metadata": dcp_metadata,
            "torch.distributed.checkpoint.planner": dcp_planner, "torch.distributed.checkpoint.filesystem":
            dcp_filesystem, "torch.serialization": torch.serialization, "collections": collections}


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file holds a pickle of something other than checkpoint metadata and plain data (it could run
    code when read): refused before anything of it is built. The message names the file and the class."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file: torch's checkpoint metadata classes and plain data only."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise UntrustedCheckpointError(
                f"{self.path}: refusing to unpickle {module}.{name}; a checkpoint's {METADATA_FILE} may hold only "
                "torch.distributed.checkpoint's metadata classes and plain data (this one could run code when "
                "read: do not load it)")
        return getattr(_MODULES[module], name)


def read_metadata_file(path: Path):
    """A ``.metadata`` file, unpickled by :class:`MetadataUnpickler`; damage is named by the file."""
    with open(path, "rb") as handle:
        try:
            return MetadataUnpickler(handle, path).load()
        except UntrustedCheckpointError:
            raise
        except Exception as error:  # a truncated or garbled pickle raises any of several types
            raise CheckpointError(f"{path} is damaged (not a torch.distributed.checkpoint index: "
                                  f"{type(error).__name__}: {error})") from None


def _reason(error: Exception) -> str:
    """The part of torch's weights-only error that says what it met (the rest is general advice)."""
    parts = [part.strip() for part in str(error).split("\n\n") if part.strip()]
    specific = [part for part in parts if not part.startswith(("Weights only load failed", "Check the documentation"))]
    return (specific or parts or [type(error).__name__])[0].splitlines()[0][:300]


def load_weights_only(value: io.BytesIO, path: Path, entry: str):
    """A non-tensor entry of a shard, loaded with ``torch.load(weights_only=True)``."""
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as error:  # what the weights-only unpickler raises for anything it refuses
        reason = _reason(error)
        refused = re.search(r"GLOBAL ([\w.]+)", reason)
        if refused is None and not re.search(r"unsupported|unrecognized|not allowed|blocked", reason, re.I):
            raise CheckpointError(f"{path}: its entry {entry!r} is damaged ({reason})") from None
        what = refused.group(1) if refused is not None else f"what it holds ({reason})"
        raise UntrustedCheckpointError(
            f"{path}: refusing to unpickle {what} in its entry {entry!r}; a checkpoint's non-tensor state may hold "
            "only plain data, tensors and the classes megatron-core registers as safe (this one could run code "
            "when read: do not load it)") from None
    except (RuntimeError, EOFError, ValueError) as error:  # not a torch.save archive at all
        raise CheckpointError(f"{path}: its entry {entry!r} is damaged ({type(error).__name__}: "
                              f"{str(error).strip()[:200]})") from None


class _WeightsOnlyPlanner:
    """A load planner as torch's, except that non-tensor entries are loaded with ``weights_only=True`` (what
    ``DefaultLoadPlanner.load_bytes`` does, but with ``weights_only=False``)."""

    def __init__(self, planner, reader: "TrustedFileSystemReader") -> None:
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        fqn = read_item.dest_index.fqn
        path = Path(self._reader.path) / self._reader.storage_data[read_item.storage_index].relative_path
        loaded = load_weights_only(value, path, fqn)
        planner = self._planner
        if getattr(planner, "flatten_state_dict", False):
            set_element(planner.original_state_dict, planner.mappings[fqn], loaded)
        else:
            planner.state_dict[fqn] = loaded


class TrustedFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` with the metadata read by :class:`MetadataUnpickler`, non-tensor entries
    loaded with ``weights_only=True`` and every file read inside the checkpoint's folder."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        metadata = read_metadata_file(Path(self._get_metadata_path(rank)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    _checked_metadata = None  # the metadata whose shard names were last checked (a reader reused for many reads)

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        if metadata is not self._checked_metadata:
            checked = set()  # entries share a few files: each name checked once
            for info in (metadata.storage_data or {}).values():
                name = info.relative_path
                if isinstance(name, str) and name in checked:
                    continue
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise UntrustedCheckpointError(
                        f"{self._get_metadata_path()}: names {name!r} as a shard; shards are files inside the "
                        "checkpoint's folder")
                checked.add(name)
            self._checked_metadata = metadata
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyPlanner(planner, self))


def _trusted_filesystem_reader(checkpoint_dir, cache_metadata: bool = False, async_strategy: str = "mcore"):
    """megatron-core's ``_get_filesystem_reader``, always giving the trusted reader (metadata caching is an
    optimisation this job does not use)."""
    return TrustedFileSystemReader(checkpoint_dir)


def _load_legacy_common(checkpoint_dir):
    """megatron-core's reader of a legacy ``common.pt``, with ``weights_only=True`` whatever torch's default."""
    path = Path(checkpoint_dir) / LEGACY_COMMON_FILE
    with open(path, "rb") as handle:
        return load_weights_only(io.BytesIO(handle.read()), path, "common state")


def install() -> None:
    """Make megatron-core's ``dist_checkpointing`` read through :class:`TrustedFileSystemReader` (idempotent)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    for module in (torch_strategy, serialization):
        module._get_filesystem_reader = _trusted_filesystem_reader
    serialization.load_common = _load_legacy_common
