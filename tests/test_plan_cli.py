"""``granular-moe plan``: the printed plan, its Megatron flags and YAML through the main job's parser, errors."""

import json
import shlex

import pytest

from granular_moe import cli as top_level
from granular_moe.scaling import compute_optimal, realize
from granular_moe.scaling.cli import main
from granular_moe.scaling.flops import PaperArchitecture
from granular_moe.scaling.wallclock import STEP_TIME_FORMAT
from granular_moe.training.arguments import parse_args


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_args(out: str) -> list[str]:
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Megatron-LM arguments"))
    return shlex.split(lines[header + 1])


def test_flops_plan_round_trips_through_the_main_job_parser(capsys):
    code, out, err = run(capsys, "--flops", "1e21")
    assert code == 0 and err == ""
    plan = realize(compute_optimal(1e21))
    job = plan.megatron
    argv = printed_args(out)
    assert argv == job.megatron_args()
    args = parse_args(argv)
    g = job.moe_granularity
    assert g == compute_optimal(1e21).granularity == 16
    assert (args.num_experts, args.moe_router_topk, args.moe_granularity) == (64 * g, g, g)
    assert args.moe_ffn_hidden_size == args.ffn_hidden_size // g == 4 * args.hidden_size // g
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
        job.num_layers, 64 * job.num_layers, job.num_layers)
    assert (args.seq_length, args.global_batch_size, args.train_iters) == (2048, 256, job.train_iters)
    assert args.disable_bias_linear and args.max_position_embeddings == 2048
    # the job spends the budget: at most 1e21 FLOPs, less than one more iteration short of it
    per_iteration = PaperArchitecture(args.num_layers, 64).training_flops(256 * 2048, g)
    assert args.train_iters * per_iteration <= 1e21 < (args.train_iters + 1) * per_iteration
    assert f"{plan.loss:.4f}" in out and "MoE, G = 1" in out and "dense" in out


def test_yaml_plan_loads_as_the_same_job(capsys, tmp_path):
    path = tmp_path / "plan.yaml"
    code, out, _ = run(capsys, "--flops", "3e20", "--yaml", str(path), "--micro-batch-size", "4")
    assert code == 0 and str(path) in out
    from_yaml = vars(parse_args(["--config", str(path)]))
    from_line = vars(parse_args(printed_args(out)))
    assert from_yaml.pop("config") == path and from_line.pop("config") is None
    assert from_yaml == from_line and from_line["micro_batch_size"] == 4


def test_granularity_one_plan_marks_top1_routing_for_megatron(capsys):
    code, out, _ = run(capsys, "--flops", "1e20", "--granularities", "1")
    assert code == 0
    argv = printed_args(out)
    assert "--moe-router-pre-softmax" in argv  # Megatron refuses top-1 softmax routing without it
    args = parse_args(argv)
    assert (args.num_experts, args.moe_router_topk) == (64, 1)


def test_active_params_plan_and_top_level_dispatch(capsys):
    assert top_level.main(["plan", "--active-params", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal" in out and "Megatron-LM arguments" in out
    args = parse_args(printed_args(out))
    assert (args.moe_granularity, args.num_experts) == (16, 1024)  # Table 2: 64 x 1B is optimal at G = 16


def test_wallclock_plan_from_a_step_time_file(capsys, tmp_path):
    model = dict(num_layers=8, hidden_size=512, num_attention_heads=8, ffn_hidden_size=2048, num_experts=64,
                 moe_router_topk=1, seq_length=2048, micro_batch_size=8, vocab_size=50304, swiglu=False)
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"format": STEP_TIME_FORMAT, "target": "gpt", "world_size": 1, "model": model,
                                "machine": {"device": "synthetic"},
                                "measurements": [{"granularity": 1, "step_time_s": 1.0},
                                                 {"granularity": 2, "step_time_s": 1.0},
                                                 {"granularity": 64, "step_time_s": 3.0}]}))
    code, out, _ = run(capsys, "--gpu-hours", "100", "--throughput-file", str(path))
    assert code == 0
    best_row = next(line for line in out.splitlines() if "<- best" in line)
    # G = 2 runs as fast as G = 1 and is finer. G = 64 sees a third of the tokens: by hand, its size term gains
    # 2.1 (2**-0.58 - 64**-0.58) / N**0.115 = 0.111 but its data term loses 30.8 (D/3)**-0.147 - 30.8 D**-0.147 = 0.199
    assert best_row.split()[0] == "2"
    args = parse_args(printed_args(out))
    # 100 h x 3600 s at one step of 8 x 2048 tokens per second: 360000 iterations
    assert (args.moe_granularity, args.num_experts, args.train_iters) == (2, 128, 360_000)


@pytest.mark.parametrize("argv, message", [
    (["--flops", "0"], "--flops) must be a finite number > 0"),
    (["--flops=-1e20"], "--flops) must be a finite number > 0"),
    (["--active-params", "-5"], "active parameters must be a finite number > 0"),
    (["--flops", "1e20", "--granularities", "1,6"], "--granularities entry must be a power of two"),
    (["--flops", "1e20", "--expansion-rate", "32"], "valid values: 16, 64"),
    (["--flops", "1e20", "--gpu-hours", "5"], "one budget, not --flops and --gpu-hours"),
    (["--flops", "1e20", "--throughput-file", "x.json"], "--throughput-file goes with --gpu-hours"),
    (["--gpu-hours", "10"], "--gpu-hours needs --throughput-file"),
    (["--gpu-hours", "10", "--max-params", "1e9"], "--max-params: not used with --gpu-hours"),
    ([], "give a budget"),
    (["--flops", "1e20", "--max-params", "1e8", "--max-tokens", "1e8"], "--max-tokens 1e+08 and --max-params 1e+08"),
    (["--flops", "1e11"], "does not buy one iteration"),
    (["--flops", "1e20", "--global-batch-size", "6", "--micro-batch-size", "4"], "not a multiple of --micro-batch"),
    (["--gpu-hours", "10", "--throughput-file", "/nonexistent.json"], "cannot read it as JSON"),
])
def test_bad_input_is_a_named_error_without_traceback(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("granular-moe plan: error: ") and message in err
    assert "Traceback" not in err


def test_unparseable_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--flops", "lots"])
    assert exit_info.value.code == 2
    assert "--flops" in capsys.readouterr().err


def test_plots_are_written(capsys, tmp_path):
    code, out, _ = run(capsys, "--plots", str(tmp_path))
    assert code == 0
    for name in ("scaling_loss_vs_granularity.png", "scaling_loss_vs_budget.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
