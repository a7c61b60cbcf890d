"""The main job: pretrain a GPT with granular MoE on megatron-core's own training engine.

``granular-moe pretrain [flags]``, ``python -m granular_moe.training.pretrain [flags]``, or through
``launch_scripts/pretrain_gpt_moe.sh``. Ranks come from the launcher (torchrun, SLURM, MPI; see
:func:`granular_moe.training.distributed.distributed_env`); flags, files and the layout are checked before any
work. With GPUs: NCCL, bf16 weights with fp32 main weights, the Triton kernels; without: gloo, fp32 and
megatron-core's CPU shims. The engine (DDP, optimizer, scheduler, pipeline schedules) is megatron-core's
(:mod:`granular_moe.training.engine`), the checkpoints Megatron-LM's ``torch_dist`` format
(:mod:`granular_moe.training.checkpoint`).

Errors a user can act on (:class:`~granular_moe.config.GranularMoEConfigError`) are printed once, by global
rank 0, with exit status 2; one found on some ranks only is reported by every rank as the first one's.

Before any work: rank 0 locks ``--save`` for the job's life (:mod:`granular_moe.training.save_lock`; a job
started by the launcher finds it locked for it), and the checkpoints of ``--load`` / ``--moe-upcycle-from``
are checked against their SHA-256 digests, the files split over the ranks (unless the launcher checked them).
A process started by a launcher dies with it (:func:`granular_moe.training.distributed.die_with_parent`).
"""

from __future__ import annotations

import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from granular_moe.config import GranularMoEConfigError
from granular_moe.megatron.cpu_shims import apply_cpu_shims
from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel
from granular_moe.training.arguments import check_inputs, parse_args
from granular_moe.training.checkpoint import (
    CheckpointError,
    TrainingState,
    check_compatible,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from granular_moe.training.checkpoint_integrity import job_checkpoints, needs_verifying, verify_checkpoint
from granular_moe.training.data import build_data, eval_batches, train_batches
from granular_moe.training.distributed import die_with_parent, distributed_env
from granular_moe.training.engine import build_engine, evaluate, memory_report, train_step
from granular_moe.training.layout import check_layout
from granular_moe.training.metrics import MetricsLog, MoELayerStatistics, plot_losses
from granular_moe.training.model import padded_vocab_size, transformer_config_from_args
from granular_moe.training.save_lock import SaveLock, job_token


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


def agreed(step: Callable, *args, **kwargs):
    """Run ``step`` on every rank; if it raises a user-facing error on any rank, raise that error (the first
    failing rank's) on all of them, so the job stops together and rank 0 can report it once."""
    failure = result = None
    try:
        result = step(*args, **kwargs)
    except GranularMoEConfigError as error:
        failure = error
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if failure is None else str(failure))
    first = next((message for message in failures if message is not None), None)
    if first is not None:
        raise failure if failure is not None and str(failure) == first else GranularMoEConfigError(first)
    return result


def pretrain(args) -> dict:
    """Train as the flags say; returns the last logged record (on every rank).

    Joins the process group already initialised by the caller, or makes (and at the end destroys) one
    from the launcher's environment.
    """
    world = distributed_env()
    layout = check_layout(args, world.world_size, ranks_per_node=world.local_world_size)
    check_inputs(args)
    if dist.is_initialized():
        apply_cpu_shims()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return _train(args, layout, device)
    device = _initialize_distributed(args, world)
    try:
        return _train(args, layout, device)
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


def _take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def _resume_from(args):
    """The checkpoint to resume from (None: start from scratch), its arguments read and checked first."""
    if args.load is None:
        return None
    directory = find_checkpoint(args.load)
    if directory is None:  # --resume-if-exists (check_inputs refused it otherwise)
        return None
    load_optimizer = not (args.no_load_optim or args.finetune)
    check_compatible(read_checkpoint(directory), args, directory, load_optimizer)
    return directory


def _claim_save(args):
    """Rank 0 locks ``--save`` (or finds it locked for this job by its launcher); the others hold nothing."""
    return SaveLock.acquire(args.save, job_token=job_token(os.environ)) if dist.get_rank() == 0 else None


def _verify_checkpoints(args) -> None:
    """The checkpoints this job reads, checked against their SHA-256 digests: each rank hashes its share of
    the files, and every rank raises one error naming what any rank found. Skipped for what the launcher
    checked, and with ``--no-verify-integrity``."""
    if not args.verify_integrity:
        return
    for directory in job_checkpoints(args):
        if not needs_verifying(directory, os.environ):
            continue
        try:
            verify_checkpoint(directory, share=(dist.get_rank(), dist.get_world_size()))
            found = None
        except CheckpointError as error:
            found = str(error)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found)
        lines = [line for message in everyone if message for line in message.splitlines()]
        if lines:
            raise CheckpointError("\n".join(dict.fromkeys(lines)))  # each rank checks the file list: once


def _train(args, layout, device) -> dict:
    """Train holding the lock on ``--save``, its checkpoints to read checked first."""
    lock = agreed(_claim_save, args)
    try:
        agreed(_verify_checkpoints, args)
        return _train_holding_save(args, layout, device)
    finally:
        if lock is not None:
            lock.release()


def _train_holding_save(args, layout, device) -> dict:
    initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size,
        virtual_pipeline=layout.virtual_pipeline, num_experts=args.num_experts or None,
        ranks_per_node=layout.ranks_per_node,
    )
    _set_random_seed(args.seed)
    data_parallel = parallel_state.get_data_parallel_world_size()
    args.global_batch_size = args.global_batch_size or args.micro_batch_size * data_parallel
    micro_batches_per_step = args.global_batch_size // (args.micro_batch_size * data_parallel)

    data = agreed(build_data, args, data_parallel, corpus_max_bytes=args.corpus_max_bytes)
    args.padded_vocab_size = padded_vocab_size(data.tokenizer.vocab_size, args.tensor_model_parallel_size)
    resume = agreed(_resume_from, args)
    if resume is None and args.resume_if_exists and dist.get_rank() == 0:
        print(f"pretrain_gpt_moe: --resume-if-exists: --load {args.load} holds no checkpoint yet; starting from "
              "scratch", flush=True)
    config = transformer_config_from_args(args)
    chunks = None
    if args.moe_upcycle_from is not None and resume is None:
        from granular_moe.training.upcycle import upcycled_chunks

        chunks = agreed(upcycled_chunks, args, config, data.tokenizer.vocab_size)
    engine = build_engine(args, config, data.tokenizer.vocab_size, chunks)
    moe_statistics = MoELayerStatistics(engine.modules)
    state, notes = TrainingState(iteration=0, consumed_samples=0), []
    if resume is not None:
        state, notes = agreed(load_checkpoint, resume, engine, args, load_optimizer=not args.no_load_optim,
                              load_rng=not args.no_load_rng, finetune=args.finetune)
    save = Path(args.save)
    log = MetricsLog(args.log_jsonl or save / "metrics.jsonl", args.tensorboard_dir)
    tokens_per_step = args.global_batch_size * args.seq_length
    if dist.get_rank() == 0:
        resumed = f", resuming at iteration {state.iteration} from {resume}" if resume is not None else ""
        upcycled = f", upcycled from {args.moe_upcycle_from}" if chunks is not None else ""
        parameters = sum(p.numel() for module in engine.modules for p in module.parameters())
        print(f"pretrain_gpt_moe: {layout.describe()}; {parameters:,} parameters on rank 0; {micro_batches_per_step} "
              f"micro-batches of {args.micro_batch_size} x {args.seq_length} per step on {device.type} "
              f"({'bf16' if args.bf16 else 'fp32'}){resumed}{upcycled}", flush=True)
        for note in notes:
            print(f"pretrain_gpt_moe: note: {note}", flush=True)

    batches = train_batches(data.train, args.micro_batch_size, state.consumed_samples,
                            parallel_state.get_data_parallel_rank(), data_parallel)
    record, interval_losses, started = {}, [], time.perf_counter()
    # Seconds inside training steps (evaluation, logging and saving left out), this run and this interval.
    train_seconds = interval_seconds = 0.0
    first_iteration = state.iteration
    while state.iteration < args.train_iters:
        step_start = time.perf_counter()
        step = train_step(engine, _take(batches, micro_batches_per_step), device)
        clear_aux_losses_tracker()
        state = TrainingState(state.iteration + 1, state.consumed_samples + args.global_batch_size)
        interval_losses.append(step.loss)
        step_seconds = time.perf_counter() - step_start
        train_seconds, interval_seconds = train_seconds + step_seconds, interval_seconds + step_seconds
        if state.iteration == first_iteration + 1:
            _report_memory(engine)

        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            steps = len(interval_losses)
            seconds_per_step = train_seconds / (state.iteration - first_iteration)
            record = {
                "iteration": state.iteration,
                "tokens": state.consumed_samples * args.seq_length,
                "loss": sum(interval_losses) / steps,
                "lr": step.learning_rate,
                "grad_norm": step.grad_norm,
                "tokens_per_second": steps * tokens_per_step / interval_seconds,
                "train_seconds": train_seconds,
                "elapsed_s": time.perf_counter() - started,
                "eta_s": seconds_per_step * (args.train_iters - state.iteration),
                "moe": moe_statistics.collect(),
            }
            log.write(record, f"iter {state.iteration:6d}/{args.train_iters} | loss {record['loss']:.4f} | "
                              f"lr {step.learning_rate:.2e} | grad norm {step.grad_norm:.3f} | "
                              f"{record['tokens_per_second']:,.0f} tokens/s | ETA {record['eta_s']:.0f}s")
            interval_losses, interval_seconds = [], 0.0
        if data.valid is not None and args.eval_iters and (
            state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters
        ):
            valid = eval_batches(data.valid, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                                 data_parallel)
            valid_loss = evaluate(engine, [_take(valid, micro_batches_per_step) for _ in range(args.eval_iters)],
                                  device)
            log.write({"iteration": state.iteration, "tokens": state.consumed_samples * args.seq_length,
                       "valid_loss": valid_loss, "train_seconds": train_seconds},
                      f"iter {state.iteration:6d} | validation loss {valid_loss:.4f}")
        if state.iteration % args.save_interval == 0 or state.iteration == args.train_iters:
            save_checkpoint(save, state, engine, args)

    if dist.get_rank() == 0 and log.jsonl.exists():
        plot_losses(log.jsonl, save / "loss.png")
        print(f"pretrain_gpt_moe: checkpoint in {save}, metrics in {log.jsonl}, loss plot {save / 'loss.png'}",
              flush=True)
    log.close()
    return record


def _report_memory(engine) -> None:
    """Bytes per rank in parameters, gradient buffers and optimizer state, from the tensors (after the first
    step, when the optimizer's state exists): the largest rank's, and rank 0's."""
    local = memory_report(engine)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return

    def text(report):
        return ", ".join(f"{name.replace('_', ' ')} {value / 2**20:,.1f} MiB" for name, value in report.items())

    largest = max(gathered, key=lambda report: sum(report.values()))
    print(f"pretrain_gpt_moe: memory per rank: rank 0 {text(gathered[0])}; largest rank {text(largest)}", flush=True)


REPORTING_GRACE_SECONDS = 3.0


def _reports_errors() -> bool:
    """Whether this process prints user-facing errors: global rank 0 (or a process outside any job)."""
    try:
        return distributed_env().rank == 0
    except GranularMoEConfigError:
        return True


def _launched() -> bool:
    """Whether a launcher (torchrun, srun, mpirun) started this process, rather than a plain ``python``."""
    try:
        return distributed_env().launcher != "single"
    except GranularMoEConfigError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    if _launched():
        die_with_parent()
    try:
        pretrain(parse_args(argv))
    except GranularMoEConfigError as error:
        if _reports_errors():
            print(f"pretrain_gpt_moe: error: {error}", file=sys.stderr, flush=True)
        else:
            time.sleep(REPORTING_GRACE_SECONDS)  # torchrun stops every rank when one exits: let rank 0 print
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
