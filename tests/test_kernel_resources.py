"""benchmarks/kernel_resources.py: every Triton kernel of the expert block compiles for sm_90 (H100/H200)
at the README's shapes without register spills, and the check reports a tile that spills."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
KERNELS = {"_block_histogram_kernel", "_scatter_kernel", "_grouped_rows_kernel", "_grouped_weight_grad_kernel",
           "_segment_sum_kernel", "_combine_backward_kernel", "_gather_rows_kernel"}


def run_check(tmp_path, args, prelude=""):
    """The script in a fresh process (the kernels must be compiled, not interpreted), its own Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    argv = [str(SCRIPT), *args]
    code = (f"import runpy, sys\nsys.path.insert(0, {str(SCRIPT.parent)!r})\n{prelude}\n"  # as run as a script
            f"sys.argv = {argv!r}\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_expert_block_compiles_for_sm90_without_spills_at_the_widest_and_narrowest_experts(tmp_path):
    result = run_check(tmp_path, ["--gs", "1,256", "--dtypes", "bf16,fp32", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]
    for dtype, g, d_expert, gated in itertools.product(("bf16", "fp32"), (1, 256), (8192, 32), (False, True)):
        if g * d_expert == 8192:
            shape = [r for r in rows if (r["dtype"], r["G"], r["gated"]) == (dtype, g, gated)]
            assert {r["kernel"] for r in shape} == KERNELS and all(r["d_expert"] == d_expert for r in shape)
            epilogues = [r["constants"]["EPILOGUE"] for r in shape if r["kernel"] == "_grouped_rows_kernel"]
            # fc2 and the backward's d x share their constants, not their binaries: both are checked; the
            # activation and its backward come with gates (the layer's) and without
            assert sorted(epilogues) == ["activate", "activate", "activation_grad", "activation_grad", "store",
                                         "store"]
            gated_grads = [r for r in shape if r["constants"].get("WRITE_GRAD_PROBS") == "True"]
            assert len(gated_grads) == 1 and gated_grads[0]["constants"]["EPILOGUE"] == "activation_grad"
    assert all(r["passed"] and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in rows)
    gemms = [r for r in rows if r["kernel"].startswith("_grouped") and r["dtype"] == "bf16"]
    assert all(r["async_copy"] for r in gemms)  # software-pipelined loads
    # bf16 dots on Hopper's wgmma, except a weight gradient whose output tile is under wgmma's 64 rows
    narrow = [r for r in gemms if r["kernel"] == "_grouped_weight_grad_kernel" and int(r["constants"]["BLOCK_K"]) < 64]
    assert narrow and all(r["wgmma"] for r in gemms if r not in narrow)
    assert "compile without spills" in result.stdout


def test_a_tile_that_spills_fails_the_check(tmp_path):
    """The activation backward on a 128 x 128 tile (the table's choice before this check existed) spills."""
    prelude = (
        "from granular_moe.ops.triton import tiles\n"
        "tiles.row_gemm_tiles = lambda *a, **k: tiles.GemmTiles(128, 128, 64, 8, 3)\n"
    )
    result = run_check(tmp_path, ["--gs", "1", "--out", str(tmp_path)], prelude)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]
    failed = [r for r in rows if not r["passed"]]
    assert failed and all(r["constants"]["EPILOGUE"] == "activation_grad" and r["spill_bytes"] > 0 for r in failed)
