"""The granularity sweep: matched parameters across G, the refusal of a mismatched sweep, and a two-step
run of the whole sweep on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import granularity_sweep as sweep  # noqa: E402

CONFIG = ["--config", str(ROOT / "configs" / "sweep_cpu.yaml")]


def test_variants_hold_the_same_expert_and_active_parameters():
    table = sweep.parameter_table(CONFIG, [1, 2, 4, 8, 16])
    assert list(table) == ["G1", "G2", "G4", "G8", "G16", "dense"]
    h, layers, d_ff = 64, 4, 256
    for g in (1, 2, 4, 8, 16):
        row = table[f"G{g}"]
        assert (row["experts"], row["topk"], row["expert_hidden"]) == (8 * g, g, d_ff // g)
        assert row["expert_parameters"] == layers * 8 * 2 * h * d_ff  # E*G experts of 2 h d_ff / G
        assert row["active_expert_parameters"] == layers * 2 * h * d_ff  # k*G of them active
        assert row["router"] == layers * 8 * g * h  # the one thing that grows with G
        assert row["active"] - row["router"] == table["G1"]["active"] - table["G1"]["router"]
        assert row["total"] - table["G1"]["total"] == layers * 8 * (g - 1) * h
    dense = table["dense"]
    assert dense["expert_parameters"] == dense["router"] == 0
    assert dense["active_without_router"] == table["G1"]["active_without_router"]
    assert dense["total"] == dense["active"]


def test_a_mismatched_sweep_is_refused(monkeypatch):
    matched = sweep.variant_argv

    def topk_drifts_with_g(base, granularity):
        extra = ["--moe-router-topk", "2"] if granularity == 2 else []
        return matched(base + extra, granularity)

    monkeypatch.setattr(sweep, "variant_argv", topk_drifts_with_g)
    with pytest.raises(sweep.SweepMismatchError, match="differ in active_without_router"):
        sweep.parameter_table(CONFIG, [1, 2])


def test_two_step_sweep_on_the_cpu(tmp_path):
    tiny = ["--num-layers", "2", "--hidden-size", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--seq-length", "32", "--train-iters", "2", "--lr-warmup-iters", "1", "--eval-interval", "1",
            "--eval-iters", "1", "--log-interval", "1", "--corpus-max-bytes", "300000"]
    out = tmp_path / "sweep"
    assert (
        sweep.main(CONFIG + ["--granularities", "1,2", "--seeds", "1", "--nproc", "1", "--out", str(out)] + tiny) == 0
    )
    result = json.loads((out / "sweep.json").read_text())
    assert set(result["summary"]) == {"G1", "G2", "dense"}
    for name, row in result["summary"].items():
        assert len(row["final_valid_loss"]) == 1 and row["seconds_per_step"] > 0
        records = result["runs"][name]["1"]
        assert [r["iteration"] for r in records if "valid_loss" in r] == [1, 2]
    assert result["summary"]["G2"]["experts"] == 16
    for png in ("final_loss_vs_granularity.png", "loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / png).stat().st_size > 5_000


def test_balance_benchmark_runs_each_method_and_writes_its_table(tmp_path):
    """benchmarks/bench_balance.py end to end on two methods and a few steps (the README's table is the
    400-step run)."""
    script = ROOT / "benchmarks" / "bench_balance.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--methods", "expert_bias,none", "--nproc", "1",
         "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "2", "--eval-interval", "4",
         "--corpus-max-bytes", "300000", "--eval-iters", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "balance.json").read_text())
    assert set(saved["results"]) == {"expert_bias", "none"}
    for method in saved["results"].values():
        assert set(method["imbalance"]) == {"layer_1", "layer_2"}
        assert all(value >= 1.0 for value in method["imbalance"].values())
    assert (tmp_path / "balance.png").stat().st_size > 5_000
    assert "expert_bias" in result.stdout and "imbalance per layer" in result.stdout
