"""Launch: layout checks, the distributed environment, and each route's per-node commands (dry runs),
checked in-process; the shell scripts and real launches (torchrun, mpirun) in test_launch_scripts.py."""

import argparse
import re
import shlex
import sys

import pytest

from granular_moe.training import distributed, launch
from granular_moe.training.arguments import parse_args
from granular_moe.training.launch import LaunchConfigError, check_layout, distributed_env

ROOT = launch.REPO_ROOT
SCRIPT = ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"
BASE = str(ROOT / "configs" / "moe_base.yaml")


def dry_run(route, *argv, env=None, capsys):
    """Run ``launch.main`` for ``route`` and return (exit code, stdout, stderr)."""
    code = launch.main([route, *argv], environ={"PYTHONPATH": str(ROOT), **(env or {})})
    out, err = capsys.readouterr()
    return code, out, err


def node_blocks(text):
    """The rendered plan's node blocks: {node: {"host", "env": {...}, "run": [...], "ranks": {...}, "source"}}."""
    blocks, current = {}, None
    for line in text.splitlines():
        header = re.fullmatch(r"node (\d+):(?: host (\S+))?", line)
        if header:
            current = blocks.setdefault(int(header.group(1)), {"host": header.group(2)})
        elif current is not None and line.startswith("  "):
            key, _, value = line.strip().partition(": ")
            if key == "env":
                current["env"] = dict(item.split("=", 1) for item in shlex.split(value))
            elif key == "run":
                current["run"] = shlex.split(value)
            elif key == "ranks":
                current["ranks"] = dict(re.findall(r"(\w+)=(\S+)", value))
                current["source"] = re.search(r"\(set by (.*)\)$", value).group(1)
    return blocks


def flag(command, name):
    return command[command.index(name) + 1]


def step_line(text):
    return shlex.split(next(line for line in text.splitlines() if line.startswith("step: "))[len("step: "):])


# --------------------------------------------------------------------------- layout


def layout_args(*argv):
    return parse_args(["--num-layers", "8", "--num-attention-heads", "8", *argv])


def test_layout_of_a_valid_moe_job():
    args = layout_args("--num-experts", "8", "--moe-granularity", "4", "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "4",
                       "--sequence-parallel")
    layout = check_layout(args, 16)
    assert (layout.data, layout.expert_data, layout.num_experts) == (4, 2, 32)
    assert layout.describe() == "16 ranks = TP 2 x PP 2 x DP 4; 32 experts over EP 4 (8 per rank), expert DP 2"


@pytest.mark.parametrize("argv, world, expected", [
    (["--tensor-model-parallel-size", "3"], 16, "TP) 3 x --pipeline-model-parallel-size (PP) 1 = 3 does not divide "
     "the 16 processes (WORLD_SIZE 16); valid TP x PP: 1, 2, 4, 8, 16"),
    (["--num-experts", "8", "--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "4"], 8,
     "(EP) 4 x --pipeline-model-parallel-size (PP) 4 = 16 does not divide the 8 processes (WORLD_SIZE 8): "
     "megatron-core builds expert groups of expert-TP 1 x EP x PP; valid EP with PP 4 and 8 experts: 1, 2"),
    (["--expert-model-parallel-size", "2"], 4, "(EP) 2 needs an MoE model: set --num-experts, or EP 1"),
    (["--pipeline-model-parallel-size", "3"], 6, "--num-layers 8 is not divisible by --pipeline-model-parallel-size "
     "(PP) 3; valid PP: 1, 2, 4, 8"),
    (["--tensor-model-parallel-size", "16", "--sequence-parallel"], 16, "--num-attention-heads 8 is not divisible "
     "by --tensor-model-parallel-size (TP) 16; valid TP: 1, 2, 4, 8"),
    (["--sequence-parallel"], 4, "--sequence-parallel needs --tensor-model-parallel-size (TP) > 1"),
    (["--global-batch-size", "20", "--micro-batch-size", "4"], 2, "--global-batch-size 20 is not a multiple of "
     "--micro-batch-size 4 x DP 2 = 8"),
    (["--tensor-model-parallel-size", "0"], 4, "--tensor-model-parallel-size (TP) must be >= 1, got 0"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
     "--seq-length 33 is not divisible by --tensor-model-parallel-size (TP) 2, which --sequence-parallel splits"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--seq-length", "33", "--micro-batch-size", "1"],
     2, "--seq-length 33 x --micro-batch-size 1 tokens are not divisible by --tensor-model-parallel-size (TP) 2"),
])
def test_each_layout_violation_names_its_flags_and_valid_values(argv, world, expected):
    with pytest.raises(LaunchConfigError, match=re.escape(expected)):
        check_layout(layout_args(*argv), world)


def test_layout_reports_every_violation_at_once():
    args = layout_args("--tensor-model-parallel-size", "3", "--pipeline-model-parallel-size", "3")
    with pytest.raises(LaunchConfigError) as error:
        check_layout(args, 16, "NNODES 2 x NPROC_PER_NODE 8")
    message = str(error.value)
    assert "(NNODES 2 x NPROC_PER_NODE 8)" in message
    assert "--num-layers 8 is not divisible" in message and "--num-attention-heads 8 is not divisible" in message


def test_dense_and_moe_layouts_that_megatron_core_accepts():
    assert check_layout(layout_args("--tensor-model-parallel-size", "2"), 4).describe() == \
        "4 ranks = TP 2 x PP 1 x DP 2; dense"
    # EP may exceed DP: expert groups span TP ranks (expert-TP 1).
    args = layout_args("--num-experts", "8", "--tensor-model-parallel-size", "4", "--sequence-parallel",
                       "--expert-model-parallel-size", "8")
    assert check_layout(args, 8).expert_data == 1
    # The granular layer shares tokens out over TP ranks without sequence parallelism too.
    no_sp = layout_args("--num-experts", "4", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2")
    assert (
        check_layout(no_sp, 4).describe()
        == "4 ranks = TP 2 x PP 1 x DP 2; 4 experts over EP 2 (2 per rank), expert DP 2"
    )


# --------------------------------------------------------------------------- flags and environment


def test_trainer_argv_takes_tp_pp_ep_from_the_environment():
    argv = launch.trainer_argv(
        ["--num-layers", "4", "--pipeline-model-parallel-size=2"], {"TP": "2", "PP": "2", "EP": "4"}
    )
    assert argv == ["--num-layers", "4", "--pipeline-model-parallel-size=2", "--tensor-model-parallel-size", "2",
                    "--expert-model-parallel-size", "4"]


def test_trainer_argv_defaults_to_the_embedded_config():
    assert launch.trainer_argv([], {}) == ["--config", str(ROOT / "configs" / "cpu_default.yaml")]


@pytest.mark.parametrize("argv, env, expected", [
    (["--tensor-model-parallel-size", "4"], {"TP": "2"}, "--tensor-model-parallel-size 4 disagrees with TP=2"),
    ([], {"EP": "two"}, "EP (--expert-model-parallel-size) must be an integer >= 1, got 'two'"),
    ([], {"PP": "0"}, "PP (--pipeline-model-parallel-size) must be an integer >= 1, got '0'"),
])
def test_trainer_argv_rejects_bad_or_conflicting_sizes(argv, env, expected):
    with pytest.raises(LaunchConfigError, match=re.escape(expected)):
        launch.trainer_argv(argv, env)


def test_launcher_flags_are_taken_out_and_merged_with_their_variables():
    settings, rest = launch.split_launcher_args(
        "torchrun", ["--nnodes", "2", "--lr", "1e-3", "--node-rank=1", "--dry-run", "--script", "x.sh"],
        {"NPROC_PER_NODE": "4", "MASTER_ADDR": "head", "NNODES": "2"},
    )
    assert rest == ["--lr", "1e-3"]
    assert (settings.nnodes, settings.nproc_per_node, settings.node_rank, settings.master_addr) == (2, 4, 1, "head")
    assert settings.dry_run and settings.extra == {"--script": "x.sh"}


@pytest.mark.parametrize("argv, env, expected", [
    (["--nnodes", "2"], {"NNODES": "4"}, "--nnodes 2 disagrees with NNODES=4"),
    ([], {"NPROC_PER_NODE": "-1"}, "--nproc-per-node (NPROC_PER_NODE) must be an integer >= 1, got '-1'"),
    (["--master-port"], {}, "--master-port needs a value"),
])
def test_launcher_flags_errors(argv, env, expected):
    with pytest.raises(LaunchConfigError, match=re.escape(expected)):
        launch.split_launcher_args("torchrun", argv, env)


def test_default_processes_per_node(monkeypatch):
    monkeypatch.setattr(launch, "local_gpu_count", lambda: 0)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    assert launch.default_nproc_per_node({}) == 2
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 1)
    assert launch.default_nproc_per_node({}) == 1
    monkeypatch.setattr(launch, "local_gpu_count", lambda: 4)
    assert launch.default_nproc_per_node({}) == 4
    assert launch.default_nproc_per_node({"SLURM_GPUS_PER_NODE": "h100:8"}) == 8


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a,b", ["a", "b"]),
    ("rack[1-2]-gpu[9-10],login", ["rack1-gpu9", "rack1-gpu10", "rack2-gpu9", "rack2-gpu10", "login"]),
    ("gpu[001-016]", [f"gpu{i:03d}" for i in range(1, 17)]),
])
def test_expand_nodelist(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-", "node[3-1]", "a,,b", "node[x]"])
def test_expand_nodelist_rejects_malformed_lists(nodelist):
    with pytest.raises(LaunchConfigError, match="node list"):
        distributed.expand_nodelist(nodelist)


# --------------------------------------------------------------------------- distributed_env


def test_distributed_env_under_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "head", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert distributed_env(env) == distributed.DistributedEnv(5, 8, 1, 4, "head", 1234, 1, "torchrun")


def test_distributed_env_slurm_task_per_gpu():
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    result = distributed_env(env)
    assert result == distributed.DistributedEnv(9, 16, 1, 8, "gpu07", 10000 + 123456 % 20000, 1, "slurm")
    assert result.init_method == "tcp://gpu07:13456"
    assert distributed_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"}).init_method == "tcp://10.0.0.1:4000"


def test_a_slurm_batch_script_is_one_process_not_a_task():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "7"}
    result = distributed_env(env)
    assert (result.rank, result.world_size, result.launcher) == (0, 1, "single")


def test_mpi_launcher_variables_win_over_the_allocations_slurm_variables():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "node01", "SLURM_PROCID": "1",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[01-02]"}
    assert distributed_env(env) == distributed.DistributedEnv(5, 8, 1, 4, "node01", 29500, 1, "openmpi")
    mpich = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
             "MASTER_ADDR": "n0", "MASTER_PORT": "777"}
    assert distributed_env(mpich) == distributed.DistributedEnv(3, 4, 1, 2, "n0", 777, 1, "mpich")


def test_mpi_without_master_addr_needs_mpi4py(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi4py_world", lambda: None)
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    with pytest.raises(LaunchConfigError, match="MASTER_ADDR is not set and mpi4py is not importable"):
        distributed_env(env)
    one = {"PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}
    assert distributed_env(one).master_addr == "127.0.0.1"


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "inconsistent torchrun environment"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK/WORLD_SIZE are set without MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "RANK must be an integer >= 0, got 'x'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
     "SLURM_NODEID 2 is beyond the tasks per node"),
])
def test_distributed_env_rejects_inconsistent_environments(env, expected):
    with pytest.raises(LaunchConfigError, match=re.escape(expected)):
        distributed_env(env)


def test_single_process_and_export():
    result = distributed_env({})
    assert (result.rank, result.world_size, result.local_rank, result.master_addr, result.launcher) == \
        (0, 1, 0, "127.0.0.1", "single")
    exported = {}
    result.export(exported)
    assert exported == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(result.master_port), "NODE_RANK": "0"}


# --------------------------------------------------------------------------- dry runs: torchrun route


def test_torchrun_route_on_one_cpu_node_runs_the_embedded_default(capsys, monkeypatch):
    monkeypatch.setattr(launch, "local_gpu_count", lambda: 0)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    code, out, _ = dry_run("torchrun", "--script", str(SCRIPT), "--dry-run", capsys=capsys)
    assert code == 0
    assert "layout: 2 ranks = TP 1 x PP 1 x DP 2; 16 experts over EP 1 (16 per rank), expert DP 2" in out
    node = node_blocks(out)[0]
    assert node["run"] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), "--config", str(ROOT / "configs" / "cpu_default.yaml")]
    assert node["env"]["OMP_NUM_THREADS"] == "1"
    assert node["ranks"] == {"RANK": "0-1", "LOCAL_RANK": "0-1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                             "GROUP_RANK": "0"}
    assert node["source"] == "torchrun; --standalone: MASTER_ADDR/MASTER_PORT on a free local port"


def test_torchrun_route_on_two_nodes(capsys):
    env = {"NNODES": "2", "NPROC_PER_NODE": "4", "MASTER_ADDR": "10.0.0.1", "TP": "2", "PP": "2", "EP": "2"}
    code, out, _ = dry_run("torchrun", "--script", str(SCRIPT), "--dry-run", "--num-experts", "4",
                           "--sequence-parallel", "--num-layers", "4", env=env, capsys=capsys)
    assert code == 0
    blocks = node_blocks(out)
    assert sorted(blocks) == [0, 1] and blocks[0]["host"] == "10.0.0.1"
    for node, block in blocks.items():
        command = block["run"]
        assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert (
            flag(command, "--nnodes"),
            flag(command, "--node-rank"),
            flag(command, "--master-addr"),
            flag(command, "--master-port"),
            flag(command, "--nproc-per-node"),
        ) == ("2", str(node), "10.0.0.1", "29500", "4")
        trainer = command[command.index(str(SCRIPT)) + 1:]
        assert trainer == ["--num-experts", "4", "--sequence-parallel", "--num-layers", "4",
                           "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--expert-model-parallel-size", "2"]
        assert block["ranks"]["RANK"] == f"{4 * node}-{4 * node + 3}" and block["ranks"]["GROUP_RANK"] == str(node)
        assert block["ranks"]["WORLD_SIZE"] == "8" and block["ranks"]["MASTER_ADDR"] == "10.0.0.1"


def test_a_real_multi_node_torchrun_launch_needs_node_rank_and_master_addr(capsys):
    code, out, err = dry_run("torchrun", "--script", str(SCRIPT), env={"NNODES": "2", "NPROC_PER_NODE": "1"},
                             capsys=capsys)
    assert (code, out) == (2, "") and "NNODES 2 needs MASTER_ADDR (node 0's address) on every node" in err
    code, out, err = dry_run("torchrun", "--script", str(SCRIPT),
                             env={"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "h"}, capsys=capsys)
    assert (code, out) == (2, "") and "NNODES 2 needs NODE_RANK (this node's index, 0..1)" in err


@pytest.mark.parametrize("route, env", [
    ("torchrun", {"NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "h", "TP": "3"}),
    ("slurm", {"SLURM_JOB_NODELIST": "gpu[01-16]", "NPROC_PER_NODE": "8", "PP": "5"}),
    ("mpirun", {"HOSTS": "a,b", "NPROC_PER_NODE": "2", "PP": "3", "MPI_FLAVOR": "mpich"}),
])
def test_invalid_layouts_fail_before_printing_a_plan(route, env, capsys):
    code, out, err = dry_run(route, "--script", str(SCRIPT), "--dry-run", "--config", BASE, env=env, capsys=capsys) \
        if route == "torchrun" else dry_run(route, "--dry-run", "--config", BASE, env=env, capsys=capsys)
    assert code == 2 and out == ""
    assert err.startswith("granular-moe launch: error: invalid parallel layout:")


NODE_SIZE = {"torchrun": "LOCAL_WORLD_SIZE", "slurm": "LOCAL_WORLD_SIZE", "mpirun": "MPI_LOCALNRANKS"}


@pytest.mark.parametrize("route, env", [
    ("torchrun", {"NNODES": "2", "NPROC_PER_NODE": "4", "MASTER_ADDR": "h", "EP": "8"}),
    ("slurm", {"SLURM_JOB_NODELIST": "gpu[01-02]", "NPROC_PER_NODE": "4", "EP": "8"}),
    ("mpirun", {"HOSTS": "a,b", "NPROC_PER_NODE": "4", "EP": "8", "MPI_FLAVOR": "mpich"}),
])
def test_every_route_gives_the_node_size_and_shows_a_two_level_expert_group(route, env, capsys):
    argv = ("--dry-run", "--config", BASE)
    code, out, _ = dry_run(route, "--script", str(SCRIPT), *argv, env=env, capsys=capsys) \
        if route == "torchrun" else dry_run(route, *argv, env=env, capsys=capsys)
    assert code == 0
    assert "64 experts over EP 8 (8 per rank), expert DP 1; each EP group spans 2 nodes of 4 ranks: two-level" in out
    assert all(block["ranks"][NODE_SIZE[route]] == "4" for block in node_blocks(out).values())


def test_an_expert_group_split_unevenly_over_nodes_is_refused_before_a_plan(capsys):
    env = {"NNODES": "3", "NPROC_PER_NODE": "4", "MASTER_ADDR": "h", "EP": "6"}
    argv = ("--script", str(SCRIPT), "--dry-run", "--num-experts", "12")
    code, out, err = dry_run("torchrun", *argv, env=env, capsys=capsys)
    assert code == 2 and out == ""
    assert ("the expert-parallel group of ranks [0, 1, 2, 3, 4, 5] spans nodes of 4 processes unevenly (node 0: 4, "
            "node 1: 2 of its ranks): --expert-model-parallel-size (EP) must divide the ranks per node "
            "(--moe-ranks-per-node, LOCAL_WORLD_SIZE or the launcher's --nproc-per-node) or be a multiple of "
            "them") in err
    code, out, _ = dry_run("torchrun", *argv, "--moe-ranks-per-node", "2", env=env, capsys=capsys)
    assert code == 0 and "each EP group spans 3 nodes of 2 ranks" in out


# --------------------------------------------------------------------------- dry runs: SLURM


def test_slurm_torchrun_mode_on_16_nodes(capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[001-016]", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242",
           "SLURM_CPUS_ON_NODE": "96", "TP": "2", "PP": "4", "EP": "8"}
    code, out, _ = dry_run("slurm", "--dry-run", "--config", BASE, "--sequence-parallel", env=env, capsys=capsys)
    assert code == 0
    assert "layout: 128 ranks = TP 2 x PP 4 x DP 16; 64 experts over EP 8 (8 per rank), expert DP 4" in out
    port = str(10000 + 4242 % 20000)
    step = step_line(out)
    assert step[:11] == ["srun", "--nodes", "16", "--ntasks", "16", "--ntasks-per-node", "1", "--cpus-per-task", "96",
                         "--kill-on-bad-exit=1", sys.executable]
    blocks = node_blocks(out)
    assert [blocks[i]["host"] for i in range(16)] == [f"gpu{i:03d}" for i in range(1, 17)]
    for block in blocks.values():
        command = block["run"]
        assert command == step[10:]
        assert (
            flag(command, "--nnodes"),
            flag(command, "--nproc-per-node"),
            flag(command, "--rdzv-backend"),
            flag(command, "--rdzv-endpoint"),
            flag(command, "--rdzv-id"),
        ) == ("16", "8", "c10d", f"gpu001:{port}", "4242")
        assert command[command.index("--config") - 1] == str(SCRIPT)
        assert (flag(command, "--tensor-model-parallel-size"), flag(command, "--pipeline-model-parallel-size"),
                flag(command, "--expert-model-parallel-size")) == ("2", "4", "8")
        assert block["env"]["OMP_NUM_THREADS"] == "12"
        assert block["ranks"]["WORLD_SIZE"] == "128" and block["ranks"]["LOCAL_WORLD_SIZE"] == "8"
        assert block["source"].endswith(f"in the order nodes join the c10d rendezvous at gpu001:{port}")


def test_slurm_per_gpu_mode_on_two_nodes(capsys):
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "NPROC_PER_NODE": "8", "LAUNCH_MODE": "srun-per-gpu",
           "SLURM_JOB_ID": "17", "SLURM_CPUS_ON_NODE": "64", "EP": "16"}
    code, out, _ = dry_run("slurm", "--dry-run", "--config", BASE, env=env, capsys=capsys)
    assert code == 0
    step = step_line(out)
    assert step[:10] == ["srun", "--nodes", "2", "--ntasks", "16", "--ntasks-per-node", "8", "--cpus-per-task", "8",
                         "--kill-on-bad-exit=1"]
    assert step[10:14] == [sys.executable, "-m", "granular_moe.training.pretrain", "--config"]
    blocks = node_blocks(out)
    for node, host in enumerate(["n1", "n2"]):
        assert blocks[node]["host"] == host and blocks[node]["run"] == step[10:]
        assert blocks[node]["env"]["MASTER_ADDR"] == "n1" and blocks[node]["env"]["MASTER_PORT"] == "10017"
        assert blocks[node]["ranks"] == {"SLURM_PROCID": f"{8 * node}-{8 * node + 7}", "SLURM_LOCALID": "0-7",
                                         "SLURM_NODEID": str(node), "SLURM_STEP_NUM_TASKS": "16"}
        assert flag(blocks[node]["run"], "--expert-model-parallel-size") == "16"


def test_slurm_dry_run_without_an_allocation_uses_placeholder_hosts(capsys):
    code, out, _ = dry_run("slurm", "--dry-run", "--nnodes", "1", "--nproc-per-node", "2", env={}, capsys=capsys)
    assert code == 0 and "note: no SLURM_JOB_NODELIST" in out
    assert node_blocks(out)[0]["host"] == "node0"


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        ([], {}, "not inside a SLURM allocation (no SLURM_JOB_NODELIST)"),
        (
            ["--dry-run"],
            {"LAUNCH_MODE": "mpi"},
            "LAUNCH_MODE / --launch-mode 'mpi' is not valid; valid values: torchrun, srun-per-gpu",
        ),
        (["--dry-run", "--nnodes", "3"], {"SLURM_JOB_NODELIST": "a,b"}, "NNODES 3 disagrees with the 2 hosts of 'a,b'"),
    ],
)
def test_slurm_route_errors(argv, env, expected, capsys):
    code, out, err = dry_run("slurm", "--nproc-per-node", "1", *argv, env=env, capsys=capsys)
    assert code == 2 and out == "" and expected in err


# --------------------------------------------------------------------------- dry runs: mpirun


def test_mpirun_route_mpich_on_16_nodes(capsys):
    env = {"HOSTS": "node[01-16]", "NPROC_PER_NODE": "4", "MPI_FLAVOR": "mpich", "TP": "4", "EP": "8"}
    code, out, _ = dry_run("mpirun", "--dry-run", "--config", BASE, "--sequence-parallel", env=env, capsys=capsys)
    assert code == 0
    hosts = ",".join(f"node{i:02d}" for i in range(1, 17))
    step = step_line(out)
    assert step[:7] == ["mpirun", "-np", "64", "-ppn", "4", "-hosts", hosts]
    assert ["-genv", "MASTER_ADDR", "node01"] == step[step.index("MASTER_ADDR") - 1:step.index("MASTER_ADDR") + 2]
    entry = step.index(sys.executable)
    assert step[entry:entry + 3] == [sys.executable, "-m", "granular_moe.training.pretrain"]
    blocks = node_blocks(out)
    assert blocks[15]["host"] == "node16" and blocks[15]["run"] == step[entry:]
    assert blocks[15]["ranks"] == {"PMI_RANK": "60-63", "MPI_LOCALRANKID": "0-3", "PMI_SIZE": "64",
                                   "MPI_LOCALNRANKS": "4"}
    assert blocks[3]["env"]["MASTER_PORT"] == "29500"


def test_mpirun_route_openmpi_on_two_nodes(capsys):
    env = {"NPROC_PER_NODE": "2", "MPI_FLAVOR": "openmpi", "PP": "2", "GRANULAR_MOE_ENTRY": "my.entry"}
    code, out, _ = dry_run("mpirun", "--dry-run", "--hosts", "a,b", "--num-layers", "4", env=env, capsys=capsys)
    assert code == 0
    step = step_line(out)
    assert step[:7] == ["mpirun", "-np", "4", "--map-by", "ppr:2:node", "-H", "a:2,b:2"]
    assert "MASTER_ADDR=a" in step and f"PYTHONPATH={ROOT}" in step and "GRANULAR_MOE_ENTRY=my.entry" in step
    assert step[-7:] == [sys.executable, "-m", "my.entry", "--num-layers", "4", "--pipeline-model-parallel-size", "2"]
    assert node_blocks(out)[1]["ranks"]["OMPI_COMM_WORLD_RANK"] == "2-3"


def test_mpirun_route_on_one_node_needs_no_hosts(capsys):
    code, out, _ = dry_run("mpirun", "--dry-run", "--nproc-per-node", "2", env={"MPI_FLAVOR": "mpich"}, capsys=capsys)
    assert code == 0
    assert step_line(out)[:5] == ["mpirun", "-np", "2", "-ppn", "2"] and "-hosts" not in step_line(out)
    assert node_blocks(out)[0]["env"]["MASTER_ADDR"] == "127.0.0.1"


def test_mpirun_route_errors(capsys):
    code, out, err = dry_run("mpirun", "--nnodes", "2", "--nproc-per-node", "1", env={}, capsys=capsys)
    assert code == 2 and "NNODES 2 needs HOSTS (or --hosts)" in err
    code, out, err = dry_run("mpirun", "--dry-run", "--nproc-per-node", "1", env={"MPI_FLAVOR": "intel"}, capsys=capsys)
    assert code == 2 and "MPI_FLAVOR / --mpi-flavor 'intel' is not valid; valid values: mpich, openmpi" in err


# --------------------------------------------------------------------------- check and the worker


def test_check_command(capsys):
    code, out, _ = dry_run("check", "--nnodes", "2", "--nproc-per-node", "8", "--config", BASE,
                           env={"EP": "8", "PP": "2"}, capsys=capsys)
    assert (code, out) == (0, "layout: 16 ranks = TP 1 x PP 2 x DP 8; 64 experts over EP 8 (8 per rank), expert DP 1\n")


def test_worker_runs_the_entry_with_the_trainers_flags(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    env = {"GRANULAR_MOE_ENTRY": "launch_fixture_entry", "LAUNCH_FIXTURE_OUT": str(tmp_path), "EP": "2"}
    monkeypatch.setattr(launch.os, "environ", env)
    assert launch.run_worker(["--num-experts", "4"]) == 0
    record = __import__("json").loads((tmp_path / "rank0.json").read_text())
    assert record["argv"] == ["--num-experts", "4", "--expert-model-parallel-size", "2"]
    assert (record["world_size"], record["launcher"]) == (1, "single")


def test_worker_dry_run_prints_the_command(capsys):
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "GRANULAR_MOE_ENTRY": "some.module"}
    assert launch.run_worker(["--dry-run"], env) == 0
    assert capsys.readouterr().out == (f"rank 1 of 2 (torchrun): {sys.executable} -m some.module --config "
                                       f"{ROOT / 'configs' / 'cpu_default.yaml'}\n")


def test_usage(capsys):
    assert launch.main(["--help"]) == 0
    assert "TP, PP and EP set" in capsys.readouterr().out
    assert launch.main(["bogus"]) == 2
    assert "commands:" in capsys.readouterr().err


def test_namespace_built_by_hand_is_checked_too():
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              expert_model_parallel_size=3, num_experts=8, num_layers=2, num_attention_heads=2,
                              sequence_parallel=False, global_batch_size=None, micro_batch_size=1, seq_length=16)
    with pytest.raises(LaunchConfigError, match="8 experts .* not divisible by --expert-model-parallel-size"):
        check_layout(args, 3)
