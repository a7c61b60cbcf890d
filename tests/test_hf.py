"""Hugging Face interchange: a preset trained a few steps at EP 2 exports as Qwen3-MoE / DeepSeek-V3 folders
``transformers`` loads without missing or unexpected keys, whose logits equal the megatron-core model's (fp32:
max abs difference 2.4e-7 / 2.1e-7 measured, asserted under 1e-5), which generate, and whose tokenizer gives the
job's ids; a randomly initialised ``transformers`` model of each class imports with equal logits, the main job
continues training from the import, and exporting it again gives byte-identical tensors and an equal config;
what a target cannot represent is refused by flag before anything is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from distributed import run_distributed
from granular_moe.cli import main as cli
from granular_moe.hf import HfExportError, HfImportError
from granular_moe.hf.export import INDEX_FILE, export_hf
from granular_moe.hf.import_hf import MODEL_FLAGS_FILE, import_hf
from granular_moe.hf.megatron_io import build_model, load_model, megatron_logits, one_process_args, save_model
from granular_moe.hf.targets import choose_target, export_problems
from granular_moe.hf.tokenizer import write_tokenizer
from granular_moe.training.arguments import parse_args
from granular_moe.training.metrics import read_records

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOLERANCE = 1e-5  # fp32: measured 2.4e-7 (Qwen3-MoE) and 2.1e-7 (DeepSeek-V3) on logits of size ~1
CORPUS_BYTES = 300000
TRAIN = ["--train-iters", "3", "--micro-batch-size", "2", "--seq-length", "32", "--corpus-max-bytes", str(CORPUS_BYTES),
         "--eval-iters", "1", "--eval-interval", "3", "--save-interval", "3", "--log-interval", "1",
         "--lr-warmup-iters", "0", "--fp32"]
TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass Empty:\n"
         "    pass\n", "import os\nfor name in sorted(os.listdir('.')):\n    print(name.upper(), 'caf\u00e9', 12345)\n"]


def job(rank, world_size, argv):
    from granular_moe.training.arguments import parse_args
    from granular_moe.training.pretrain import pretrain

    return pretrain(parse_args(argv))


def corpus():
    from granular_moe.training.corpus import embedded_corpus

    return embedded_corpus(2048, CORPUS_BYTES)


def sample_ids(tokenizer, length=32) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)[:length] for text in TEXTS])


def hf_logits(folder: Path, ids: torch.Tensor):
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}  # no missing/unexpected/mismatched keys
    with torch.no_grad():
        return model.eval(), model(ids).logits


def tensors_of(folder: Path) -> dict:
    index = json.loads((folder / INDEX_FILE).read_text()) if (folder / INDEX_FILE).is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


# --------------------------------------------------------------------------- export of a trained preset


@pytest.fixture(scope="module", params=[("moe_qwen3_tiny", "qwen3_moe"), ("moe_deepseek_tiny_hf", "deepseek_v3")],
                ids=["qwen3_moe", "deepseek_v3"])
def exported(request, tmp_path_factory):
    """The preset trained 3 steps on 2 gloo processes at EP 2, exported (target auto) through the CLI."""
    preset, target = request.param
    root = tmp_path_factory.mktemp(preset)
    save, output = root / "run", root / "hf"
    run_distributed(job, 2, ["--config", str(CONFIGS / f"{preset}.yaml"), *TRAIN, "--expert-model-parallel-size", "2",
                             "--save", str(save)])
    assert [r["iteration"] for r in read_records(save / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert cli(["export-hf", "--load", str(save), "--output", str(output), "--max-shard-size", "2MB"]) == 0
    return save, output, target


def test_the_export_is_the_targets_architecture_in_sharded_safetensors(gloo_world, exported):
    save, output, target = exported
    config = json.loads((output / "config.json").read_text())
    index = json.loads((output / INDEX_FILE).read_text())
    shards = sorted(p.name for p in output.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    tensors = tensors_of(output)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert config["vocab_size"] == 2048 and config["dtype"] == "float32" and not config["tie_word_embeddings"]
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (2, 0, None)
    if target == "qwen3_moe":
        assert (config["architectures"], config["model_type"]) == (["Qwen3MoeForCausalLM"], "qwen3_moe")
        assert (config["num_local_experts"], config["num_experts_per_tok"]) == (32, 8)
        assert config["moe_intermediate_size"] == 64
        assert config["norm_topk_prob"] and config["mlp_only_layers"] == [] and config["head_dim"] == 16
        assert (config["num_key_value_heads"], config["rope_parameters"]["rope_theta"]) == (2, 1e6)
        expert_layers = range(4)
    else:
        assert (config["architectures"], config["model_type"]) == (["DeepseekV3ForCausalLM"], "deepseek_v3")
        assert (config["n_routed_experts"], config["num_experts_per_tok"], config["n_shared_experts"]) == (16, 4, 1)
        assert (config["n_group"], config["topk_group"], config["first_k_dense_replace"]) == (4, 2, 1)
        assert config["routed_scaling_factor"] == 1.0 and config["norm_topk_prob"] and config["rope_interleave"]
        assert (config["q_lora_rank"], config["kv_lora_rank"], config["qk_nope_head_dim"]) == (32, 32, 16)
        assert config["num_nextn_predict_layers"] == 0 and config["intermediate_size"] == 320
        expert_layers = range(1, 4)
        bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0  # the expert bias the steps updated
    experts = config.get("num_local_experts") or config["n_routed_experts"]
    for layer in expert_layers:  # one tensor per expert and projection, [out, in]
        for expert in range(experts):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            assert tensors[prefix + "gate_proj.weight"].shape == (config["moe_intermediate_size"], 64)
            assert tensors[prefix + "down_proj.weight"].shape == (64, config["moe_intermediate_size"])
            assert prefix + "up_proj.weight" in tensors


def test_transformers_logits_equal_the_megatron_models_and_generate_runs(gloo_world, exported):
    save, output, target = exported
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    ids = sample_ids(tokenizer)
    args, megatron = load_model(save)
    expected = megatron_logits(megatron, ids)
    model, got = hf_logits(output, ids)
    assert type(model).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[target]
    difference = (got - expected).abs().max().item()
    print(f"{target}: max |logits difference| {difference:.3g} (largest logit {expected.abs().max().item():.3g})")
    assert got.shape == expected.shape == (2, 32, 2048) and difference < TOLERANCE
    generated = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 14) and torch.equal(generated[:, :8], ids[:1, :8])
    # greedy continuation: megatron-core's argmax over the generated prefix gives the same next tokens
    assert torch.equal(megatron_logits(megatron, generated[:, :-1])[0, 7:].argmax(-1), generated[0, 8:])


def test_the_tokenizer_gives_the_jobs_ids_and_decodes_back(exported):
    from granular_moe.training.tokenizer import SentencePieceTokenizer

    _, output, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    job_tokenizer = SentencePieceTokenizer(corpus().tokenizer_model)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (2, 0, 2048)
    assert json.loads((output / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    texts = TEXTS + [path.read_text() for path in sorted(Path(json.__file__).parent.glob("*.py"))]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == job_tokenizer.encode(text)
        assert tokenizer.decode(ids) == text


# --------------------------------------------------------------------------- import of a transformers model


def random_qwen3(tie: bool):
    config = Qwen3MoeConfig(vocab_size=2048, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                            rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=tie,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, router_aux_loss_coef=0.01,
                            bos_token_id=None, eos_token_id=2, pad_token_id=0, architectures=["Qwen3MoeForCausalLM"])
    return Qwen3MoeForCausalLM(config)


def random_deepseek():
    config = DeepseekV3Config(vocab_size=2048, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              n_shared_experts=2, num_experts_per_tok=4, n_group=4, topk_group=2,
                              first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
                              num_nextn_predict_layers=0, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                              architectures=["DeepseekV3ForCausalLM"])
    return DeepseekV3ForCausalLM(config)


def write_random_model(folder: Path, model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # norms, the expert bias: away from their initial ones and zeros
        for name, tensor in model.state_dict().items():
            if "norm" in name or "e_score_correction_bias" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    model.save_pretrained(str(folder))
    write_tokenizer(corpus().tokenizer_model, folder)


@pytest.mark.parametrize("make", [lambda: random_qwen3(tie=True), random_deepseek], ids=["qwen3_moe", "deepseek_v3"])
def test_an_imported_model_computes_the_same_logits_and_exports_byte_identical(gloo_world, tmp_path, make):
    torch.manual_seed(1)
    original = make().eval()
    write_random_model(tmp_path / "hf", original)
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == corpus().tokenizer_model.read_bytes()
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(2))
    args, megatron = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        expected = original(ids).logits
    difference = (megatron_logits(megatron, ids) - expected).abs().max().item()
    print(f"{original.config.model_type} import: max |logits difference| {difference:.3g}")
    assert difference < TOLERANCE

    export_hf(tmp_path / "ckpt", tmp_path / "again")
    before, after = tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "again")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config


def test_the_main_job_continues_training_from_an_import(tmp_path):
    """import-hf as its own process (its own one-rank world), then the main job at EP 2 from its output."""
    write_random_model(tmp_path / "hf", random_qwen3(tie=False))
    done = subprocess.run([sys.executable, "-m", "granular_moe.cli", "import-hf", "--model", str(tmp_path / "hf"),
                           "--save", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"--config {tmp_path / 'ckpt' / MODEL_FLAGS_FILE} --load {tmp_path / 'ckpt'} --finetune" in done.stdout
    run = tmp_path / "run"
    run_distributed(job, 2, ["--config", str(tmp_path / "ckpt" / MODEL_FLAGS_FILE), "--load", str(tmp_path / "ckpt"),
                             "--finetune", "--data-path", corpus().prefix, "--save", str(run),
                             "--expert-model-parallel-size", "2", *TRAIN[:2], "--micro-batch-size", "2",
                             "--seq-length", "32", "--eval-iters", "1", "--log-interval", "1", "--fp32"])
    losses = [r["loss"] for r in read_records(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(loss < 9 for loss in losses)  # ln 2048 = 7.6: the imported weights, not NaN
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "3"


# --------------------------------------------------------------------------- refusals


QWEN3 = ["--config", str(CONFIGS / "moe_qwen3_tiny.yaml")]
DEEPSEEK = ["--config", str(CONFIGS / "moe_deepseek_tiny_hf.yaml")]


def test_the_presets_are_represented_and_auto_picks_their_target():
    assert export_problems(parse_args(QWEN3), "qwen3_moe") == []
    assert export_problems(parse_args(DEEPSEEK), "deepseek_v3") == []
    assert choose_target(parse_args(QWEN3)) == "qwen3_moe" and choose_target(parse_args(DEEPSEEK)) == "deepseek_v3"
    with pytest.raises(HfExportError, match="no Hugging Face target represents this model") as refused:
        choose_target(parse_args(["--config", str(CONFIGS / "moe_deepseek_tiny.yaml")]))
    assert "--multi-latent-attention not set" in str(refused.value) and "--qk-layernorm not set" in str(refused.value)


@pytest.mark.parametrize("base, flags, target, message", [
    (QWEN3, ["--moe-router-type", "expert_choice"], "qwen3_moe", "--moe-router-type expert_choice"),
    (QWEN3, ["--moe-router-score-function", "sigmoid"], "qwen3_moe", "--moe-router-score-function sigmoid"),
    (QWEN3, ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"], "qwen3_moe",
     "--moe-router-enable-expert-bias: Qwen3-MoE has no expert bias"),
    (QWEN3, ["--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], "qwen3_moe",
     "--moe-router-num-groups 4 / --moe-router-group-topk 2"),
    (QWEN3, ["--moe-router-topk-scaling-factor", "2.5"], "qwen3_moe", "--moe-router-topk-scaling-factor 2.5"),
    (QWEN3, ["--moe-shared-expert-intermediate-size", "64"], "qwen3_moe", "--moe-shared-expert-intermediate-size 64"),
    (QWEN3, ["--moe-expert-capacity-factor", "1.25"], "qwen3_moe", "--moe-expert-capacity-factor 1.25"),
    (QWEN3, ["--normalization", "LayerNorm"], "qwen3_moe", "--normalization LayerNorm"),
    (QWEN3, ["--position-embedding-type", "learned_absolute"], "qwen3_moe",
     "--position-embedding-type learned_absolute"),
    (["--config", str(CONFIGS / "dense_qwen3_tiny.yaml")], [], "qwen3_moe", "--num-experts unset: a dense model"),
    (DEEPSEEK, [], "qwen3_moe", "--multi-latent-attention: Qwen3-MoE has grouped-query attention"),
    (DEEPSEEK, ["--moe-router-score-function", "softmax"], "deepseek_v3",
     "--moe-router-score-function softmax: DeepSeek-V3 routes with sigmoid scores"),
    (DEEPSEEK, ["--norm-epsilon", "1e-5"], "deepseek_v3", "--norm-epsilon 1e-05"),
    (DEEPSEEK, ["--moe-router-group-topk", "1"], "deepseek_v3",
     "--moe-router-group-topk 1: DeepSeek-V3 scores a group"),
    (DEEPSEEK, ["--moe-layer-freq", "[1,0,1,1]"], "deepseek_v3", "--moe-layer-freq [1, 0, 1, 1]"),
    (DEEPSEEK, ["--moe-shared-expert-gate"], "deepseek_v3", "--moe-shared-expert-gate"),
    (DEEPSEEK, ["--moe-shared-expert-intermediate-size", "96"], "deepseek_v3",
     "--moe-shared-expert-intermediate-size 96: DeepSeek-V3's shared expert is a whole number"),
    (QWEN3, [], "deepseek_v3", "--multi-latent-attention not set"),
])
def test_each_option_a_target_lacks_is_refused_by_its_flag(base, flags, target, message):
    with pytest.raises(HfExportError) as refused:
        choose_target(parse_args(base + flags), target)
    text = str(refused.value)
    assert text.startswith(f"cannot export as {target} (") and message in text


def test_a_refused_export_names_every_problem_and_writes_nothing(gloo_world, tmp_path, capsys):
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "2", "--moe-ffn-hidden-size", "32",
             "--moe-router-type", "expert_choice", "--fp32"]
    args = one_process_args(parse_args(flags))
    save_model(tmp_path / "ckpt", build_model(args, 128), args)
    assert cli(["export-hf", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"),
                "--target", "qwen3_moe"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "export-hf: error: cannot export as qwen3_moe (Qwen3-MoE):"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  - --moe-router-type expert_choice", "  - --swiglu not set (GELU experts and MLPs)",
        "  - --position-embedding-type learned_absolute", "  - --normalization LayerNorm", "  - --qk-layernorm not set"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no staging folder
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(HfExportError, match="deepseek_v3.*\n.*--moe-router-type expert_choice"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", "deepseek_v3")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_an_import_names_every_field_the_job_lacks_and_writes_nothing(tmp_path):
    config = random_qwen3(tie=False).config
    config.use_sliding_window, config.attention_bias, config.hidden_act = True, True, "gelu"
    config.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(HfImportError) as refused:
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert str(refused.value).splitlines() == [
        "cannot import this qwen3_moe model:", "  - hidden_act 'gelu': the job's gated MLPs are SwiGLU (silu)",
        "  - attention_bias true: the job has no linear biases",
        "  - use_sliding_window true: the job attends to the whole sequence"]
    assert not (tmp_path / "ckpt").exists()
    shutil.rmtree(tmp_path / "hf")
