"""One job per --save: a second job is refused before any work, naming the folder and the holder (host, pid,
start time); the lock dies with its holder (no stale lock after a kill); a job started by the launcher finds
the launcher's lock its own."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from granular_moe.training.save_lock import LOCK_FILE, TOKEN_ENV, SaveInUseError, SaveLock

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--micro-batch-size", "4",
        "--corpus-max-bytes", "300000", "--eval-iters", "1", "--train-iters", "4"]
HOLD = ("import sys, time\nfrom granular_moe.training.save_lock import SaveLock\n"
        "lock = SaveLock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run (killed with SIGKILL at the end)."""
    save = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(save)], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert process.stdout.readline().strip() == "held"
    yield save, process
    process.kill()
    process.wait()


def test_a_second_holder_is_refused_naming_the_folder_and_the_holder(holder):
    save, process = holder
    with pytest.raises(SaveInUseError) as refused:
        SaveLock.acquire(save)
    message = str(refused.value)
    assert f"--save {save} is in use by another job (host {socket.gethostname()}, pid {process.pid}, started " \
        f"{time.strftime('%Y-%m-%d')}" in message and str(save / LOCK_FILE) in message


def test_a_killed_holder_leaves_no_stale_lock(holder):
    save, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (save / LOCK_FILE).is_file()  # the file stays; the kernel dropped the lock with the process
    with SaveLock.acquire(save) as lock:
        assert lock.owned and lock.holder.pid == os.getpid()
    with SaveLock.acquire(save):  # released again
        pass
    with SaveLock.acquire(save / "new"):  # a folder made for a lock and left empty goes with it
        assert (save / "new" / LOCK_FILE).is_file()
    assert not (save / "new").exists()


def test_the_launchers_lock_is_the_jobs_own_and_no_one_elses(tmp_path):
    save = tmp_path / "run"
    with SaveLock.acquire(save, inheritable=True) as launcher:
        job = SaveLock.acquire(save, job_token=launcher.env()[TOKEN_ENV])  # rank 0 of the job it started
        assert not job.owned and job.holder == launcher.holder
        with pytest.raises(SaveInUseError, match=f"pid {os.getpid()}"):
            SaveLock.acquire(save, job_token="another job's token")


def test_the_main_job_on_a_save_in_use_stops_before_any_work(holder, capsys):
    """Two jobs on one --save used to both run, their metrics interleaved and their checkpoints mixed."""
    from granular_moe.training.pretrain import main

    save, process = holder
    assert main(TINY + ["--save", str(save)]) == 2
    error = capsys.readouterr().err
    assert error.count("pretrain_gpt_moe: error:") == 1 and f"pid {process.pid}" in error
    assert sorted(p.name for p in save.iterdir()) == [LOCK_FILE]  # no metrics, no checkpoint


def test_the_launcher_refuses_a_save_in_use_before_starting_anything(holder, capsys, monkeypatch):
    from granular_moe.training import launch

    save, process = holder
    monkeypatch.setattr(launch.os, "execvpe", lambda *a: pytest.fail("the launcher started the job"))
    assert launch.main(["torchrun", "--script", str(SCRIPT), "--nproc-per-node", "2", *TINY,
                        "--save", str(save)], {"PATH": os.environ["PATH"]}) == 2
    error = capsys.readouterr().err
    assert f"granular-moe launch: error: --save {save} is in use by another job" in error
    assert f"pid {process.pid}" in error
