"""Launching the main job: per-node commands for torchrun, SLURM and mpirun, and their dry runs.

Three routes start ``python -m granular_moe.training.pretrain`` (``$GRANULAR_MOE_ENTRY`` names another
module with a ``main(argv)``) on every process; each has a dry run that prints, per node, the exact command
and the environment its processes get:

- ``torchrun``: ``bash launch_scripts/pretrain_gpt_moe.sh`` on each node runs ``torchrun`` (static
  rendezvous on ``MASTER_ADDR``, or ``--standalone`` on one node), which runs the same file with Python.
- ``slurm``: ``launch_scripts/pretrain_gpt_moe.sbatch``; ``LAUNCH_MODE=torchrun`` runs one torchrun per
  node with a c10d rendezvous on the first node, ``LAUNCH_MODE=srun-per-gpu`` one task per process with
  ranks from the SLURM variables.
- ``mpirun``: ``launch_scripts/pretrain_gpt_moe_mpi.sh``, ranks from the MPI launcher's variables.

Every route checks the layout (:func:`granular_moe.training.layout.check_layout`) and the files the flags name
(the data and tokenizer opened, the checkpoints to read checked against their SHA-256 digests) before it starts
a process, then locks ``--save`` (:mod:`granular_moe.training.save_lock`) and hands the lock to the process it
becomes; each process started dies with its parent. The trainer resolves its rank with
:func:`granular_moe.training.distributed.distributed_env` and checks the layout again against the world it
finds, so a job started by hand fails the same way.

Command line: ``python -m granular_moe.training.launch {check,torchrun,slurm,mpirun} [launcher flags]
[trainer flags]``; launcher flags also come from the environment (``NNODES``, ``NPROC_PER_NODE``, ...), and
``TP``/``PP``/``EP`` feed the trainer's parallel-size flags.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from granular_moe.config import GranularMoEConfigError
from granular_moe.training.distributed import (
    DEFAULT_MASTER_PORT,
    LaunchConfigError,
    die_with_parent,
    distributed_env,
    expand_nodelist,
    int_at_least,
    slurm_default_port,
)
from granular_moe.training.checkpoint_integrity import VERIFIED_ENV
from granular_moe.training.layout import PARALLEL_ENV, Layout, check_layout
from granular_moe.training.save_lock import TOKEN_ENV, SaveLock

# Set by the launcher for the job's processes (forwarded by every route): the lock's token, what it verified.
JOB_ENV = (TOKEN_ENV, VERIFIED_ENV)

ENTRY_ENV = "GRANULAR_MOE_ENTRY"
DEFAULT_ENTRY = "granular_moe.training.pretrain"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "cpu_default.yaml"
LAUNCH_MODES = ("torchrun", "srun-per-gpu")
MPI_FLAVORS = ("mpich", "openmpi")


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"



def trainer_argv(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The trainer's flags: ``configs/cpu_default.yaml`` when none are given, then ``TP``/``PP``/``EP``
    from the environment as ``--tensor/pipeline/expert-model-parallel-size`` (a flag that disagrees with
    its variable is an error)."""
    argv = list(argv)
    if not argv:
        if not DEFAULT_CONFIG.is_file():
            raise LaunchConfigError(
                f"no trainer flags given and the default {DEFAULT_CONFIG} is missing: pass --config"
            )
        argv = ["--config", str(DEFAULT_CONFIG)]
    for variable, flag in PARALLEL_ENV.items():
        if not environ.get(variable):
            continue
        size = int_at_least(environ[variable], f"{variable} ({flag})")
        given = _last_flag_value(argv, flag)
        if given is None:
            argv += [flag, str(size)]
        elif int_at_least(given, flag) != size:
            raise LaunchConfigError(f"{flag} {given} disagrees with {variable}={environ[variable]}: set one of them")
    return argv


def _last_flag_value(argv: Sequence[str], flag: str) -> str | None:
    value = None
    for position, arg in enumerate(argv):
        if arg == flag and position + 1 < len(argv):
            value = argv[position + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def _parse_trainer_args(argv: Sequence[str]) -> argparse.Namespace:
    with warnings.catch_warnings():
        # Importing megatron-core warns about missing Transformer Engine / Apex: noise in a launcher.
        warnings.simplefilter("ignore")
        from granular_moe.training.arguments import parse_args

    return parse_args(list(argv))


# --------------------------------------------------------------------------- plans


@dataclass
class NodePlan:
    """What one node runs: its command, the environment the launcher sets for it, and the variables each
    of its processes gets from the process launcher (torchrun, srun or mpirun)."""

    node_rank: int
    host: str | None
    command: list[str]
    env: dict[str, str]
    process_env: dict[str, str]
    process_env_source: str


@dataclass
class Plan:
    route: str
    nnodes: int
    nproc_per_node: int
    layout: Layout
    nodes: list[NodePlan]
    step: list[str] | None = None  # the one command that starts every node (srun / mpirun)
    notes: list[str] = field(default_factory=list)

    def render(self, only_node: int | None = None) -> str:
        """The plan as text: one block per node (only ``only_node``'s when given)."""
        lines = [f"plan: {self.route}, {self.nnodes} node(s) x {self.nproc_per_node} process(es)",
                 f"layout: {self.layout.describe()}"]
        lines += [f"note: {note}" for note in self.notes]
        if self.step is not None:
            lines.append(f"step: {shlex.join(self.step)}")
        for node in self.nodes if only_node is None else self.nodes[only_node:only_node + 1]:
            lines.append(f"node {node.node_rank}:" + (f" host {node.host}" if node.host else ""))
            lines.append("  env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in node.env.items()))
            lines.append(f"  run: {shlex.join(node.command)}")
            variables = " ".join(f"{k}={v}" for k, v in node.process_env.items())
            lines.append(f"  ranks: {variables} (set by {node.process_env_source})")
        return "\n".join(lines)


@dataclass
class LaunchSettings:
    """Launcher flags and their environment variables, resolved."""

    nnodes: int | None
    nproc_per_node: int | None
    node_rank: int | None
    master_addr: str | None
    master_port: int | None
    dry_run: bool
    extra: dict[str, str]


_LAUNCHER_FLAGS = {
    # flag: (environment variable, kind)
    "--nnodes": ("NNODES", "count"),
    "--nproc-per-node": ("NPROC_PER_NODE", "count"),
    "--node-rank": ("NODE_RANK", "index"),
    "--master-addr": ("MASTER_ADDR", "text"),
    "--master-port": ("MASTER_PORT", "count"),
}
_ROUTE_FLAGS = {
    "torchrun": {"--script": (None, "text")},
    "slurm": {"--launch-mode": ("LAUNCH_MODE", "text"), "--nodelist": ("SLURM_JOB_NODELIST", "text")},
    "mpirun": {"--hosts": ("HOSTS", "text"), "--mpi-flavor": ("MPI_FLAVOR", "text")},
    "check": {},
}


def split_launcher_args(
    route: str, argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[LaunchSettings, list[str]]:
    """Take the launcher's flags out of ``argv`` (the rest are the trainer's), merged with their
    environment variables; a flag and a variable that disagree are an error."""
    flags = {**_LAUNCHER_FLAGS, **_ROUTE_FLAGS[route]}
    given: dict[str, str] = {}
    rest, dry_run, position = [], False, 0
    while position < len(argv):
        arg = argv[position]
        name, equals, inline = arg.partition("=")
        if arg == "--dry-run":
            dry_run = True
        elif name in flags:
            if not equals:
                if position + 1 == len(argv):
                    raise LaunchConfigError(f"{name} needs a value")
                position += 1
                inline = argv[position]
            given[name] = inline
        else:
            rest.append(arg)
        position += 1
    values = {}
    for flag, (variable, kind) in flags.items():
        candidates = [(flag, given.get(flag)), (variable, environ.get(variable) if variable else None)]
        parsed = [(name, _launcher_value(value, f"{flag} ({variable})" if variable else flag, kind))
                  for name, value in candidates if value not in (None, "")]
        if len(parsed) == 2 and parsed[0][1] != parsed[1][1]:
            raise LaunchConfigError(
                f"{flag} {given[flag]} disagrees with {variable}={environ[variable]}: set one of them"
            )
        values[flag] = parsed[0][1] if parsed else None
    dry_run = dry_run or environ.get("DRY_RUN", "") not in ("", "0")
    settings = LaunchSettings(
        values["--nnodes"], values["--nproc-per-node"], values["--node-rank"], values["--master-addr"],
        values["--master-port"], dry_run, {flag: values[flag] for flag in _ROUTE_FLAGS[route] if values[flag]},
    )
    return settings, rest


def _launcher_value(value: str, name: str, kind: str):
    if kind == "count":
        return int_at_least(value, name)
    if kind == "index":
        return int_at_least(value, name, minimum=0)
    return value


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def default_nproc_per_node(environ: Mapping[str, str]) -> int:
    """Processes per node when ``NPROC_PER_NODE`` is unset: the node's GPUs (SLURM's count of them, else
    this machine's), or, without a GPU, 2 gloo processes (1 on a one-core machine)."""
    for variable in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if environ.get(variable):
            # SLURM_GPUS_PER_NODE may name the type: "h100:8".
            return int_at_least(environ[variable].split(":")[-1], variable)
    return local_gpu_count() or min(2, os.cpu_count() or 1)


def _omp_threads(environ: Mapping[str, str], nproc: int) -> str:
    if environ.get("OMP_NUM_THREADS"):
        return environ["OMP_NUM_THREADS"]
    cpus = int(environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    return str(max(1, cpus // nproc))


def _base_env(environ: Mapping[str, str], nproc: int) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": _omp_threads(environ, nproc)}
    for variable in ("PYTHONPATH", ENTRY_ENV, *JOB_ENV):
        if environ.get(variable):
            env[variable] = environ[variable]
    return env


def _entry_command(environ: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", environ.get(ENTRY_ENV) or DEFAULT_ENTRY, *argv]


def _checked_layout(argv: Sequence[str], nnodes: int, nproc: int, check_files: bool = True) -> Layout:
    """The trainer's flags checked against ``nnodes x nproc`` processes, and (unless a dry run, which may be
    made away from the data) the files they name, before any process starts."""
    args = _parse_trainer_args(argv)
    layout = check_layout(args, nnodes * nproc, f"NNODES {nnodes} x NPROC_PER_NODE {nproc}", ranks_per_node=nproc)
    if check_files:
        from granular_moe.training.arguments import check_inputs

        check_inputs(args)
    return layout


def plan_torchrun(settings: LaunchSettings, argv: Sequence[str], environ: Mapping[str, str]) -> Plan:
    """``bash launch_scripts/pretrain_gpt_moe.sh`` on each node: torchrun with a static rendezvous on
    ``MASTER_ADDR:MASTER_PORT`` (``--standalone`` on one node when neither is given)."""
    script = settings.extra.get("--script")
    if not script:
        raise LaunchConfigError("torchrun route needs --script (the launch script torchrun runs)")
    nnodes = settings.nnodes or 1
    nproc = settings.nproc_per_node or default_nproc_per_node(environ)
    if settings.node_rank is not None and settings.node_rank >= nnodes:
        raise LaunchConfigError(
            f"NODE_RANK {settings.node_rank} is not a node of NNODES {nnodes}; valid: 0..{nnodes - 1}"
        )
    layout = _checked_layout(argv, nnodes, nproc, check_files=not settings.dry_run)
    notes = []
    standalone = nnodes == 1 and settings.master_addr is None and settings.master_port is None
    master_addr = settings.master_addr or ("127.0.0.1" if nnodes == 1 else None)
    if master_addr is None:
        if not settings.dry_run:
            raise LaunchConfigError(f"NNODES {nnodes} needs MASTER_ADDR (node 0's address) on every node")
        master_addr = "node0"
        notes.append("MASTER_ADDR is not set: node0 stands for node 0's address")
    master_port = settings.master_port or DEFAULT_MASTER_PORT
    world = nnodes * nproc
    nodes = []
    for node in range(nnodes):
        if standalone:
            rendezvous = ["--standalone"]
            where, source = {}, "torchrun; --standalone: MASTER_ADDR/MASTER_PORT on a free local port"
        else:
            rendezvous = ["--nnodes", str(nnodes), "--node-rank", str(node), "--master-addr", master_addr,
                          "--master-port", str(master_port)]
            where, source = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}, "torchrun"
        command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc),
                   str(Path(script).resolve()), *argv]
        ranks = {"RANK": _span(node * nproc, node * nproc + nproc - 1), "LOCAL_RANK": _span(0, nproc - 1),
                 "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(node), **where}
        nodes.append(NodePlan(node, master_addr if node == 0 and not standalone else None, command,
                              _base_env(environ, nproc), ranks, source))
    return Plan("torchrun", nnodes, nproc, layout, nodes, notes=notes)


def plan_slurm(settings: LaunchSettings, argv: Sequence[str], environ: Mapping[str, str]) -> Plan:
    """The SLURM batch script's job step. ``LAUNCH_MODE=torchrun``: one task per node running torchrun
    with a c10d rendezvous on the first node; ``srun-per-gpu``: one task per process."""
    mode = settings.extra.get("--launch-mode", "torchrun")
    if mode not in LAUNCH_MODES:
        raise LaunchConfigError(
            f"LAUNCH_MODE / --launch-mode {mode!r} is not valid; valid values: {', '.join(LAUNCH_MODES)}"
        )
    notes = []
    nodelist = settings.extra.get("--nodelist")
    job_nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    if nodelist:
        hosts = expand_nodelist(nodelist)
        if settings.nnodes is not None and settings.nnodes != len(hosts):
            raise LaunchConfigError(f"NNODES {settings.nnodes} disagrees with the {len(hosts)} hosts of {nodelist!r}")
    elif settings.dry_run:
        count = settings.nnodes or (int(job_nodes) if job_nodes else 1)
        hosts = [f"node{i}" for i in range(count)]
        notes.append("no SLURM_JOB_NODELIST: node0, node1, ... stand for the allocation's hosts")
    else:
        raise LaunchConfigError("not inside a SLURM allocation (no SLURM_JOB_NODELIST): submit with sbatch, or "
                                "pass --dry-run with NNODES or SLURM_JOB_NODELIST")
    nnodes = len(hosts)
    nproc = settings.nproc_per_node or default_nproc_per_node(environ)
    layout = _checked_layout(argv, nnodes, nproc, check_files=not settings.dry_run)
    job_id = environ.get("SLURM_JOB_ID")
    port = settings.master_port or slurm_default_port(job_id)
    world = nnodes * nproc
    cpus = environ.get("SLURM_CPUS_ON_NODE")
    env = _base_env(environ, nproc)
    if mode == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node",
                   str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0]}:{port}", "--rdzv-id",
                   job_id or "dry-run", str(REPO_ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"), *argv]
        tasks_per_node, cpus_per_task = 1, cpus
    else:
        env.update(MASTER_ADDR=hosts[0], MASTER_PORT=str(port))
        command = _entry_command(environ, argv)
        tasks_per_node, cpus_per_task = nproc, cpus and str(max(1, int(cpus) // nproc))
    step = ["srun", "--nodes", str(nnodes), "--ntasks", str(nnodes * tasks_per_node), "--ntasks-per-node",
            str(tasks_per_node)]
    step += ["--cpus-per-task", cpus_per_task] if cpus_per_task else []
    step += ["--kill-on-bad-exit=1", *command]
    nodes = []
    for node, host in enumerate(hosts):
        if mode == "torchrun":
            ranks = {"LOCAL_RANK": _span(0, nproc - 1), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(nproc)}
            source = (f"torchrun; GROUP_RANK and {nproc} consecutive RANKs per node in the order nodes join the "
                      f"c10d rendezvous at {hosts[0]}:{port}")
        else:
            ranks = {
                "SLURM_PROCID": _span(node * nproc, node * nproc + nproc - 1),
                "SLURM_LOCALID": _span(0, nproc - 1),
                "SLURM_NODEID": str(node),
                "SLURM_STEP_NUM_TASKS": str(world),
            }
            source = "srun"
        nodes.append(NodePlan(node, host, command, env, ranks, source))
    return Plan(f"slurm {mode}", nnodes, nproc, layout, nodes, step=step, notes=notes)


def plan_mpirun(settings: LaunchSettings, argv: Sequence[str], environ: Mapping[str, str]) -> Plan:
    """One ``mpirun`` on the first node starts every process; ranks come from the MPI launcher."""
    notes = []
    hosts_text = settings.extra.get("--hosts") or environ.get("SLURM_JOB_NODELIST")
    if hosts_text:
        hosts = expand_nodelist(hosts_text)
        if settings.nnodes is not None and settings.nnodes != len(hosts):
            raise LaunchConfigError(f"NNODES {settings.nnodes} disagrees with the {len(hosts)} hosts {hosts_text!r}")
    elif (settings.nnodes or 1) == 1:
        hosts = None
    elif settings.dry_run:
        hosts = [f"node{i}" for i in range(settings.nnodes)]
        notes.append("HOSTS is not set: node0, node1, ... stand for the hosts")
    else:
        raise LaunchConfigError(f"NNODES {settings.nnodes} needs HOSTS (or --hosts): the node names, comma separated")
    nnodes = len(hosts) if hosts else 1
    nproc = settings.nproc_per_node or default_nproc_per_node(environ)
    layout = _checked_layout(argv, nnodes, nproc, check_files=not settings.dry_run)
    flavor = settings.extra.get("--mpi-flavor") or detect_mpi_flavor()
    if flavor is None:
        if not settings.dry_run:
            raise LaunchConfigError("mpirun is not on PATH (set MPI_FLAVOR to mpich or openmpi once it is)")
        flavor = "mpich"
        notes.append("mpirun is not on PATH: MPICH syntax shown (MPI_FLAVOR=openmpi for Open MPI's)")
    if flavor not in MPI_FLAVORS:
        raise LaunchConfigError(
            f"MPI_FLAVOR / --mpi-flavor {flavor!r} is not valid; valid values: {', '.join(MPI_FLAVORS)}"
        )
    world = nnodes * nproc
    env = _base_env(environ, nproc)
    env.update(MASTER_ADDR=hosts[0] if hosts else "127.0.0.1",
               MASTER_PORT=str(settings.master_port or DEFAULT_MASTER_PORT))
    command = _entry_command(environ, argv)
    if flavor == "mpich":
        step = ["mpirun", "-np", str(world), "-ppn", str(nproc)]
        step += ["-hosts", ",".join(hosts)] if hosts else []
        for name, value in env.items():
            step += ["-genv", name, value]
        names = ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS")
    else:
        step = ["mpirun", "-np", str(world), "--map-by", f"ppr:{nproc}:node"]
        step += ["-H", ",".join(f"{host}:{nproc}" for host in hosts)] if hosts else []
        for name, value in env.items():
            step += ["-x", f"{name}={value}"]
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_SIZE")
    step += command
    nodes = []
    for node in range(nnodes):
        values = (_span(node * nproc, node * nproc + nproc - 1), _span(0, nproc - 1), str(world), str(nproc))
        nodes.append(NodePlan(node, hosts[node] if hosts else None, command, env, dict(zip(names, values)),
                              f"mpirun ({flavor})"))
    return Plan(f"mpirun ({flavor})", nnodes, nproc, layout, nodes, step=step, notes=notes)


def detect_mpi_flavor() -> str | None:
    """``openmpi`` or ``mpich`` from ``mpirun --version``; None when there is no mpirun."""
    if shutil.which("mpirun") is None:
        return None
    result = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=60)
    return "openmpi" if "Open MPI" in result.stdout + result.stderr else "mpich"


# --------------------------------------------------------------------------- running


def run_worker(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """One process of the job (the Python side of ``launch_scripts/pretrain_gpt_moe.sh`` under torchrun):
    run the entry module's ``main`` with the trainer's flags. ``--dry-run``/``DRY_RUN=1`` prints it instead."""
    environ = os.environ if environ is None else environ
    argv = list(argv)
    dry_run = "--dry-run" in argv or environ.get("DRY_RUN", "") not in ("", "0")
    argv = trainer_argv([arg for arg in argv if arg != "--dry-run"], environ)
    entry = environ.get(ENTRY_ENV) or DEFAULT_ENTRY
    if dry_run:
        where = distributed_env(environ)
        print(f"rank {where.rank} of {where.world_size} ({where.launcher}): "
              f"{shlex.join(_entry_command(environ, argv))}", flush=True)
        return 0
    if environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun: die with its agent, whoever kills it
        die_with_parent()
    return importlib.import_module(entry).main(argv) or 0


def prepare_job(route: str, node_rank: int, argv: Sequence[str]) -> tuple[SaveLock | None, dict[str, str]]:
    """What this launcher does once every check passed, before it starts anything: lock ``--save`` (the node
    that starts the job: node 0 of the torchrun route, the host of srun / mpirun), its descriptor handed on to
    the process this one becomes, and check the checkpoints the job reads against their SHA-256 digests (every
    node, on its threads). Returns the lock and the environment that tells the job's processes both."""
    from granular_moe.training.checkpoint_integrity import job_checkpoints, verified_env, verify_checkpoint

    args = _parse_trainer_args(argv)
    lock = SaveLock.acquire(args.save, inheritable=True) if route != "torchrun" or node_rank == 0 else None
    try:
        env = dict(lock.env()) if lock is not None else {}
        if args.verify_integrity:
            checkpoints = job_checkpoints(args)
            for directory in checkpoints:
                verify_checkpoint(directory)
            env.update(verified_env(checkpoints))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, env


def _execute(plan: Plan, node_rank: int, environ: Mapping[str, str]) -> None:
    """Replace this process with the plan's step (srun / mpirun) or the given node's command."""
    command = plan.step or plan.nodes[node_rank].command
    if shutil.which(command[0]) is None:
        raise LaunchConfigError(f"{command[0]} is not on PATH")
    print(plan.render(None if plan.step else node_rank), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, {**environ, **plan.nodes[node_rank].env})


USAGE = """\
usage: python -m granular_moe.training.launch COMMAND [launcher flags] [trainer flags]

commands:
  check     check the layout for NNODES x NPROC_PER_NODE processes and print it
  torchrun  --script FILE: run FILE under torchrun on this node (launch_scripts/pretrain_gpt_moe.sh)
  slurm     run the SLURM job step (launch_scripts/pretrain_gpt_moe.sbatch)
  mpirun    run the job with mpirun (launch_scripts/pretrain_gpt_moe_mpi.sh)

launcher flags (environment variable):
  --nnodes N (NNODES)                 nodes, default 1 (SLURM: the allocation's)
  --nproc-per-node N (NPROC_PER_NODE) processes per node, default: the node's GPUs, else 2 on a CPU
  --node-rank R (NODE_RANK)           this node's index (torchrun route, NNODES > 1)
  --master-addr A (MASTER_ADDR)       node 0's address (torchrun route, NNODES > 1)
  --master-port P (MASTER_PORT)       rendezvous port, default 29500 (SLURM: 10000 + job id mod 20000)
  --launch-mode M (LAUNCH_MODE)       slurm: torchrun (default) or srun-per-gpu
  --nodelist L (SLURM_JOB_NODELIST)   slurm: the hosts, SLURM syntax (node[01-16])
  --hosts L (HOSTS)                   mpirun: the hosts, comma separated or SLURM syntax
  --mpi-flavor F (MPI_FLAVOR)         mpirun: mpich or openmpi (default: from mpirun --version)
  --dry-run (DRY_RUN=1)               print, per node, the command and environment; start nothing
TP, PP and EP set --tensor-, --pipeline- and --expert-model-parallel-size. No trainer flags: the
embedded default, configs/cpu_default.yaml. GRANULAR_MOE_ENTRY names the module to run (default
granular_moe.training.pretrain). Trainer flags: python -m granular_moe.training.pretrain --help.
"""

_PLANNERS = {"torchrun": plan_torchrun, "slurm": plan_slurm, "mpirun": plan_mpirun}


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    if not argv or argv[0] not in (*_PLANNERS, "check") or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    route, rest = argv[0], argv[1:]
    if "-h" in rest or "--help" in rest:
        print(USAGE)
        return 0
    try:
        settings, trainer_flags = split_launcher_args(route, rest, environ)
        trainer_flags = trainer_argv(trainer_flags, environ)
        if route == "check":
            nnodes = settings.nnodes or 1
            nproc = settings.nproc_per_node or default_nproc_per_node(environ)
            print(f"layout: {_checked_layout(trainer_flags, nnodes, nproc).describe()}")
            return 0
        plan = _PLANNERS[route](settings, trainer_flags, environ)
        if settings.dry_run:
            print(plan.render())
            return 0
        node_rank = _this_node(route, plan, settings, environ)
        lock, job_env = prepare_job(route, node_rank, trainer_flags)
        with lock or contextlib.nullcontext():
            environ.update(job_env)
            plan = _PLANNERS[route](settings, trainer_flags, environ)  # forwards job_env to every process
            _execute(plan, node_rank, environ)
    except GranularMoEConfigError as error:
        print(f"granular-moe launch: error: {error}", file=sys.stderr)
        return 2
    return 0  # not reached: _execute replaces the process


def _this_node(route: str, plan: Plan, settings: LaunchSettings, environ: Mapping[str, str]) -> int:
    if route != "torchrun":
        return 0  # srun and mpirun start every node from here
    if plan.nnodes > 1 and settings.node_rank is None:
        raise LaunchConfigError(f"NNODES {plan.nnodes} needs NODE_RANK (this node's index, 0..{plan.nnodes - 1})")
    gpus = local_gpu_count()
    if gpus and plan.nproc_per_node > gpus:
        raise LaunchConfigError(f"NPROC_PER_NODE {plan.nproc_per_node} is more than this node's {gpus} GPUs")
    return settings.node_rank or 0


if __name__ == "__main__":
    sys.exit(main())
