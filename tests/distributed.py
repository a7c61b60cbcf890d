"""Run a function on several gloo processes (spawned), collecting each rank's result or traceback."""

import os
import pickle
import queue as queue_module
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port


def _worker(fn, rank, world_size, port, args, results):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        from granular_moe.megatron.cpu_shims import apply_cpu_shims

        apply_cpu_shims()
        # Plain pickle: torch's queue would share tensors through descriptors that die with this process.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=600):
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results by rank.

    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)
    ]
    for process in processes:
        process.start()
    collected, failures = {}, []
    try:
        for _ in processes:
            rank, ok, value = results.get(timeout=timeout)
            (collected.__setitem__(rank, value) if ok else failures.append(f"rank {rank}:\n{value}"))
            if failures:
                break
    except queue_module.Empty:
        failures.append(f"timed out after {timeout}s; results from ranks {sorted(collected)}")
    finally:
        for process in processes:
            process.join(timeout=5 if failures else 60)
            if process.is_alive():
                process.kill()
    if failures:
        raise AssertionError("distributed run failed\n" + "\n".join(failures))
    return [pickle.loads(collected[r]) for r in range(world_size)]
