"""The main job's model at TP = PP = EP = 1 in one gloo process: loaded whole from a ``torch_dist`` checkpoint
saved at any layout (the checkpoint reshards), or saved as a weights-only checkpoint the job loads with
``--load`` (and ``--finetune``). The conversions stream instead (:mod:`granular_moe.hf.skeleton`); this whole
model is their plain reference in the tests and the benchmark, and the one-process world they build in."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from granular_moe.training.arguments import build_parser

# Flags of the layout and of the run, reset to one fp32 process (the checkpoint reshards to it).
ONE_PROCESS = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                   sequence_parallel=False, num_layers_per_virtual_pipeline_stage=None, moe_kernels="torch",
                   hidden_dropout=0.0, attention_dropout=0.0)


@contextlib.contextmanager
def single_process_world():
    """A one-rank gloo world with megatron-core's parallel state (TP = PP = EP = 1) and the CPU shims; joins
    the one already there (tests), else makes and afterwards destroys it."""
    from megatron.core import parallel_state, tensor_parallel

    from granular_moe.megatron.cpu_shims import apply_cpu_shims

    made_world = not dist.is_initialized()
    if made_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("the Hugging Face conversion runs in one process, not inside a distributed job")
    apply_cpu_shims()
    made_state = not parallel_state.model_parallel_is_initialized()
    if made_state:
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        if made_state:
            parallel_state.destroy_model_parallel()
        if made_world:
            dist.destroy_process_group()


def one_process_args(saved: argparse.Namespace, dtype: torch.dtype | None = None) -> argparse.Namespace:
    """The checkpoint's arguments for one process: flags the checkpoint predates take their defaults, the
    layout is TP = PP = EP = 1, ``dtype`` (default: the checkpoint's) the parameters'."""
    args = argparse.Namespace(**vars(build_parser().parse_args([])))
    vars(args).update(vars(saved))
    vars(args).update(ONE_PROCESS)
    if dtype is not None:
        args.bf16 = dtype == torch.bfloat16
    return args


def build_model(args: argparse.Namespace, padded_vocab_size: int):
    """The job's ``GPTModel`` for ``args`` (one process), in evaluation mode."""
    from granular_moe.training.model import build_model_chunks, transformer_config_from_args

    args.padded_vocab_size = padded_vocab_size
    (model,) = build_model_chunks(args, transformer_config_from_args(args), padded_vocab_size)
    return model.eval()


def load_model(load: Path, dtype: torch.dtype | None = None):
    """``(args, model)``: the newest checkpoint under ``load`` (the folder ``--load`` takes, or one
    ``iter_NNNNNNN`` folder) in a one-process model. Call inside :func:`single_process_world`."""
    from granular_moe.training.checkpoint import checkpoint_folder, load_checkpoint, read_checkpoint

    directory = checkpoint_folder(load)
    saved = read_checkpoint(directory)
    args = one_process_args(saved, dtype)
    model = build_model(args, saved.padded_vocab_size)
    load_checkpoint(directory, SimpleNamespace(modules=[model]), args, finetune=True)
    return args, model


def save_model(save: Path, model, args: argparse.Namespace) -> Path:
    """Write ``model`` as iteration 0 of ``save`` (weights and arguments only; load it with ``--load SAVE
    --finetune``, or ``--no-load-optim --no-load-rng``)."""
    from granular_moe.training.checkpoint import TrainingState, save_checkpoint

    return save_checkpoint(save, TrainingState(0, 0), SimpleNamespace(modules=[model]), args, weights_only=True)


def causal_mask(length: int) -> torch.Tensor:
    return torch.ones(1, 1, length, length, dtype=torch.bool).triu(1)


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[batch, sequence, padded vocabulary]`` for ``tokens [batch, sequence]``."""
    length = tokens.shape[1]
    positions = torch.arange(length).expand_as(tokens)
    return model(tokens, positions, causal_mask(length))
