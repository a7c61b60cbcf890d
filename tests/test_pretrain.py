"""The main job on gloo processes: it trains and logs, its checkpoints survive a kill, and a killed run
resumed from its last checkpoint follows the loss curve of the run that was never killed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from granular_moe.training.metrics import read_records

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--moe-aux-loss-coeff", "0.01",
        "--moe-z-loss-coeff", "0.001", "--micro-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "2",
        "--corpus-max-bytes", "300000", "--eval-iters", "1", "--seed", "5"]


def run_main(rank, world_size, argv):
    from granular_moe.training.pretrain import main

    return main(argv)


def test_main_job_trains_logs_and_saves_on_two_processes(tmp_path):
    save = tmp_path / "run"
    argv = TINY + ["--train-iters", "24", "--log-interval", "4", "--eval-interval", "12", "--save", str(save),
                   "--save-interval", "12", "--tensorboard-dir", str(tmp_path / "tb"),
                   "--expert-model-parallel-size", "2"]
    assert run_distributed(run_main, 2, argv) == [0, 0]
    records = read_records(save / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["iteration"] for r in records if "valid_loss" in r] == [12, 24]
    first = train[0]
    assert first["tokens"] == 4 * 2 * 4 * 32 and first["tokens_per_second"] > 0 and first["eta_s"] >= 0
    assert set(first["moe"]) == {"layer_1", "layer_2"}
    layer = first["moe"]["layer_1"]
    assert layer["dropped"] == 0 and layer["load_imbalance"] >= 1.0 and layer["load_balancing_loss"] > 0.9
    assert layer["z_loss"] > 0
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "24"
    assert sorted(p.name for p in (save / "iter_0000024").iterdir()) == [
        "metadata.json",
        "rank_00000.pt",
        "rank_00001.pt",
    ]
    shards = [torch.load(save / "iter_0000024" / f"rank_0000{r}.pt", weights_only=False) for r in range(2)]
    ids = [s["model"]["decoder.layers.0.mlp.experts.global_expert_ids"].tolist() for s in shards]
    assert ids == [list(range(8)), list(range(8, 16))]
    assert (save / "loss.png").stat().st_size > 10_000
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--expert-model-parallel-size", "3"], "16 experts are not divisible by --expert-model-parallel-size 3; "
     "valid values: 1, 2, 4, 8, 16"),
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size (TP) 2 x --pipeline-model-parallel-size "
     "(PP) 1 = 2 does not divide the 1 processes"),
    (["--bf16"], "--bf16 needs a GPU"),
    (["--train-iters", "20", "--lr-warmup-iters", "50"], "--lr-warmup-iters 50 must lie in 0..--lr-decay-iters - 1"),
    (["--min-lr", "0.1"], "--min-lr 0.1 must lie in 0..--lr 0.003"),
    (["--save-interval", "0"], "--save-interval must be >= 1, got 0"),
    (["--moe-layer-freq", "[1,0,1]"], "--moe-layer-freq lists 3 layers, --num-layers is 2"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    from granular_moe.training.pretrain import main

    assert main(TINY + flags + ["--save", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("lr-decay-style: inverse-square-root\n",
     "--lr-decay-style 'inverse-square-root' is not valid; valid values: constant, linear, cosine"),
    ("moe-router-dtype: fp16\n", "--moe-router-dtype 'fp16' is not valid; valid values: fp32, fp64"),
    ("bf16: true\nfp32: true\n", "--bf16 and --fp32 exclude each other"),
])
def test_config_file_values_are_checked_like_flags(tmp_path, capsys, yaml_text, message):
    from granular_moe.training.pretrain import main

    config = tmp_path / "job.yaml"
    config.write_text(yaml_text)
    assert main(TINY + ["--config", str(config), "--save", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_null_leaves_a_flag_unset(tmp_path):
    from granular_moe.training.arguments import parse_args

    config = tmp_path / "job.yaml"
    config.write_text("moe-router-dtype: null\ndistributed-backend: null\n")
    args = parse_args(TINY + ["--config", str(config)])
    assert args.moe_router_dtype is None and args.distributed_backend is None


def torchrun(argv, entry, **env):
    environment = dict(os.environ, GRANULAR_MOE_ENTRY=entry, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"), *argv]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_on_the_uninterrupted_loss_curve(tmp_path):
    """With dropout and evaluations between steps: both draw randomness the resumed run must draw alike."""
    common = TINY + ["--train-iters", "8", "--log-interval", "1", "--eval-interval", "3", "--save-interval", "4",
                     "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    clean = torchrun(common + ["--save", str(tmp_path / "clean")], "granular_moe.training.pretrain")
    assert clean.returncode == 0, clean.stderr[-3000:]

    crashed = tmp_path / "crashed"
    killed = torchrun(common + ["--save", str(crashed)], "pretrain_fault_fixture", KILL_AFTER_ITERATION="6")
    assert killed.returncode != 0
    assert (crashed / "latest_checkpointed_iteration.txt").read_text() == "4"
    logged = [r["iteration"] for r in read_records(crashed / "metrics.jsonl") if "loss" in r]
    assert logged == [1, 2, 3, 4, 5]  # iteration 6 ran, then the kill: never logged, never saved

    resumed = torchrun(common + ["--save", str(crashed), "--load", str(crashed)], "granular_moe.training.pretrain")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at iteration 4" in resumed.stdout
    expected = {r["iteration"]: r["loss"] for r in read_records(tmp_path / "clean" / "metrics.jsonl") if "loss" in r}
    got = {r["iteration"]: r["loss"] for r in read_records(crashed / "metrics.jsonl") if "loss" in r}
    assert sorted(got) == list(range(1, 9))
    for iteration in range(1, 9):
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-6, abs=1e-6), iteration
