"""Smoke test of benchmarks/bench_step_time.py on tiny sizes, and its file through the wall-clock planner."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from granular_moe.scaling import ModelShape, ThroughputFileError, count_parameters
from granular_moe.scaling.wallclock import load_step_time_table, plan_wallclock

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step_time.py"
TINY = ["--device", "cpu", "--hidden-size", "32", "--num-layers", "1", "--num-attention-heads", "2",
        "--ffn-hidden-size", "64", "--num-experts", "16", "--moe-router-topk", "1", "--seq-length", "16",
        "--micro-batch-size", "2", "--vocab-size", "64", "--warmup", "1", "--iters", "2"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # as when run as a script: benchmarks/ is on the path
    spec = importlib.util.spec_from_file_location("bench_step_time", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpt_step_times_feed_the_wallclock_planner(gloo_world, bench, tmp_path):
    output = tmp_path / "step_times.json"
    result = bench.main(TINY + ["--granularities", "1,2,4", "--optimizer", "--output", str(output)])
    assert json.loads(output.read_text()) == result
    assert (result["target"], result["world_size"], result["dtype"]) == ("gpt", 1, "fp32")
    assert result["step"] == "forward+backward+adamw" and result["torch"]
    rows = result["measurements"]
    assert [row["granularity"] for row in rows] == [1, 2, 4]
    for row in rows:
        assert len(row["step_times_s"]) == 2 and row["step_time_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(32 / row["step_time_s"])
        shape = ModelShape(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=64,
                           num_experts=16, moe_router_topk=1, moe_granularity=row["granularity"],
                           max_position_embeddings=16)
        assert row["params"]["total"] == count_parameters(shape).total
    table = load_step_time_table(output)
    options = plan_wallclock(1.0, [table])
    assert sorted(o.granularity for o in options) == [1, 2, 4]
    for option in options:
        assert option.tokens == pytest.approx(3600 * 32 / table.step_time_s[option.granularity])


def test_layer_step_times_are_refused_by_the_planner(gloo_world, bench, tmp_path):
    output = tmp_path / "layer.json"
    result = bench.main(TINY + ["--target", "layer", "--granularities", "1,8", "--warmup", "0", "--iters", "1",
                                "--output", str(output)])
    assert [row["granularity"] for row in result["measurements"]] == [1, 8]
    assert result["target"] == "layer"
    with pytest.raises(ThroughputFileError, match="--target gpt"):
        load_step_time_table(output)
