"""The DeepSpeed fine-tuning example as users run it (launch_scripts/deepspeed_finetune_hf_moe.sh: torchrun, 2 gloo
processes, a Hugging Face model folder in, a Hugging Face folder out), its refusal of a bad flag, and the GranularMoE
vs DeepSpeed MoE benchmark at a toy size."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import without_rendezvous

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "launch_scripts" / "deepspeed_finetune_hf_moe.sh"


def run(command, timeout=300):
    env = without_rendezvous()  # an outer launcher's variables would change what torchrun does
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_finetune_script_trains_and_saves_a_hugging_face_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from granular_moe.deepspeed.finetune import tiny_model

    tiny_model("mixtral").save_pretrained(str(tmp_path / "model"))
    result = run(["bash", str(SCRIPT), "--nproc-per-node", "2", "--model", str(tmp_path / "model"), "--steps", "4",
                  "--zero-stage", "1", "--granularity", "2", "--seq-length", "32", "--micro-batch-size", "2",
                  "--output", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("MixtralForCausalLM: 2 MoE blocks -> GranularMoE, 16 experts (granularity 2), top-4, EP 2 x expert-DP 1, "
            "ZeRO 1") in result.stdout
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0]  # printed once per step (4 steps), by rank 0 only
    assert "fine-tuning: 100%" in result.stdout  # the progress bar
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert (loaded.config.num_local_experts, loaded.config.num_experts_per_tok, loaded.config.intermediate_size) == \
        (16, 4, 32)


def test_finetune_refuses_zero_stage_3_once(tmp_path):
    result = run(["bash", str(SCRIPT), "--nproc-per-node", "2", "--zero-stage", "3", "--output", str(tmp_path)])
    assert result.returncode != 0
    assert result.stderr.count("error: --zero-stage 3 is not valid; valid values: 0, 1, 2") == 1, result.stderr[-3000:]


def test_benchmark_compares_deepspeed_moe_at_a_toy_size(tmp_path):
    result = run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_deepspeed_moe.py"), "--tiny", "--gs", "4",
                  "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "deepspeed_moe.json").read_text())
    rows = payload["rows"]
    assert [(r["impl"], r["k"], r["G"]) for r in rows] == [
        ("deepspeed", 1, 1), ("granular", 1, 1), ("granular", 1, 4),
        ("deepspeed", 2, 1), ("granular", 2, 1), ("granular", 2, 4)]
    for row in rows:
        assert row["ms"] > 0 and row["saved_bytes"] > 0
        assert row["topk"] == row["k"] * row["G"]
        if row["G"] == 1:  # the same experts and router: the same output as DeepSpeed's layer
            assert row["max_difference_to_deepspeed"] < 1e-5
    assert payload["info"]["commit"] and payload["info"]["tokens"] == 64
    assert "| GranularMoE | 2 | 4 | 16 | 8 |" in result.stdout
