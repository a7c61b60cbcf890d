"""Where this process sits in a job, whichever launcher started it: torchrun (or any ``env://`` launcher),
SLURM's srun, MPICH / Open MPI's mpirun, or a plain ``python`` (one process).

:func:`distributed_env` reads the launcher's variables; the trainer and the Megatron-LM wrapper use it to join
the job, and the launch plans (:mod:`granular_moe.training.launch`) to describe each node's processes.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from granular_moe.config import GranularMoEConfigError

DEFAULT_MASTER_PORT = 29500


class LaunchConfigError(GranularMoEConfigError):
    """An invalid launch: the message names the flags / environment variables and their valid values."""


def int_at_least(value, name: str, minimum: int = 1) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise LaunchConfigError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise LaunchConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list (``node[01-03,7],gpu-a[1-2]-b[1-2],login``) into host names,
    in SLURM's order, zero padding kept. The syntax is expanded here, so no ``scontrol`` is needed."""
    text = nodelist.strip()
    if not text:
        raise LaunchConfigError("empty node list (SLURM_JOB_NODELIST / --nodelist / HOSTS)")
    names, depth, start = [], 0, 0
    for position, char in enumerate(text + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            names.append(text[start:position])
            start = position + 1
        if depth not in (0, 1):
            raise LaunchConfigError(f"node list {nodelist!r}: unbalanced brackets")
    if depth:
        raise LaunchConfigError(f"node list {nodelist!r}: unbalanced brackets")
    hosts = []
    for name in names:
        if not name:
            raise LaunchConfigError(f"node list {nodelist!r}: empty host name")
        hosts.extend(_expand_host_pattern(name, nodelist))
    return hosts


def _expand_host_pattern(pattern: str, nodelist: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    prefix, suffix = pattern[: match.start()], pattern[match.end():]
    expanded = []
    for item in match.group(1).split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values = [str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise LaunchConfigError(f"node list {nodelist!r}: cannot read the range {item!r}")
        for value in values:
            expanded.extend(_expand_host_pattern(prefix + value + suffix, nodelist))
    return expanded


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` (``8(x2),4``) as one count per node."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise LaunchConfigError(f"cannot read SLURM tasks per node {text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_default_port(job_id: str | None) -> int:
    """A rendezvous port that differs between jobs sharing a node: 10000 + job id mod 20000."""
    return 10000 + int(job_id) % 20000 if job_id and job_id.isdigit() else DEFAULT_MASTER_PORT


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, whichever launcher started it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int
    launcher: str  # torchrun, openmpi, mpich, slurm, mpi4py or single

    @property
    def init_method(self) -> str:
        """``init_method`` for ``torch.distributed.init_process_group``."""
        return f"tcp://{self.master_addr}:{self.master_port}"

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the ``env://`` variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``), for code that reads them, such as Megatron-LM."""
        environ = os.environ if environ is None else environ
        environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port), NODE_RANK=str(self.node_rank),
        )


def distributed_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """This process's rank, world, local rank, node and rendezvous address, from the environment.

    Looked up in this order:

    1. torchrun (or any ``env://`` launcher): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
       ``GROUP_RANK``/``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
    2. An MPI launcher's own variables: Open MPI's ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}`` or
       MPICH/Hydra's ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``/``MPI_LOCALNRANKS``. They come before SLURM
       because ``mpirun`` inside an allocation leaves the allocation's ``SLURM_*`` variables in its ranks.
    3. SLURM, one task per process (``srun``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``,
       ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE``; ``MASTER_ADDR`` defaults to the first host of
       ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST`` (expanded here), ``MASTER_PORT`` to
       :func:`slurm_default_port`. A batch script itself (no ``srun`` step) is not a task.
    4. Other MPI launches (``PMI_RANK`` or ``PMIX_RANK`` without the above): ``mpi4py``'s ``COMM_WORLD``.

    Under MPI without ``MASTER_ADDR``, rank 0's host name (and, without ``MASTER_PORT``, a free port of
    it) is broadcast with ``mpi4py``. With none of these, a single process on ``127.0.0.1`` and a free port.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _torchrun_env(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE")
        return _mpi_env(env, "openmpi", *(_require_env(env, name, "Open MPI") for name in names))
    if all(name in env for name in ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")):
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
        return _mpi_env(env, "mpich", *(int(env[name]) for name in names))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _slurm_env(env)
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        comm = _mpi4py_world()
        if comm is None:
            raise LaunchConfigError(
                "started by an MPI launcher (PMI_RANK/PMIX_RANK set) that does not export local ranks: "
                "install mpi4py, or launch with launch_scripts/pretrain_gpt_moe_mpi.sh"
            )
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        return _mpi_env(env, "mpi4py", comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size())
    port = int_at_least(env["MASTER_PORT"], "MASTER_PORT") if env.get("MASTER_PORT") else _free_port()
    return DistributedEnv(0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", port, 0, "single")


def _require_env(env: Mapping[str, str], name: str, launcher: str) -> int:
    if name not in env:
        raise LaunchConfigError(f"{launcher} launch without {name} in the environment")
    return int_at_least(env[name], name, minimum=0)


def _checked(result: DistributedEnv, variables: str) -> DistributedEnv:
    if not (0 <= result.rank < result.world_size and 0 <= result.local_rank < result.local_world_size
            and result.local_world_size <= result.world_size):
        raise LaunchConfigError(
            f"inconsistent {result.launcher} environment ({variables}): rank {result.rank} of "
            f"{result.world_size}, local rank {result.local_rank} of {result.local_world_size}"
        )
    return result


def _torchrun_env(env: Mapping[str, str]) -> DistributedEnv:
    rank = int_at_least(env["RANK"], "RANK", minimum=0)
    world = int_at_least(env["WORLD_SIZE"], "WORLD_SIZE")
    local_world = int_at_least(env.get("LOCAL_WORLD_SIZE", world), "LOCAL_WORLD_SIZE")
    local_rank = int_at_least(env.get("LOCAL_RANK", rank % local_world), "LOCAL_RANK", minimum=0)
    node = env.get("GROUP_RANK") or env.get("NODE_RANK") or rank // local_world
    if world > 1 and not env.get("MASTER_ADDR"):
        raise LaunchConfigError("RANK/WORLD_SIZE are set without MASTER_ADDR: export rank 0's address")
    return _checked(DistributedEnv(
        rank, world, local_rank, local_world, env.get("MASTER_ADDR") or "127.0.0.1",
        int_at_least(env.get("MASTER_PORT", DEFAULT_MASTER_PORT), "MASTER_PORT"),
        int_at_least(node, "GROUP_RANK/NODE_RANK", minimum=0), "torchrun",
    ), "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE")


def _slurm_env(env: Mapping[str, str]) -> DistributedEnv:
    rank = int_at_least(env["SLURM_PROCID"], "SLURM_PROCID", minimum=0)
    world = int_at_least(env["SLURM_STEP_NUM_TASKS"], "SLURM_STEP_NUM_TASKS")
    node = int_at_least(env.get("SLURM_NODEID", 0), "SLURM_NODEID", minimum=0)
    local_rank = int_at_least(env.get("SLURM_LOCALID", 0), "SLURM_LOCALID", minimum=0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(per_node) if per_node else [world]
    if node >= len(counts):
        raise LaunchConfigError(f"SLURM_NODEID {node} is beyond the tasks per node {per_node!r}")
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchConfigError("SLURM task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: export MASTER_ADDR")
        master_addr = expand_nodelist(nodelist)[0]
    port = env.get("MASTER_PORT") or slurm_default_port(env.get("SLURM_JOB_ID"))
    return _checked(DistributedEnv(
        rank, world, local_rank, counts[node], master_addr, int_at_least(port, "MASTER_PORT"), node, "slurm",
    ), "SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE")


def _mpi_env(env: Mapping[str, str], launcher: str, rank: int, world: int, local_rank: int,
             local_world: int) -> DistributedEnv:
    master_addr, master_port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not master_addr:
        if world == 1:
            master_addr = "127.0.0.1"
        else:
            comm = _mpi4py_world()
            if comm is None:
                raise LaunchConfigError(
                    "MASTER_ADDR is not set and mpi4py is not importable: export MASTER_ADDR (rank 0's host) "
                    "to every rank (mpirun -x / -genv), or install mpi4py"
                )
            chosen = (socket.gethostname(), master_port or _free_port()) if comm.Get_rank() == 0 else None
            master_addr, master_port = comm.bcast(chosen, root=0)
    node_rank = rank // local_world
    port = int_at_least(master_port or DEFAULT_MASTER_PORT, "MASTER_PORT")
    return _checked(DistributedEnv(rank, world, local_rank, local_world, master_addr, port, node_rank, launcher),
                    f"{launcher} rank variables")


def _mpi4py_world():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signal_number: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send this process ``signal_number`` when its parent (torchrun's agent, srun's step
    daemon, mpirun's proxy) dies, so a killed launcher leaves no worker behind to train and save on its own
    (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing is done and False returned). A parent that died
    before the request took effect is caught too: the process then ends at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent is already gone: the signal will never come
        os.kill(os.getpid(), signal_number)
    return True
