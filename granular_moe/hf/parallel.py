"""Conversions split over processes: ``--workers N`` on this machine, and the ranks of ``torchrun`` (on one or
several nodes, the output folder on a file system they share).

The work is a list of independent pieces (the export's ``safetensors`` shards, the import's checkpoint
files), fixed before any process starts; worker ``i`` of ``n`` (over all ranks: rank x workers + local
worker) takes pieces ``i, i + n, ...``. What each piece holds does not depend on who writes it, so the result
is the same bytes whatever the number of workers and ranks. Rank 0 lays out the staging folder, collects
what the others report (through torchrun's key-value store: no process group, no collective) and finishes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch.distributed as dist

from granular_moe.config import GranularMoEConfigError

STORE_PREFIX = "granular-moe-hf"
TIMEOUT = timedelta(hours=6)  # a rank waits this long for the others (torchrun ends every rank when one fails)


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's ranks (one rank without torchrun)."""

    rank: int = 0
    world: int = 1
    store: Optional[Any] = None

    @property
    def coordinator(self) -> bool:
        return self.rank == 0

    def share(self, worker: int, workers: int) -> tuple[int, int]:
        return self.rank * workers + worker, self.world * workers

    def broadcast(self, name: str, value=None):
        """Rank 0's ``value`` (JSON), on every rank."""
        if self.store is None:
            return value
        if self.coordinator:
            self.store.set(name, json.dumps(value))
            return value
        self.store.wait([name], TIMEOUT)
        return json.loads(self.store.get(name))

    def gather(self, name: str, value) -> Optional[list]:
        """Every rank's ``value`` (JSON) by rank, on rank 0 (None on the others)."""
        if self.store is None:
            return [value]
        self.store.set(f"{name}/{self.rank}", json.dumps(value))
        if not self.coordinator:
            return None
        keys = [f"{name}/{rank}" for rank in range(self.world)]
        self.store.wait(keys, TIMEOUT)
        return [json.loads(self.store.get(key)) for key in keys]


def torchrun_ranks() -> Ranks:
    """The ranks torchrun started (``WORLD_SIZE`` > 1 in the environment), joined through its key-value
    store; one rank otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    store, rank, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
    return Ranks(rank, world, dist.PrefixStore(STORE_PREFIX, store))


def check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise GranularMoEConfigError(f"--workers must be >= 1, got {workers}")


def _start_worker() -> None:
    import torch

    from granular_moe.training.distributed import die_with_parent

    die_with_parent()  # a killed conversion leaves no worker writing behind it
    # one thread: a forked process must not enter the parent's OpenMP pool (as torch's DataLoader workers)
    torch.set_num_threads(1)


def run_workers(fn: Callable, payload, ranks: Ranks, workers: int) -> list:
    """``fn(payload, index, count)`` for this rank's ``workers`` shares (in this process when there is one,
    else in as many forked processes, spawned where fork is not available: a fork starts in milliseconds
    with the modules already imported, a spawn in seconds); their results in order."""
    shares = [ranks.share(worker, workers) for worker in range(workers)]
    if workers == 1:
        return [fn(payload, *shares[0])]
    import multiprocessing
    import warnings

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():  # "this process is multi-threaded": torch's pool, not entered by the workers
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with multiprocessing.get_context(method).Pool(workers, initializer=_start_worker) as pool:
            return pool.starmap(fn, [(payload, index, count) for index, count in shares])
