"""What megatron-core 0.16's GPT model needs to run on a CPU (gloo), applied only where no GPU is present.

Two CUDA-only spots stand in the way of every model (build it with ``use_cpu_initialization=True``),
a third one of pipeline-parallel models with tied embeddings, and a fourth one of models with rotary
position embeddings or sequence parallelism:

1. ``GlobalMemoryBuffer.get_tensor`` allocates its scratch buffer on ``torch.cuda.current_device()``
   (attention's matmul buffer): the shim allocates on the CPU instead.
2. The RNG tracker (``get_cuda_rng_tracker().fork()``, used for dropout and initialisation) stores and
   swaps CUDA generator states: the shim's tracker keeps CPU generator states with the same names and
   seeds, so Megatron's own ``model_parallel_cuda_manual_seed`` works unchanged.
3. ``LanguageModule.setup_embeddings_and_output_layer`` moves the last stage's copy of the tied embedding
   to CUDA before all-reducing it from the first stage: the shim keeps it where it is.
4. ``RotaryEmbedding.get_emb`` moves its CPU ``inv_freq`` to ``torch.cuda.current_device()`` at the first
   forward (``--position-embedding-type rope``), and the sequence-parallel gathers and reduce-scatters of
   ``tensor_parallel.mappings`` and of the parallel linear layers' backward allocate their outputs there:
   for these calls the shim makes ``torch.cuda.current_device()`` name the CPU.

On a machine with a GPU :func:`apply_cpu_shims` changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator

import torch
from megatron.core import utils as megatron_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import layers as megatron_layers
from megatron.core.tensor_parallel import mappings as megatron_mappings
from megatron.core.tensor_parallel import random as megatron_random

_ORIGINAL_GET_TENSOR = megatron_utils.GlobalMemoryBuffer.get_tensor
_ORIGINAL_TRACKER = megatron_random.CudaRNGStatesTracker
_ORIGINAL_SETUP_EMBEDDINGS = LanguageModule.setup_embeddings_and_output_layer


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """``GlobalMemoryBuffer.get_tensor`` with the buffer on the CPU."""
    numel = functools.reduce(operator.mul, tensor_shape, 1)
    buffer = self.buffer.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype, requires_grad=False)
    return buffer[:numel].view(*tensor_shape)


class CpuRNGStatesTracker(_ORIGINAL_TRACKER):
    """Megatron's RNG states tracker over CPU generator states."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _while_patched(function, owner, name: str, replacement):
    """``function`` with ``owner.name`` replaced by ``replacement`` for the duration of each call (the
    patched megatron-core code runs on one thread per process)."""

    @functools.wraps(function)
    def patched(*args, **kwargs):
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        try:
            return function(*args, **kwargs)
        finally:
            setattr(owner, name, original)

    patched.cpu_shim_of = function
    return patched


def _with_cpu_current_device(function):
    """``function`` with ``torch.cuda.current_device()`` naming the CPU during each call."""
    return _while_patched(function, torch.cuda, "current_device", lambda: "cpu")


# Megatron's setup with ``Tensor.cuda`` a no-op during it.
_cpu_setup_embeddings_and_output_layer = _while_patched(
    _ORIGINAL_SETUP_EMBEDDINGS, torch.Tensor, "cuda", lambda tensor, *args, **kwargs: tensor
)


# (owner, attribute) of the megatron-core functions that allocate on torch.cuda.current_device()
_CURRENT_DEVICE_USERS = (
    (RotaryEmbedding, "get_emb"),
    (megatron_mappings, "_gather_along_first_dim"),
    (megatron_mappings, "_gather_along_last_dim"),
    (megatron_mappings, "_reduce_scatter_along_first_dim"),
    (megatron_layers.LinearWithGradAccumulationAndAsyncCommunication, "backward"),
)


def cpu_shims_applied() -> bool:
    return megatron_utils.GlobalMemoryBuffer.get_tensor is _cpu_get_tensor


def apply_cpu_shims() -> bool:
    """Apply the shims when no GPU is present; returns whether they are in place."""
    if torch.cuda.is_available():
        return False
    megatron_utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    LanguageModule.setup_embeddings_and_output_layer = _cpu_setup_embeddings_and_output_layer
    for owner, name in _CURRENT_DEVICE_USERS:
        function = getattr(owner, name)
        if not hasattr(function, "cpu_shim_of"):
            shimmed = _with_cpu_current_device(function)
            is_static = isinstance(inspect.getattr_static(owner, name), staticmethod)
            setattr(owner, name, staticmethod(shimmed) if is_static else shimmed)
    megatron_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tracker = megatron_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        # A tracker made before the shim holds CUDA states it cannot use: start a CPU one.
        megatron_random.initialize_rng_tracker(force_reset=True)
    return True
