"""The kernel benchmarks run on tiny shapes on a CPU and write the rows they promise (torch columns only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script, out_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--tiny", "--gs", "1,4", "--out", str(out_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_expert_block_benchmark_writes_its_table(tmp_path):
    stdout = run_benchmark("bench_expert_block.py", tmp_path)
    payload = json.loads((tmp_path / "bench_expert_block.json").read_text())
    info, rows = payload["info"], payload["rows"]
    assert info["flops_per_step"] == 3 * 2 * info["tokens"] * info["topk"] * info["d_model"] * info["d_ff"] * 2
    assert info["commit"] and info["device"].startswith("cpu")
    assert {(r["G"], r["impl"]) for r in rows} == {(g, i) for g in (1, 4) for i in ("dense", "loop", "ours_torch")}
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["peak_MiB"] is None
        assert r["impl"] == "dense" or r["difference"] <= 1e-5  # checked to compute ours_torch's output
        assert abs(r["TFLOPs"] - info["flops_per_step"] / (r["ms"] * 1e-3) / 1e12) <= 2e-3 * r["TFLOPs"]
    assert "| G | dense | loop | ours_torch |" in stdout


def test_permute_benchmark_writes_bandwidths_against_copy(tmp_path):
    stdout = run_benchmark("bench_permute.py", tmp_path)
    rows = json.loads((tmp_path / "bench_permute.json").read_text())["rows"]
    expected = {
        ("copy", "torch"), ("dispatch_plan", "torch"), ("permute", "torch"),
        ("combine", "torch"), ("combine", "index_add"),
    }
    assert {(r["G"], r["op"], r["backend"]) for r in rows} == {(g, *k) for g in (1, 4) for k in expected}
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["GBps"] > 0
        copy = next(c for c in rows if c["G"] == r["G"] and c["op"] == "copy")
        assert abs(r["copy_share"] - r["GBps"] / copy["GBps"]) <= 2e-3 * r["copy_share"]
    assert "| G | op | torch | index_add | triton |" in stdout


def test_gpu_checks_script_runs_accuracy_and_both_benchmarks(tmp_path):
    """benchmarks/gpu_checks.sh, the one call a GPU session makes, in its CPU smoke mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TINY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_checks.sh")], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path.name for path in tmp_path.iterdir()} == {"kernel_accuracy.json", "bench_expert_block.json",
                                                           "bench_permute.json"}
    assert all(row["passed"] for row in json.loads((tmp_path / "kernel_accuracy.json").read_text())["rows"])


STAND_IN_SCATTERMOE = '''
"""A stand-in for ScatterMoE's scattermoe.mlp in plain torch: its classes, constructor, weight layout
([E, out, in]) and forward(x, expert_p, expert_idxs)."""
import torch


class ParallelExperts(torch.nn.Module):
    def __init__(self, num_experts, input_size, output_size):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, output_size, input_size))


class MLP(torch.nn.Module):
    def __init__(self, input_size, hidden_size, num_experts, top_k, bias=False, activation=None, glu=False):
        super().__init__()
        self.experts = ParallelExperts(num_experts, input_size, hidden_size * (2 if glu else 1))
        self.output_experts = ParallelExperts(num_experts, hidden_size, input_size)
        self.activation, self.glu = activation, glu

    def forward(self, x, expert_p, expert_idxs):
        out = torch.zeros_like(x)
        for slot in range(expert_idxs.shape[1]):
            e = expert_idxs[:, slot]
            h = torch.einsum("td,tod->to", x, self.experts.weight[e])
            if self.glu:
                h, gates = h.chunk(2, dim=-1)
                h = self.activation(gates) * h{swap}
            else:
                h = self.activation(h)
            out = out + expert_p[:, slot, None] * torch.einsum("th,tdh->td", h, self.output_experts.weight[e])
        return out


class GLUMLP(MLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, glu=True, **kwargs)
'''


def run_with_scattermoe(tmp_path, stand_in, *flags, status=0):
    package = tmp_path / "scattermoe_src" / "scattermoe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mlp.py").write_text(stand_in)
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_expert_block.py"), "--tiny", "--gs", "2", "--impls",
         "ours_torch,scattermoe", "--scattermoe-path", str(package.parent), "--out", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == status, result.stderr[-3000:]
    return {r["impl"]: r for r in json.loads((tmp_path / "bench_expert_block.json").read_text())["rows"]}


def test_scattermoe_column_gets_the_same_experts_and_is_checked_to_do_the_same_work(tmp_path):
    rows = run_with_scattermoe(tmp_path, STAND_IN_SCATTERMOE.replace("{swap}", ""), "--gated")
    assert rows["scattermoe"]["difference"] < 1e-5 and rows["scattermoe"]["ms"] > 0


def test_a_column_computing_something_else_is_not_timed(tmp_path):
    wrong_glu = STAND_IN_SCATTERMOE.replace("{swap}", " * 2")
    rows = run_with_scattermoe(tmp_path, wrong_glu, "--gated", status=1)  # and the script fails
    assert "not the same work" in rows["scattermoe"]["error"] and "ms" not in rows["scattermoe"]
