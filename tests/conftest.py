"""Shared fixtures: small fp64 megatron-core configs and a one-process gloo world."""

import os
import socket

import pytest
import torch.distributed as dist


# What torchrun and torch.distributed read as a process's place in a job: the test session's gloo world sets
# MASTER_ADDR / MASTER_PORT for itself, so a job started from a test must not inherit them.
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "NPROC_PER_NODE", "GROUP_RANK")


def without_rendezvous() -> dict:
    """This process's environment without :data:`RENDEZVOUS_VARIABLES`, for a job a test starts."""
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gloo_world():
    """A one-rank gloo process group with megatron-core's parallel state and the CPU shims."""
    from megatron.core import parallel_state, tensor_parallel

    from granular_moe.megatron.cpu_shims import apply_cpu_shims

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    apply_cpu_shims()
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def fresh_megatron_moe_state():
    """Megatron's aux-loss scale and tracker are global: every test starts from no scale (1 at the first
    backward) and no tracker (the tracker is sized by the first model's layer count)."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # megatron-core's own start (1 at the first backward)
    destroy_moe_metrics_tracker()
    yield
