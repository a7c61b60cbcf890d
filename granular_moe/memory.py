"""What a forward keeps for its backward, counted with torch's saved-tensor hooks.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves, those of torch's own ops and those
custom ``autograd.Function``\\ s pass to ``ctx.save_for_backward``. :class:`SavedForBackward` counts each storage
once (views of one tensor, or one tensor saved by several ops, are one allocation) and leaves out the storages
of the tensors it is told to exclude (parameters, the layer's input: memory a training step holds anyway).
Tensors stashed on ``ctx`` as plain attributes escape the hooks: this package's ops save through
``save_for_backward`` only, so that what they keep is what this counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class SavedTensor:
    """One storage kept for the backward: the shape and dtype of the first tensor saved on it."""

    shape: tuple
    dtype: torch.dtype
    nbytes: int


def _storage_key(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.nbytes()


class SavedForBackward:
    """Context manager: the storages saved for backward while it is open, deduplicated.

    ``exclude``: tensors (e.g. ``module.parameters()`` and the input) whose storages are not counted.
    After the block, :attr:`nbytes` is the total and :attr:`tensors` the storages counted, largest first.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta" and tensor.untyped_storage().nbytes() > 0:
            key = _storage_key(tensor)
            if key not in self._excluded and key not in self._seen:
                # A reference to the storage keeps its address from being reused by a later tensor.
                self._seen[key] = (SavedTensor(tuple(tensor.shape), tensor.dtype, key[2]), tensor.untyped_storage())
        return tensor

    def __enter__(self) -> "SavedForBackward":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def tensors(self) -> list:
        return sorted((saved for saved, _ in self._seen.values()), key=lambda saved: -saved.nbytes)

    @property
    def nbytes(self) -> int:
        return sum(saved.nbytes for saved, _ in self._seen.values())
