"""The wall-clock planner on synthetic step-time tables whose best granularity is known by construction."""

import json
import math

import pytest

from granular_moe.scaling import MOE_E64, PaperArchitecture, ScalingInputError, ThroughputFileError
from granular_moe.scaling.wallclock import STEP_TIME_FORMAT, load_step_time_table, plan_wallclock
from granular_moe.training.arguments import parse_args

# The paper's 64 x 25M model (Table 3): d_model 512 = 64 x 8 blocks, so its N is the paper's formula.
MODEL = dict(num_layers=8, hidden_size=512, num_attention_heads=8, ffn_hidden_size=2048, num_experts=64,
             moe_router_topk=1, seq_length=2048, micro_batch_size=8, vocab_size=50304, swiglu=False)
TOKENS_PER_STEP = 8 * 2048
N = PaperArchitecture(8, 64).params


def write_table(path, step_times, world_size=1, target="gpt", **model_overrides):
    data = {
        "format": STEP_TIME_FORMAT, "target": target, "world_size": world_size, "machine": {"device": "synthetic"},
        "model": {**MODEL, **model_overrides},
        "measurements": [{"granularity": g, "step_time_s": t} for g, t in step_times.items()],
    }
    path.write_text(json.dumps(data))
    return path


def test_tokens_are_time_budget_times_measured_throughput(tmp_path):
    table = load_step_time_table(write_table(tmp_path / "t.json", {1: 0.5, 2: 0.8}))
    assert table.law_params == N == 1_082_130_432
    options = {o.granularity: o for o in plan_wallclock(10, [table])}
    assert options[1].tokens == pytest.approx(10 * 3600 * TOKENS_PER_STEP / 0.5)
    assert options[2].tokens == pytest.approx(10 * 3600 * TOKENS_PER_STEP / 0.8)
    assert options[1].loss == pytest.approx(MOE_E64.loss(N, options[1].tokens, 1))
    # the same device-hours on 4 devices: a quarter of the wall time at the measured (4-device) throughput
    wide = load_step_time_table(write_table(tmp_path / "w.json", {1: 0.5}, world_size=4))
    assert plan_wallclock(10, [wide])[0].tokens == pytest.approx(10 * 3600 / 4 * 4 * TOKENS_PER_STEP / 0.5)


def test_equal_step_times_pick_the_finest_granularity(tmp_path):
    # same tokens for every G: the law's loss falls with G, so the largest measured G must win
    table = load_step_time_table(write_table(tmp_path / "t.json", {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}))
    options = plan_wallclock(100, [table])
    assert [o.granularity for o in options] == [8, 4, 2, 1]


def break_even_step_time(step_time_4: float, gpu_hours: float) -> float:
    """The G=8 step time at which G=8 and G=4 predict the same loss, by hand from Eq. 9:
    (g / 8^gamma + a) / N^alpha + b D8^-beta = (g / 4^gamma + a) / N^alpha + b D4^-beta, so
    b D8^-beta = b D4^-beta + g (4^-gamma - 8^-gamma) / N^alpha."""
    law, seconds = MOE_E64, gpu_hours * 3600
    tokens_4 = seconds * TOKENS_PER_STEP / step_time_4
    granularity_gain = law.g * (4**-law.gamma - 8**-law.gamma) / N**law.alpha
    tokens_8 = ((law.b * tokens_4**-law.beta + granularity_gain) / law.b) ** (-1 / law.beta)
    return seconds * TOKENS_PER_STEP / tokens_8


@pytest.mark.parametrize("gpu_hours", [50.0, 5000.0])
def test_slower_g8_wins_exactly_until_its_break_even_step_time(tmp_path, gpu_hours):
    step_4 = 1.0
    step_8 = break_even_step_time(step_4, gpu_hours)
    assert step_8 > step_4  # G=8 may be slower per step and still win: granularity buys loss
    faster = load_step_time_table(write_table(tmp_path / "a.json", {1: 0.9, 4: step_4, 8: step_8 * (1 - 1e-4)}))
    slower = load_step_time_table(write_table(tmp_path / "b.json", {1: 0.9, 4: step_4, 8: step_8 * (1 + 1e-4)}))
    assert plan_wallclock(gpu_hours, [faster])[0].granularity == 8
    assert plan_wallclock(gpu_hours, [slower])[0].granularity == 4
    at_break_even = {o.granularity: o.loss for o in plan_wallclock(gpu_hours, [
        load_step_time_table(write_table(tmp_path / "c.json", {4: step_4, 8: step_8}))])}
    assert at_break_even[8] == pytest.approx(at_break_even[4], abs=1e-12)


def test_several_files_compare_models(tmp_path):
    # the same model measured twice, one setup at half the speed: the quick one's finest G must win
    quick = load_step_time_table(write_table(tmp_path / "quick.json", {1: 1.0, 4: 1.0}))
    slow = load_step_time_table(write_table(tmp_path / "slow.json", {1: 2.0, 4: 2.0}))
    options = plan_wallclock(100, [slow, quick])
    assert [(o.table.path, o.granularity) for o in options] == [
        (quick.path, 4), (quick.path, 1), (slow.path, 4), (slow.path, 1)]


def test_plan_of_the_best_option_parses_as_a_main_job(tmp_path):
    table = load_step_time_table(write_table(tmp_path / "t.json", {1: 1.0, 4: 1.1}, world_size=2))
    best = plan_wallclock(20, [table])[0]
    plan = best.megatron_plan()
    assert plan.global_batch_size == 8 * 2 and plan.tokens <= best.tokens
    assert plan.train_iters == math.floor(best.tokens / (16 * 2048))
    args = parse_args(plan.megatron_args())
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (64 * 4, 4, 2048 // 4)
    assert (args.num_layers, args.hidden_size, args.train_iters) == (8, 512, plan.train_iters)


def test_bad_files_and_budgets_are_named(tmp_path):
    good = load_step_time_table(write_table(tmp_path / "good.json", {1: 1.0}))
    with pytest.raises(ScalingInputError, match="--gpu-hours"):
        plan_wallclock(0, [good])
    with pytest.raises(ThroughputFileError, match="needs at least one --throughput-file"):
        plan_wallclock(1, [])
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ThroughputFileError, match="cannot read it as JSON"):
        load_step_time_table(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ThroughputFileError, match="not a step-time file"):
        load_step_time_table(tmp_path / "other.json")
    with pytest.raises(ThroughputFileError, match="--target gpt"):
        load_step_time_table(write_table(tmp_path / "layer.json", {1: 1.0}, target="layer"))
    with pytest.raises(ThroughputFileError, match="step_time_s of G=2"):
        load_step_time_table(write_table(tmp_path / "neg.json", {1: 1.0, 2: -1.0}))
    bad_model = write_table(tmp_path / "model.json", {1: 1.0})
    data = json.loads(bad_model.read_text())
    del data["model"]["hidden_size"]
    bad_model.write_text(json.dumps(data))
    with pytest.raises(ThroughputFileError, match="lacks hidden_size"):
        load_step_time_table(bad_model)
    eight = load_step_time_table(write_table(tmp_path / "e8.json", {1: 1.0}, num_experts=8))
    with pytest.raises(ScalingInputError, match="valid values: 16, 64"):
        plan_wallclock(1, [eight])
