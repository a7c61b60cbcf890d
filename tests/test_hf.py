"""Hugging Face interchange, for every family (Qwen3-MoE, DeepSeek-V3, Mixtral, Qwen2-MoE, OLMoE, GLM-4.5): a
preset trained a few steps at EP 2 exports (streamed) as a folder ``transformers`` loads without missing or
unexpected keys, whose tensors are the whole-model conversion's byte for byte, whose logits equal the
megatron-core model's (fp32: max abs difference 2.1e-7 to 3.0e-7 measured, asserted under 1e-5), which
generate, and whose tokenizer gives the job's ids; a randomly initialised ``transformers`` model of each class
imports with equal logits, the main job continues training from an import, and exporting it again gives
byte-identical tensors and an equal config; what a target cannot represent is refused by flag before anything
is written."""

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
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from distributed import run_distributed
from granular_moe.cli import main as cli
from granular_moe.hf import HfExportError, HfImportError
from granular_moe.hf.export import INDEX_FILE, export_hf
from granular_moe.hf.import_hf import MODEL_FLAGS_FILE, import_hf
from granular_moe.hf.megatron_io import build_model, load_model, megatron_logits, one_process_args, save_model
from granular_moe.hf.families import FAMILIES
from granular_moe.hf.mappings import to_hf
from granular_moe.hf.targets import choose_target, export_problems
from granular_moe.hf.tokenizer import write_tokenizer
from granular_moe.hf.verify import compare
from granular_moe.training.arguments import parse_args
from granular_moe.training.metrics import read_records

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOLERANCE = 1e-5  # fp32: measured 2.1e-7 to 3.0e-7 on logits of size ~1
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


PRESETS = {"qwen3_moe": "moe_qwen3_tiny", "deepseek_v3": "moe_deepseek_tiny_hf", "mixtral": "moe_mixtral_tiny",
           "qwen2_moe": "moe_qwen2_tiny", "olmoe": "moe_olmoe_tiny", "glm4_moe": "moe_glm4_tiny"}


@pytest.fixture(scope="module", params=list(PRESETS))
def exported(request, tmp_path_factory):
    """The family's preset trained 3 steps on 2 gloo processes at EP 2, exported (target auto) through the CLI."""
    target = request.param
    root = tmp_path_factory.mktemp(target)
    save, output = root / "run", root / "hf"
    run_distributed(job, 2, ["--config", str(CONFIGS / f"{PRESETS[target]}.yaml"), *TRAIN,
                             "--expert-model-parallel-size", "2", "--save", str(save)])
    assert [r["iteration"] for r in read_records(save / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert cli(["export-hf", "--load", str(save), "--output", str(output), "--max-shard-size", "2MB"]) == 0
    return save, output, target


# what each preset's config.json holds (beyond the common fields) and where its routed experts are
EXPECTED = {
    "qwen3_moe": dict(config={"num_local_experts": 32, "num_experts_per_tok": 8, "moe_intermediate_size": 64,
                              "norm_topk_prob": True, "mlp_only_layers": [], "head_dim": 16, "num_key_value_heads": 2},
                      experts=("mlp.experts", ("gate_proj", "up_proj", "down_proj"), 32, 64, range(4))),
    "deepseek_v3": dict(config={"n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "n_group": 4,
                                "topk_group": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
                                "norm_topk_prob": True, "rope_interleave": True, "q_lora_rank": 32, "kv_lora_rank": 32,
                                "qk_nope_head_dim": 16, "num_nextn_predict_layers": 0, "intermediate_size": 320},
                        experts=("mlp.experts", ("gate_proj", "up_proj", "down_proj"), 16, 64, range(1, 4))),
    "mixtral": dict(config={"num_local_experts": 32, "num_experts_per_tok": 8, "intermediate_size": 64,
                            "num_key_value_heads": 2, "head_dim": 16, "sliding_window": None},
                    experts=("block_sparse_moe.experts", ("w1", "w3", "w2"), 32, 64, range(4))),
    "qwen2_moe": dict(config={"num_experts": 32, "num_experts_per_tok": 8, "moe_intermediate_size": 64,
                              "shared_expert_intermediate_size": 128, "norm_topk_prob": False, "qkv_bias": True,
                              "num_key_value_heads": 2, "mlp_only_layers": []},
                      experts=("mlp.experts", ("gate_proj", "up_proj", "down_proj"), 32, 64, range(4))),
    "olmoe": dict(config={"num_experts": 32, "num_experts_per_tok": 8, "intermediate_size": 64,
                          "norm_topk_prob": False, "num_key_value_heads": 4, "clip_qkv": None},
                  experts=("mlp.experts", ("gate_proj", "up_proj", "down_proj"), 32, 64, range(4))),
    "glm4_moe": dict(config={"n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "n_group": 4,
                             "topk_group": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
                             "attention_bias": True, "use_qk_norm": True, "head_dim": 24, "num_key_value_heads": 2},
                     experts=("mlp.experts", ("gate_proj", "up_proj", "down_proj"), 16, 64, range(1, 4))),
}


def test_the_export_is_the_targets_architecture_in_sharded_safetensors(exported):
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
    assert (config["architectures"], config["model_type"]) == ([FAMILIES[target].architecture], target)
    expected = EXPECTED[target]
    assert {key: config.get(key) for key in expected["config"]} == expected["config"]
    block, names, experts, width, layers = expected["experts"]
    for layer in layers:  # one tensor per expert and projection, [out, in]
        for expert in range(experts):
            prefix = f"model.layers.{layer}.{block}.{expert}."
            assert tensors[prefix + f"{names[0]}.weight"].shape == tensors[prefix + f"{names[1]}.weight"].shape == (
                width, 64)
            assert tensors[prefix + f"{names[2]}.weight"].shape == (64, width)
    if target in ("deepseek_v3", "glm4_moe"):
        bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0  # the expert bias the steps updated
    if target == "glm4_moe":
        assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
        assert tensors["model.layers.2.self_attn.q_proj.bias"].shape == (4 * 24,)


def test_the_streamed_export_is_the_whole_model_conversion_byte_for_byte(gloo_world, exported):
    """The reference: megatron-core loads the EP 2 checkpoint whole into the one-process model (its own
    resharding), the family's mappings convert the whole state dict; the streamed export wrote the same bytes."""
    save, output, target = exported
    args, megatron = load_model(save)
    reference = to_hf(megatron.state_dict(), FAMILIES[target].mappings(args, 2048))
    written = tensors_of(output)
    assert sorted(reference) == sorted(written)
    for name, tensor in reference.items():
        expected = tensor.float() if name.endswith("e_score_correction_bias") else tensor
        assert torch.equal(written[name].view(torch.uint8), expected.contiguous().view(torch.uint8)), name


def test_transformers_logits_equal_the_megatron_models_and_generate_runs(gloo_world, exported):
    save, output, target = exported
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    ids = sample_ids(tokenizer)
    args, megatron = load_model(save)
    expected = megatron_logits(megatron, ids)
    model, got = hf_logits(output, ids)
    assert type(model).__name__ == FAMILIES[target].architecture
    difference = (got - expected).abs().max().item()
    print(f"{target}: max |logits difference| {difference:.3g} (largest logit {expected.abs().max().item():.3g})")
    assert got.shape == expected.shape == (2, 32, 2048) and difference < TOLERANCE
    generated = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 14) and torch.equal(generated[:, :8], ids[:1, :8])
    # greedy continuation: megatron-core's argmax over the generated prefix gives the same next tokens
    assert torch.equal(megatron_logits(megatron, generated[:, :-1])[0, 7:].argmax(-1), generated[0, 8:])


def test_verify_hf_passes_layer_by_layer(gloo_world, exported, capsys):
    save, output, target = exported
    assert cli(["verify-hf", "--load", str(save), "--model", str(output), "--seq-length", "16"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("0", "1", "2", "3", "logits")]
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "logits"]
    assert all(float(row[1]) < 1e-5 for row in rows)


@pytest.mark.parametrize("exported", ["qwen3_moe"], indirect=True)
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


SMALL = dict(vocab_size=2048, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, bos_token_id=None, eos_token_id=2, pad_token_id=0,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def random_mixtral():  # head_dim other than hidden / heads
    return MixtralForCausalLM(MixtralConfig(**SMALL, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                            head_dim=12, architectures=["MixtralForCausalLM"]))


def random_qwen2():  # a dense layer, renormalised gates, a gated shared expert, query/key/value biases
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**SMALL, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                              moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                              mlp_only_layers=[1], norm_topk_prob=True, qkv_bias=True,
                                              architectures=["Qwen2MoeForCausalLM"]))


def random_olmoe():
    return OlmoeForCausalLM(OlmoeConfig(**SMALL, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                        architectures=["OlmoeForCausalLM"]))


def random_glm4():  # partial rope, biases, per-head q/k norms, groups, gate scaling, 2 shared experts
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return Glm4MoeForCausalLM(Glm4MoeConfig(**{**SMALL, "rope_parameters": rope}, intermediate_size=48,
                                            n_routed_experts=8, num_experts_per_tok=4, moe_intermediate_size=16,
                                            first_k_dense_replace=1, n_group=4, topk_group=2, head_dim=12,
                                            attention_bias=True, use_qk_norm=True, routed_scaling_factor=2.5,
                                            n_shared_experts=2, num_nextn_predict_layers=0,
                                            architectures=["Glm4MoeForCausalLM"]))


RANDOM = {"qwen3_moe": lambda: random_qwen3(tie=True), "deepseek_v3": random_deepseek, "mixtral": random_mixtral,
          "qwen2_moe": random_qwen2, "olmoe": random_olmoe, "glm4_moe": random_glm4}


def write_random_model(folder: Path, model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # norms, the expert bias: away from their initial ones and zeros
        for name, tensor in model.state_dict().items():
            if "norm" in name or "bias" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    model.save_pretrained(str(folder))
    write_tokenizer(corpus().tokenizer_model, folder)


@pytest.mark.parametrize("family", list(RANDOM))
def test_an_imported_model_computes_the_same_logits_and_exports_byte_identical(gloo_world, tmp_path, family):
    torch.manual_seed(1)
    original = RANDOM[family]().eval()
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
    compared = compare(tmp_path / "ckpt", tmp_path / "hf", length=8)  # verify-hf, layer by layer
    assert len(compared.layers) == 3 and max(delta for delta, _ in [*compared.layers, compared.logits]) < TOLERANCE

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
MIXTRAL = ["--config", str(CONFIGS / "moe_mixtral_tiny.yaml")]
QWEN2 = ["--config", str(CONFIGS / "moe_qwen2_tiny.yaml")]
OLMOE = ["--config", str(CONFIGS / "moe_olmoe_tiny.yaml")]
GLM4 = ["--config", str(CONFIGS / "moe_glm4_tiny.yaml")]


def test_the_presets_are_represented_and_auto_picks_their_target():
    assert export_problems(parse_args(QWEN3), "qwen3_moe") == []
    assert export_problems(parse_args(DEEPSEEK), "deepseek_v3") == []
    for target, preset in PRESETS.items():  # each family's preset: that family, and no other
        args = parse_args(["--config", str(CONFIGS / f"{preset}.yaml")])
        assert choose_target(args) == target
        assert [name for name in FAMILIES if not export_problems(args, name)] == [target]
    # DeepSeek's routing with standard attention and no q/k norms: GLM-4.5's attention, not DeepSeek-V3's
    assert choose_target(parse_args(["--config", str(CONFIGS / "moe_deepseek_tiny.yaml")])) == "glm4_moe"
    with pytest.raises(HfExportError, match="no Hugging Face target represents this model") as refused:
        choose_target(parse_args(["--config", str(CONFIGS / "moe_small.yaml")]))
    assert all(f"  {name} (" in str(refused.value) for name in FAMILIES)


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
    (MIXTRAL, ["--qk-layernorm"], "mixtral", "--qk-layernorm: Mixtral no query/key norms"),
    (MIXTRAL, ["--moe-router-pre-softmax"], "mixtral", "--moe-router-pre-softmax: Mixtral renormalises"),
    (MIXTRAL, ["--moe-router-topk", "1", "--moe-granularity", "1"], "mixtral", "--moe-router-topk 1 = top-1"),
    (MIXTRAL, ["--moe-layer-freq", "[0,1,1,1]"], "mixtral", "Mixtral has experts in every layer"),
    (MIXTRAL, ["--add-qkv-bias"], "mixtral", "--add-qkv-bias: Mixtral has no query/key/value biases"),
    (MIXTRAL, ["--rotary-percent", "0.5"], "mixtral", "--rotary-percent 0.5: Mixtral rotates the whole of each head"),
    (QWEN2, ["!moe_shared_expert_gate"], "qwen2_moe",
     "--moe-shared-expert-gate not set: Qwen2-MoE gates its shared expert with a sigmoid"),
    (QWEN2, ["--qk-layernorm"], "qwen2_moe", "--qk-layernorm: Qwen2-MoE no query/key norms"),
    (QWEN3, [], "qwen2_moe", "--moe-shared-expert-intermediate-size unset: Qwen2-MoE has a shared expert"),
    (OLMOE, ["!qk_layernorm_across_heads"], "olmoe",
     "--qk-layernorm: OLMoE RMS-normalises each token's whole query and key projections"),
    (OLMOE, ["--kv-channels", "8"], "olmoe", "--kv-channels 8: OLMoE's heads are hidden_size / num_attention_heads"),
    (OLMOE, ["--moe-shared-expert-intermediate-size", "64"], "olmoe", "OLMoE has no shared expert"),
    (GLM4, ["--moe-router-score-function", "softmax"], "glm4_moe", "GLM-4.5 routes with sigmoid scores"),
    (GLM4, ["--moe-layer-freq", "[1,0,1,1]"], "glm4_moe", "GLM-4.5 has its dense layers first"),
    (GLM4, ["--moe-shared-expert-intermediate-size", "96"], "glm4_moe", "GLM-4.5's shared expert is a whole number"),
    (GLM4, ["--qk-layernorm-across-heads"], "glm4_moe", "--qk-layernorm --qk-layernorm-across-heads: GLM-4.5"),
])
def test_each_option_a_target_lacks_is_refused_by_its_flag(base, flags, target, message):
    """``!name``: the preset's switch ``name`` turned off."""
    args = parse_args(base + [flag for flag in flags if not flag.startswith("!")])
    for flag in flags:
        if flag.startswith("!"):
            setattr(args, flag[1:], False)
    with pytest.raises(HfExportError) as refused:
        choose_target(args, target)
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


def test_the_whole_projection_qk_norm_is_olmoes_and_its_flag_is_checked():
    """--qk-layernorm-across-heads: megatron-core's [s, b, heads, head_dim] normalised over heads x head_dim, as
    OLMoE's RMSNorm does on the flat projection (fp64, random weights and inputs); refused without its needs."""
    from types import SimpleNamespace

    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    from granular_moe.config import GranularMoEConfigError
    from granular_moe.training.model import KeyProjectionRMSNorm, QueryProjectionRMSNorm

    config = SimpleNamespace(num_attention_heads=4, num_query_groups=2)
    generator = torch.Generator().manual_seed(0)
    for norm_class, heads in ((QueryProjectionRMSNorm, 4), (KeyProjectionRMSNorm, 2)):
        ours, theirs = norm_class(config, 8, eps=1e-6).double(), OlmoeRMSNorm(heads * 8, eps=1e-6).double()
        weight = torch.rand(heads * 8, generator=generator, dtype=torch.float64) + 0.5
        ours.weight.data.copy_(weight)
        theirs.weight.data.copy_(weight)
        x = torch.randn(5, 3, heads, 8, generator=generator, dtype=torch.float64)
        assert torch.allclose(ours(x), theirs(x.reshape(5, 3, heads * 8)).view(5, 3, heads, 8), atol=1e-14)
    for flags, message in ((["--qk-layernorm-across-heads"], "needs --qk-layernorm and --normalization RMSNorm"),
                           (["--tensor-model-parallel-size", "2"], "needs --tensor-model-parallel-size 1")):
        with pytest.raises(GranularMoEConfigError, match=message):
            base = OLMOE if "--tensor-model-parallel-size" in flags else ["--qk-layernorm"]
            parse_args(base + flags)
