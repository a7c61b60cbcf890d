"""The main job on gloo processes: it trains and logs, its checkpoints survive a kill, a killed run resumed
from its last checkpoint follows the loss curve of the run that was never killed, and bad input stops it
before any work with one message, printed once."""

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
    files = {p.name for p in (save / "iter_0000024").iterdir()}
    assert {".metadata", "metadata.json"} <= files and any(name.endswith(".distcp") for name in files)
    assert (save / "loss.png").stat().st_size > 10_000
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--expert-model-parallel-size", "3"], "16 experts are not divisible by --expert-model-parallel-size 3; "
     "valid values: 1, 2, 4, 8, 16"),
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size (TP) 2 x --pipeline-model-parallel-size "
     "(PP) 1 = 2 does not divide the 1 processes"),
    (["--moe-expert-capacity-factor", "-1"], "--moe-expert-capacity-factor must be > 0, got -1; leave it unset"),
    (["--load", "{tmp}/typo"], "/typo: no such folder (a typo? to start from scratch, drop --load)"),
    (["--data-path", "{tmp}/absent", "--tokenizer-model", "{tmp}/tok.model"],
     "--tokenizer-model {tmp}/tok.model: no such"),
    (["--resume-if-exists"], "--resume-if-exists needs --load"),
    (["--train-iters", "20", "--lr-warmup-iters", "50"], "--lr-warmup-iters 50 must lie in 0..--lr-decay-iters - 1"),
    (["--min-lr", "0.1"], "--min-lr 0.1 must lie in 0..--lr 0.003"),
    (["--save-interval", "0"], "--save-interval must be >= 1, got 0"),
    (["--moe-layer-freq", "[1,0,1]"], "--moe-layer-freq lists 3 layers, --num-layers is 2"),
    (["--recompute-modules", "moe"], "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method (uniform, block)"),
    (["--recompute-granularity", "selective", "--recompute-modules", "shared_experts"],
     "--recompute-modules shared_experts needs --moe-shared-expert-intermediate-size"),
    (["--recompute-granularity", "selective", "--recompute-method", "block"],
     "--recompute-method and --recompute-num-layers go with --recompute-granularity full"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    from granular_moe.training.pretrain import main

    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert main(TINY + flags + ["--save", str(tmp_path / "run")]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("lr-decay-style: inverse-square-root\n",
     "--lr-decay-style 'inverse-square-root' is not valid; valid values: constant, linear, cosine"),
    ("moe-router-dtype: fp16\n", "--moe-router-dtype 'fp16' is not valid; valid values: fp32, fp64"),
    ("bf16: true\nfp32: true\n", "--bf16 and --fp32 exclude each other"),
    ("num-layers: two\n", "'num-layers' (--num-layers) must be an integer, got 'two'"),
    ("num-layers: 2.5\n", "'num-layers' (--num-layers) must be an integer, got 2.5"),
    ("lr: [1, 2]\n", "'lr' (--lr) must be a number, got [1, 2]"),
    ("swiglu: 1\n", "'swiglu' (--swiglu) must be true or false, got 1"),
    ("moe-layer-freq: '[1, 2]'\n", "'moe-layer-freq' (--moe-layer-freq) must be a valid --moe-layer-freq value"),
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


def test_an_error_is_printed_once_not_by_every_rank(tmp_path):
    """Two ranks find the same bad --load: one message, from rank 0, and no traceback."""
    result = torchrun(TINY + ["--train-iters", "4", "--save", str(tmp_path / "run"), "--load", str(tmp_path / "typo")],
                      "granular_moe.training.pretrain")
    assert result.returncode != 0
    assert result.stderr.count("pretrain_gpt_moe: error:") == 1, result.stderr[-3000:]
    assert "no such folder (a typo?" in result.stderr
    assert "granular_moe/" not in result.stderr  # no traceback from a rank (torchrun's own report aside)
    assert not (tmp_path / "run").exists()


def bf16_step(rank, world_size):
    from granular_moe.training.arguments import parse_args
    from granular_moe.training.pretrain import pretrain

    args = parse_args(TINY + ["--bf16", "--train-iters", "3", "--log-interval", "1", "--save", os.environ["SAVE"],
                              "--use-distributed-optimizer", "--expert-model-parallel-size", "2"])
    return pretrain(args)


def test_bf16_trains_with_bf16_weights_and_fp32_main_weights(tmp_path, monkeypatch):
    """Megatron-LM's mixed precision (the default with a GPU): bf16 weights in megatron-core's Float16Module,
    fp32 main weights in the optimizer, gradients reduced in fp32; the router computes in fp32."""
    from megatron.core import dist_checkpointing

    monkeypatch.setenv("SAVE", str(tmp_path / "run"))
    records = run_distributed(bf16_step, 2)
    assert records[0]["iteration"] == 3 and records[0]["loss"] < 8
    saved = dist_checkpointing.load_common_state_dict(str(tmp_path / "run" / "iter_0000003"))
    assert saved["args"].bf16
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(tmp_path / "run" / "iter_0000003")).read_metadata().state_dict_metadata
    weights = {key: entry.properties.dtype for key, entry in metadata.items() if hasattr(entry, "properties")}
    assert weights["decoder.layers.mlp.experts.weight1"] == torch.bfloat16
    main = [key for key in weights if key.startswith("optimizer.state.param.")]
    assert main and all(weights[key] == torch.float32 for key in main)
