"""The main job: pretrain a GPT with granular MoE on megatron-core.

``granular-moe pretrain [flags]``, ``python -m granular_moe.training.pretrain [flags]``, or through
``launch_scripts/pretrain_gpt_moe.sh``. Ranks come from the launcher (torchrun, SLURM, MPI; see
:func:`granular_moe.training.launch.distributed_env`); the layout is checked before any work. With GPUs:
NCCL, bf16 autocast and the fast kernels; without: gloo, fp32 and megatron-core's CPU shims.
"""

from __future__ import annotations

import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from granular_moe.config import GranularMoEConfigError
from granular_moe.megatron.cpu_shims import apply_cpu_shims
from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel
from granular_moe.training.arguments import parse_args
from granular_moe.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from granular_moe.training.data import build_data, eval_batches, train_batches
from granular_moe.training.gradients import clip_grad_norm, finalize_gradients
from granular_moe.training.launch import check_layout, distributed_env
from granular_moe.training.metrics import MetricsLog, MoELayerStatistics, plot_losses
from granular_moe.training.model import build_model, transformer_config_from_args
from granular_moe.training.optimizer import build_optimizer, learning_rate, set_learning_rate
from granular_moe.training.schedule import PipelineStage, forward_backward


def _initialize_distributed(args, world) -> torch.device:
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(
        args.distributed_backend or ("nccl" if use_cuda else "gloo"),
        init_method=world.init_method,
        rank=world.rank,
        world_size=world.world_size,
        timeout=timedelta(minutes=args.distributed_timeout_minutes),
    )
    apply_cpu_shims()
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def _reduce_loss(loss, device) -> float:
    """The step's loss (last stage, averaged over data-parallel replicas) on every rank."""
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if loss is not None:
        value += loss.double()
    dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return float(value) / parallel_state.get_data_parallel_world_size()


def _take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def evaluate(model, args, data, stage, autocast_dtype, data_parallel) -> float:
    """Mean validation loss over the ``--eval-iters`` global batches (the same ones every time)."""
    model.eval()
    batches = eval_batches(
        data.valid, args.micro_batch_size, parallel_state.get_data_parallel_rank(), data_parallel
    )
    losses = []
    for _ in range(args.eval_iters):
        micro = _take(batches, args.global_batch_size // (args.micro_batch_size * data_parallel))
        losses.append(_reduce_loss(
            forward_backward(model, micro, stage, forward_only=True, autocast_dtype=autocast_dtype), stage.device
        ))
    model.train()
    return sum(losses) / len(losses)


def pretrain(args) -> dict:
    """Train as the flags say; returns the last logged record (on every rank).

    Joins the process group already initialised by the caller, or makes (and at the end destroys) one
    from the launcher's environment.
    """
    world = distributed_env()
    layout = check_layout(args, world.world_size)
    if args.bf16 and not torch.cuda.is_available():
        raise GranularMoEConfigError("--bf16 needs a GPU; without one the job trains in fp32")
    if dist.is_initialized():
        apply_cpu_shims()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return _train(args, world, layout, device)
    device = _initialize_distributed(args, world)
    try:
        return _train(args, world, layout, device)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def _set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage for every generator, then its RNG tracker
    (tensor-parallel and expert-parallel streams)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _train(args, world, layout, device) -> dict:
    initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    )
    _set_random_seed(args.seed)
    data_parallel = parallel_state.get_data_parallel_world_size()
    args.global_batch_size = args.global_batch_size or args.micro_batch_size * data_parallel
    micro_batches_per_step = args.global_batch_size // (args.micro_batch_size * data_parallel)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None

    data = build_data(args, data_parallel, corpus_max_bytes=args.corpus_max_bytes)
    config = transformer_config_from_args(args)
    model = build_model(args, config, data.tokenizer.vocab_size)
    optimizer = build_optimizer(model, args)
    stage = PipelineStage(config, args.seq_length, args.micro_batch_size, device)
    moe_statistics = MoELayerStatistics(model)
    layout_key = {"world_size": world.world_size, "tensor": layout.tensor, "pipeline": layout.pipeline,
                  "expert": layout.expert}
    state = TrainingState(iteration=0, consumed_samples=0)
    if args.load is not None:
        state = load_checkpoint(args.load, model, optimizer, layout_key) or state
    save = Path(args.save)
    log = MetricsLog(args.log_jsonl or save / "metrics.jsonl", args.tensorboard_dir)
    tokens_per_step = args.global_batch_size * args.seq_length
    if dist.get_rank() == 0:
        resumed = f", resuming at iteration {state.iteration}" if state.iteration else ""
        print(f"pretrain_gpt_moe: {layout.describe()}; {sum(p.numel() for p in model.parameters()):,} parameters "
              f"on rank 0; {micro_batches_per_step} micro-batches of {args.micro_batch_size} x {args.seq_length} "
              f"per step on {device.type}{resumed}", flush=True)

    batches = train_batches(data.train, args.micro_batch_size, state.consumed_samples,
                            parallel_state.get_data_parallel_rank(), data_parallel)
    record, interval_losses, started = {}, [], time.perf_counter()
    # Seconds inside training steps (evaluation, logging and saving left out), this run and this interval.
    train_seconds = interval_seconds = 0.0
    first_iteration = state.iteration
    while state.iteration < args.train_iters:
        step_start = time.perf_counter()
        lr = learning_rate(state.iteration, args)
        set_learning_rate(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, _take(batches, micro_batches_per_step), stage, autocast_dtype=autocast_dtype)
        finalize_gradients(model)
        grad_norm = clip_grad_norm(model, args.clip_grad)
        optimizer.step()
        clear_aux_losses_tracker()
        state = TrainingState(state.iteration + 1, state.consumed_samples + args.global_batch_size)
        interval_losses.append(_reduce_loss(loss, device))
        step_seconds = time.perf_counter() - step_start
        train_seconds, interval_seconds = train_seconds + step_seconds, interval_seconds + step_seconds

        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            steps = len(interval_losses)
            seconds_per_step = train_seconds / (state.iteration - first_iteration)
            record = {
                "iteration": state.iteration,
                "tokens": state.consumed_samples * args.seq_length,
                "loss": sum(interval_losses) / steps,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": steps * tokens_per_step / interval_seconds,
                "train_seconds": train_seconds,
                "elapsed_s": time.perf_counter() - started,
                "eta_s": seconds_per_step * (args.train_iters - state.iteration),
                "moe": moe_statistics.collect(),
            }
            log.write(record, f"iter {state.iteration:6d}/{args.train_iters} | loss {record['loss']:.4f} | "
                              f"lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                              f"{record['tokens_per_second']:,.0f} tokens/s | ETA {record['eta_s']:.0f}s")
            interval_losses, interval_seconds = [], 0.0
        if data.valid is not None and args.eval_iters and (
            state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters
        ):
            valid_loss = evaluate(model, args, data, stage, autocast_dtype, data_parallel)
            log.write({"iteration": state.iteration, "tokens": state.consumed_samples * args.seq_length,
                       "valid_loss": valid_loss, "train_seconds": train_seconds},
                      f"iter {state.iteration:6d} | validation loss {valid_loss:.4f}")
        if state.iteration % args.save_interval == 0 or state.iteration == args.train_iters:
            save_checkpoint(save, state, model, optimizer, layout_key)

    if dist.get_rank() == 0 and log.jsonl.exists():
        plot_losses(log.jsonl, save / "loss.png")
        print(f"pretrain_gpt_moe: checkpoint in {save}, metrics in {log.jsonl}, loss plot {save / 'loss.png'}",
              flush=True)
    log.close()
    return record


def main(argv: Sequence[str] | None = None) -> int:
    try:
        pretrain(parse_args(argv))
    except GranularMoEConfigError as error:
        print(f"pretrain_gpt_moe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
