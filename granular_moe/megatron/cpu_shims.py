"""What megatron-core 0.19 needs to run on a CPU (gloo), applied only where no GPU is present.

megatron-core's model, DDP, optimizers, pipeline schedules and distributed checkpoints reach for CUDA in a
few ways, each of which fails on a machine without a GPU. :func:`apply_cpu_shims` answers each with its CPU
equivalent; every shim replaces a call that would otherwise raise, so on a CPU-only machine it changes no
result, and on a machine with a GPU :func:`apply_cpu_shims` does nothing at all.

1. ``torch.cuda.current_device()`` (where buffers, gradient buckets, rotary tables and sequence-parallel
   gathers are allocated) names the CPU; ``torch.cuda.synchronize()`` returns at once; ``torch.cuda.Stream``,
   ``Event``, ``current_stream()`` and ``stream()`` are stand-ins that run work in order (the CPU has one
   stream); ``Tensor.cuda()`` returns the tensor where it is.
2. Allocations on a literal ``device="cuda"`` (the optimizers' overflow flags and loss scales, gradient
   clipping's norms, the schedules' token counts, distributed checkpointing's exchange buffers, the DDP
   buffer's warm-up tensor) go to the CPU: those modules see a ``torch`` whose factory functions
   (``tensor``, ``zeros``, ``empty``, ...) map a CUDA device to the CPU. Nothing else in them changes.
3. The mixed-precision and distributed optimizers sort parameters by ``param.type()`` and accept only CUDA
   tensor types, as does gradient clipping: while they are built, and while gradients are clipped, a CPU
   tensor's ``type()`` reads as its CUDA counterpart.
4. The RNG tracker (``get_cuda_rng_tracker().fork()``, used for dropout and initialisation) keeps CPU
   generator states with the same names and seeds, so Megatron's ``model_parallel_cuda_manual_seed`` works
   unchanged.
5. Activation recompute (``tensor_parallel.checkpoint``) saves and restores the CUDA generator's state beside
   the CPU one and the tracker's: on a CPU there is none, so its read gives an empty state and its write does
   nothing (the CPU generator and the tracker's states are restored as before).

Build models with ``use_cpu_initialization=True``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch
from megatron.core.tensor_parallel import random as megatron_random

_ORIGINAL_TRACKER = megatron_random.CudaRNGStatesTracker

# megatron-core modules that allocate on a literal device="cuda"
CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand", "randn")


def _on_cpu(device):
    """``device`` with CUDA mapped to the CPU."""
    if device is None:
        return None
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.device("cpu") if kind == "cuda" else device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def allocate(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return factory(*args, **kwargs)

    return allocate


class TorchOnCpu(types.ModuleType):
    """The ``torch`` module as one megatron-core module sees it on a CPU: the same, but for factory
    functions that put a CUDA device on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        return _cpu_factory(value) if name in _FACTORIES else value


class CpuStream:
    """``torch.cuda.Stream`` on a CPU: work runs in order, so waiting is immediate."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class CpuEvent:
    """``torch.cuda.Event`` on a CPU: recorded work is already done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_STREAM = CpuStream()
_CUDA_STAND_INS = {
    "current_device": lambda: torch.device("cpu"),
    "synchronize": lambda device=None: None,
    "Stream": CpuStream,
    "Event": CpuEvent,
    "current_stream": lambda device=None: _STREAM,
    "default_stream": lambda device=None: _STREAM,
    "stream": lambda stream=None: contextlib.nullcontext(),
}


def _tensor_stays(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    """``Tensor.cuda`` on a CPU: the tensor stays where it is."""
    return self


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


_ORIGINAL_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` naming a CPU tensor's CUDA counterpart (``torch.FloatTensor`` reads
    ``torch.cuda.FloatTensor``); with a ``dtype`` it converts as usual."""
    if dtype is None and not kwargs:
        name = _ORIGINAL_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
    return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)


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


def _cuda_type_readers():
    """(owner, attribute) of the megatron-core functions that check ``Tensor.type()`` for CUDA names."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return (
        (DistributedOptimizer, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),  # imported there by name
    )


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _ignore_cuda_rng_state(*args, **kwargs) -> None:
    return None


def cpu_shims_applied() -> bool:
    return torch.Tensor.cuda is _tensor_stays


def apply_cpu_shims() -> bool:
    """Apply the shims when no GPU is present; returns whether they are in place. Idempotent."""
    if torch.cuda.is_available():
        return False
    for name, stand_in in _CUDA_STAND_INS.items():
        setattr(torch.cuda, name, stand_in)
    torch.Tensor.cuda = _tensor_stays
    for module_name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(module_name)
        if not isinstance(module.torch, TorchOnCpu):
            module.torch = TorchOnCpu()
    for owner, name in _cuda_type_readers():
        function = getattr(owner, name)
        if not hasattr(function, "cpu_shim_of"):
            setattr(owner, name, _while_patched(function, torch.Tensor, "type", _cuda_type_name))
    megatron_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    megatron_random._get_cuda_rng_state = _no_cuda_rng_state
    megatron_random._set_cuda_rng_state = _ignore_cuda_rng_state
    tracker = megatron_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        # A tracker made before the shim holds CUDA states it cannot use: start a CPU one.
        megatron_random.initialize_rng_tracker(force_reset=True)
    return True
