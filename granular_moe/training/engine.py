"""The main job's engine: megatron-core's own training parts, assembled as Megatron-LM assembles them.

- model chunks: one ``GPTModel`` per virtual pipeline stage of this rank (:mod:`granular_moe.training.model`),
  in bf16 inside megatron-core's ``Float16Module`` with ``--bf16``;
- ``megatron.core.distributed.DistributedDataParallel`` around each chunk (bucketed gradient reduction,
  overlapped with the backward with ``--overlap-grad-reduce``; expert parameters reduced over the
  expert-data-parallel group) and ``finalize_model_grads`` after the backward;
- ``get_megatron_optimizer``: Adam with Megatron's weight-decay groups (none on biases and 1-D parameters) and
  gradient clipping; ``--use-distributed-optimizer`` shards the optimizer state over data-parallel ranks
  (expert parameters over expert-data-parallel ranks); with ``--bf16`` it keeps fp32 main parameters;
- ``OptimizerParamScheduler``, stepped by the global batch after each successful update, as Megatron-LM does:
  iteration ``i`` (from 0) trains at the learning rate of step ``i``, so the first warmup step runs at
  ``--lr-warmup-init``;
- ``get_forward_backward_func``: no pipelining, 1F1B, or interleaved 1F1B with
  ``--num-layers-per-virtual-pipeline-stage``.

The loss is Megatron-LM's: each micro-batch's masked token sum over its token count, averaged over the
micro-batches (the schedules divide), reported as the step's token-weighted mean over the global batch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from granular_moe.megatron.optimizer_fixes import apply_optimizer_fixes
from granular_moe.router import check_router_logits
from granular_moe.training.model import build_model_chunks


@dataclass
class Engine:
    """The model chunks of this rank (DDP-wrapped), their optimizer and learning-rate scheduler."""

    chunks: list  # DistributedDataParallel, one per virtual pipeline stage
    optimizer: object
    scheduler: OptimizerParamScheduler
    config: object  # the TransformerConfig the schedules read
    seq_length: int
    micro_batch_size: int
    num_micro_batches: int
    global_batch_size: int
    check_for_nan: bool = True  # --check-for-nan-in-loss-and-grad: the routers' logits too, once per step

    @property
    def modules(self) -> list:
        """The model chunks without their DDP and Float16Module wrappers (what checkpoints hold)."""
        return [unwrap(chunk) for chunk in self.chunks]


def unwrap(chunk):
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def ddp_config(args: argparse.Namespace) -> DistributedDataParallelConfig:
    """Megatron-LM's DDP settings for these flags: bf16 reduces gradients in fp32; buckets of
    ``--ddp-bucket-size`` (default max(40M, 1M x DP) elements) when the reduction overlaps the backward, one
    bucket otherwise."""
    bucket_size = None
    if args.overlap_grad_reduce:
        data_parallel = parallel_state.get_data_parallel_world_size()
        bucket_size = args.ddp_bucket_size or max(40_000_000, 1_000_000 * data_parallel)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=args.check_for_nan_in_loss_and_grad,
        bucket_size=bucket_size,
    )


def _wrap(config, settings: DistributedDataParallelConfig, chunk, index: int) -> DistributedDataParallel:
    """One chunk in megatron-core's DDP, as Megatron-LM wraps it: buckets on the first chunk only, and the
    distributed optimizer's parameter layout computed up front."""
    extra = {}
    if settings.use_distributed_optimizer:
        bucket_size = None if index > 0 or parallel_state.get_pipeline_model_parallel_rank() > 0 else (
            settings.bucket_size)
        extra["full_param_layout"] = DistributedOptimizer.compute_full_param_layout(
            [p for p in chunk.parameters() if p.requires_grad], bucket_size,
            parallel_state.get_data_parallel_world_size(with_context_parallel=True), settings,
            expert_data_parallel_world_size=parallel_state.get_expert_data_parallel_world_size(),
        )
    return DistributedDataParallel(config, settings, chunk, disable_bucketing=index > 0, **extra)


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )


def build_scheduler(optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """Megatron-LM's ``get_optimizer_param_scheduler`` for iteration-based training: steps count samples."""
    batch = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * batch,
        lr_decay_steps=args.lr_decay_iters * batch,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * batch,
        wd_incr_style="constant",
    )


def build_engine(args: argparse.Namespace, config, vocab_size: int, chunks: Optional[list] = None) -> Engine:
    """This rank's model chunks (``chunks``, else built from the flags), wrapped and given an optimizer."""
    apply_optimizer_fixes()
    if chunks is None:
        chunks = build_model_chunks(args, config, vocab_size)
    if args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    settings = ddp_config(args)
    chunks = [_wrap(config, settings, chunk, index) for index, chunk in enumerate(chunks)]
    optimizer_settings = optimizer_config(args)
    optimizer = get_megatron_optimizer(
        optimizer_settings, chunks, config_overrides=get_standard_config_overrides(optimizer_settings)
    )
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if args.check_for_nan_in_loss_and_grad:
        config.finalize_model_grads_func = partial(_check_routers_then_finalize, [unwrap(c) for c in chunks], config)
    if args.overlap_grad_reduce:
        sync = [chunk.no_sync for chunk in chunks]
        config.no_sync_func = sync[0] if len(sync) == 1 else sync
    if args.overlap_param_gather:
        param_sync = [chunk.start_param_sync for chunk in chunks]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    data_parallel = parallel_state.get_data_parallel_world_size()
    return Engine(
        chunks=chunks,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, args),
        config=config,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        num_micro_batches=args.global_batch_size // (args.micro_batch_size * data_parallel),
        global_batch_size=args.global_batch_size,
        check_for_nan=args.check_for_nan_in_loss_and_grad,
    )


def _check_routers_then_finalize(modules: list, config, *args, **kwargs):
    """The schedules' ``finalize_model_grads`` after the step's backward, preceded by the routers' NaN/Inf
    check (:func:`~granular_moe.router.check_router_logits`), so a diverged router is named before
    megatron-core's own gradient check finds the NaN it spread."""
    device = next(modules[0].parameters()).device
    check_router_logits(modules, config.num_layers, device)
    return finalize_model_grads(*args, **kwargs)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's GPT loss: the masked token sum, its token count (the schedules divide by it and by the
    number of micro-batches) and both for reporting."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.detach().float()])}


def _forward_step(causal_mask: torch.Tensor, device: torch.device, data_iterator: Iterator, model):
    batch = {name: tensor.to(device, non_blocking=True) for name, tensor in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], causal_mask, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def run_step(engine: Engine, micro_batches: list, device: torch.device, forward_only: bool = False) -> float:
    """Forward (and backward) over a step's micro-batches on this rank's chunks: the step's loss, the
    token-weighted mean over the global batch, on every rank."""
    causal_mask = torch.ones(1, 1, engine.seq_length, engine.seq_length, dtype=torch.bool, device=device).triu(1)
    # every chunk reads the same micro-batches (each stage takes what it needs from them)
    iterators = [iter(micro_batches) for _ in engine.chunks]
    forward_backward = get_forward_backward_func()
    reported = forward_backward(
        forward_step_func=partial(_forward_step, causal_mask, device),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=engine.chunks,
        num_microbatches=len(micro_batches),
        seq_length=engine.seq_length,
        micro_batch_size=engine.micro_batch_size,
        forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for entry in reported:
            totals += entry["lm loss"].double()
    # the last stage's sums, over data-parallel replicas, on every rank
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return float(totals[0] / totals[1].clamp_min(1))


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    learning_rate: float
    updated: bool


def train_step(engine: Engine, micro_batches: list, device: torch.device) -> StepResult:
    """One optimizer step, as Megatron-LM's ``train_step`` takes it."""
    for chunk in engine.chunks:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    learning_rate = engine.optimizer.param_groups[0]["lr"]
    loss = run_step(engine, micro_batches, device)
    updated, grad_norm, _ = engine.optimizer.step()
    if updated:
        engine.scheduler.step(increment=engine.global_batch_size)
    return StepResult(loss, float(grad_norm) if grad_norm is not None else float("nan"), learning_rate, updated)


def evaluate(engine: Engine, micro_batches_per_step: list, device: torch.device) -> float:
    """Mean validation loss over the given steps' micro-batches, without gradients."""
    for chunk in engine.chunks:
        chunk.eval()
    with torch.no_grad():
        losses = [run_step(engine, micro, device, forward_only=True) for micro in micro_batches_per_step]
    if engine.check_for_nan:
        check_router_logits(engine.modules, engine.config.num_layers, device)
    for chunk in engine.chunks:
        chunk.train()
    return sum(losses) / len(losses)


def memory_report(engine: Engine) -> dict:
    """Bytes this rank holds in parameters, gradient buffers and optimizer state (from the tensors)."""
    parameters = {id(p): p for chunk in engine.chunks for p in chunk.parameters()}
    gradients = {}
    for chunk in engine.chunks:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            gradients[id(buffer.grad_data)] = buffer.grad_data
    state = {}
    for optimizer in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        for group_state in optimizer.optimizer.state.values():
            for value in group_state.values():
                if torch.is_tensor(value):
                    state[id(value)] = value
        for main in getattr(optimizer, "shard_fp32_from_float16_groups", []) or []:
            for tensor in main:
                state[id(tensor)] = tensor

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors.values())

    return {"parameters": size(parameters), "gradients": size(gradients), "optimizer_state": size(state)}

