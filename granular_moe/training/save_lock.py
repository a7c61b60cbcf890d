"""One job per ``--save``: an exclusive lock on the folder, held for the job's life.

The lock is ``flock(LOCK_EX)`` on ``<save>/job.lock``. The kernel drops it when the last descriptor of the
holder closes, which a killed process's does too: a dead job never leaves a stale lock, whatever the file still
says. The file records the holder (host, pid, start time, a token) for the refusal message of the next job.

Who holds it: the launcher (``granular_moe.training.launch``) takes it before it starts anything and passes
the descriptor on to the process it becomes (torchrun, srun or mpirun, which live as long as the job), with the
token in ``GRANULAR_MOE_SAVE_LOCK``; the job's rank 0 then finds the lock held under its own token and goes
on. A job started without the launcher (torchrun by hand, tests) takes the lock itself on rank 0. On a shared
file system the lock works across hosts where the file system implements ``flock`` (NFSv4, Lustre mounted
with ``-o flock``, GPFS).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from granular_moe.config import GranularMoEConfigError

LOCK_FILE = "job.lock"
TOKEN_ENV = "GRANULAR_MOE_SAVE_LOCK"


class SaveInUseError(GranularMoEConfigError):
    """Another live job holds ``--save``: the message names the folder and the holder."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    token: str

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _read_holder(path: Path) -> Optional[Holder]:
    try:
        record = json.loads(path.read_text())
        return Holder(str(record["host"]), int(record["pid"]), str(record["started"]), str(record["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being written, or not ours


class SaveLock:
    """The lock on a ``--save`` folder, held from :meth:`acquire` until :meth:`release` (or the process ends).
    ``owned`` is False when the lock is held for this job by its launcher (this object then holds nothing)."""

    def __init__(self, save: Path, descriptor: Optional[int], holder: Holder, created: bool = False) -> None:
        self.save = Path(save)
        self.descriptor = descriptor
        self.holder = holder
        self.created = created  # the folder was made for this lock: removed on release if nothing else came

    @property
    def owned(self) -> bool:
        return self.descriptor is not None

    @classmethod
    def acquire(cls, save: Path, *, job_token: Optional[str] = None, inheritable: bool = False) -> "SaveLock":
        """Lock ``save`` (made if missing) for this process. When another process holds it: with ``job_token``
        equal to the holder's token, the lock is this job's own (taken by its launcher) and is left to it;
        otherwise :class:`SaveInUseError` naming the holder. ``inheritable``: the descriptor survives ``exec``
        (the launcher's, handed to torchrun / srun / mpirun)."""
        save = Path(save)
        created = not save.exists()
        try:
            save.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(save / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise SaveInUseError(f"--save {save}: cannot create its lock file {save / LOCK_FILE} "
                                 f"({error.strerror})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = _read_holder(save / LOCK_FILE)
            if job_token is not None and holder is not None and holder.token == job_token:
                return cls(save, None, holder)
            who = holder.describe() if holder is not None else "its holder has not written its name yet"
            raise SaveInUseError(
                f"--save {save} is in use by another job ({who}; lock {save / LOCK_FILE}): one job writes a "
                "--save folder at a time; wait for that job to end (or stop it), or choose another --save"
            ) from None
        holder = Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %z"), uuid.uuid4().hex)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder.__dict__) + "\n").encode(), 0)
        os.fsync(descriptor)
        os.set_inheritable(descriptor, inheritable)
        return cls(save, descriptor, holder, created)

    def env(self) -> dict[str, str]:
        """What the job's processes need to find this lock their own."""
        return {TOKEN_ENV: self.holder.token}

    def release(self) -> None:
        """Drop the lock; a folder made for it that holds nothing else (a job refused before any work) goes."""
        if self.descriptor is None:
            return
        try:
            if self.created and [entry.name for entry in self.save.iterdir()] == [LOCK_FILE]:
                (self.save / LOCK_FILE).unlink()
                self.save.rmdir()
        except OSError:
            pass  # another process wrote there meanwhile: the folder stays
        os.close(self.descriptor)  # closing the last descriptor drops the flock
        self.descriptor = None

    def __enter__(self) -> "SaveLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def job_token(environ: Mapping[str, str]) -> Optional[str]:
    """The token of the lock this job's launcher holds, if it was started by one."""
    return environ.get(TOKEN_ENV) or None
