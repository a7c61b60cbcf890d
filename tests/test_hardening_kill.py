"""Killing the launcher stops the job: `kill -9` of the launcher's process group mid-run leaves no worker
behind (torchrun's workers used to live on in their own groups, training and saving), and nothing more is
saved. While the job runs, a second one on its --save is refused naming it; --resume-if-exists on an empty
--save says it starts from scratch."""

import os
import signal
import subprocess
import time
from pathlib import Path

from granular_moe.training.metrics import read_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--micro-batch-size", "4",
        "--corpus-max-bytes", "300000", "--eval-iters", "1", "--eval-interval", "1000"]


class SecondJobStarted(Exception):
    """Raised in place of the exec of a second launcher: it would have started its job."""


def processes_naming(text: str) -> list[int]:
    """Live processes (not zombies) whose command line names ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in command and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def snapshot(save: Path):
    tracker = save / "latest_checkpointed_iteration.txt"
    return (tracker.read_text() if tracker.exists() else None, (save / "metrics.jsonl").stat().st_size,
            sorted(p.name for p in save.iterdir()))


def job_environment() -> dict:
    """This environment without what a launcher reads as its own rendezvous (the test session's gloo world sets
    MASTER_ADDR / MASTER_PORT for itself: a job given that port would find it taken)."""
    from test_launch_scripts import LAUNCH_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return dict(env, PYTHONPATH=str(ROOT))


def test_killing_the_launchers_process_group_stops_every_worker_and_every_save(tmp_path, capsys, monkeypatch):
    from granular_moe.training import launch

    def second_job_started(*args):
        raise SecondJobStarted

    monkeypatch.setattr(launch.os, "execvpe", second_job_started)

    save = tmp_path / "run"
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    job = subprocess.Popen(
        ["bash", str(SCRIPT), "--nproc-per-node", "2", *TINY, "--train-iters", "5000", "--log-interval", "1",
         "--save-interval", "2", "--save", str(save), "--load", str(save), "--resume-if-exists"],
        stdout=out, stderr=err, start_new_session=True, env=job_environment())
    try:
        wait_for(lambda: (save / "metrics.jsonl").exists() and len(read_records(save / "metrics.jsonl")) >= 3,
                 300, "the job's third logged step")
        assert len(processes_naming(str(save))) >= 3  # torchrun (the launcher, exec'd) and its 2 workers

        try:  # a second job on the same --save
            second = launch.main(["torchrun", "--script", str(SCRIPT), "--nproc-per-node", "2", *TINY,
                                  "--save", str(save)], {"PATH": os.environ["PATH"]})
        except SecondJobStarted:
            second = "started"

        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        wait_for(lambda: not processes_naming(str(save)), 20, "the workers to die with the launcher")
        before = snapshot(save)
        time.sleep(5)
        assert snapshot(save) == before  # nothing more logged or saved

        assert second == 2
        message = capsys.readouterr().err
        assert f"--save {save} is in use by another job" in message and f"pid {job.pid}" in message
    finally:
        for pid in processes_naming(str(save)):  # on failure: the workers this test started
            os.kill(pid, signal.SIGKILL)
        out.close()
        err.close()
    assert "--resume-if-exists: --load" in (tmp_path / "stdout").read_text()
    assert "holds no checkpoint yet; starting from scratch" in (tmp_path / "stdout").read_text()
