"""configs/: every file loads in the main job's parser; MoE and dense pairs match; the sizes and the
arithmetic written in each file's comments hold."""

import re
from pathlib import Path

import pytest

from granular_moe.training.arguments import parse_args
from granular_moe.training.launch import check_layout

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = {"mini": 90e6, "small": 300e6, "medium": 500e6, "base": 1.9e9}
SHARED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
          "position_embedding_type", "normalization", "swiglu", "untie_embeddings_and_output_weights",
          "disable_bias_linear", "micro_batch_size", "global_batch_size", "train_iters", "lr", "min_lr",
          "lr_warmup_iters", "lr_decay_style", "weight_decay", "clip_grad", "vocab_size")


def load(name):
    return parse_args(["--config", str(CONFIGS / f"{name}.yaml")])


def non_embedding_parameters(args, experts_counted):
    """Per layer: attention 4 d^2 (no biases), ``experts_counted`` experts of 2 d x width (or the dense FFN),
    router, two LayerNorms (weight + bias); plus the final LayerNorm."""
    d = args.hidden_size
    if args.num_experts:
        ffn = experts_counted * 2 * d * args.moe_ffn_hidden_size + args.num_experts * d
    else:
        ffn = 2 * d * args.ffn_hidden_size
    return args.num_layers * (4 * d * d + ffn + 4 * d) + 2 * d


def commented_number(name, label):
    text = (CONFIGS / f"{name}.yaml").read_text()
    return int(re.search(rf"^#\s+{label}: .*?= ([\d,]+)", text, re.M).group(1).replace(",", ""))


PRESETS = ("deepseek_tiny", "qwen3_tiny")


def test_every_config_file_is_known_here():
    names = {path.stem for path in CONFIGS.glob("*.yaml")}
    hf_families = {"moe_mixtral_tiny", "moe_qwen2_tiny", "moe_olmoe_tiny", "moe_glm4_tiny"}  # tests/test_hf.py's
    assert names == {"cpu_default", "sweep_cpu", "sweep_gpu", "moe_deepseek_tiny_hf", *hf_families} | {
        f"{kind}_{size}" for kind in ("moe", "dense") for size in (*SIZES, *PRESETS)}


@pytest.mark.parametrize("preset", PRESETS)
def test_todays_model_presets_and_their_dense_counterparts(preset):
    """The DeepSeek-V3- and Qwen3-style presets: their routing options, and dense counterparts whose active
    parameters equal theirs but for the routers (the numbers written in the files' comments)."""
    from granular_moe.scaling import count_parameters, shape_from_args

    moe, dense = load(f"moe_{preset}"), load(f"dense_{preset}")
    active = {name: count_parameters(shape_from_args(args)) for name, args in (("moe", moe), ("dense", dense))}
    assert active["moe"].active - active["moe"].embedding - active["moe"].router == (
        active["dense"].active - active["dense"].embedding)
    assert active["moe"].active - active["moe"].embedding == commented_number(f"moe_{preset}", "active")
    assert active["dense"].active - active["dense"].embedding == commented_number(f"dense_{preset}", "active")
    if preset == "deepseek_tiny":
        assert (moe.moe_router_score_function, moe.moe_router_enable_expert_bias) == ("sigmoid", True)
        assert (moe.moe_router_num_groups, moe.moe_router_group_topk) == (4, 2)
        assert moe.moe_shared_expert_intermediate_size == moe.moe_ffn_hidden_size == 64
        assert moe.moe_router_load_balancing_type == "seq_aux_loss" and moe.moe_layer_freq == [0, 1, 1, 1]
    else:
        assert (moe.moe_router_load_balancing_type, moe.moe_aux_loss_coeff) == ("global_aux_loss", 1e-3)
        assert moe.moe_shared_expert_intermediate_size is None and moe.qk_layernorm and moe.num_query_groups == 2
    assert check_layout(moe, 2).num_experts == moe.num_experts


@pytest.mark.parametrize("name", ["cpu_default", "sweep_cpu", "sweep_gpu"])
def test_job_configs_load_as_moe_jobs(name):
    args = load(name)
    assert args.num_experts and 1 <= args.moe_router_topk <= args.num_experts


@pytest.mark.parametrize("size", SIZES)
def test_moe_and_dense_pairs_match(size):
    moe, dense = load(f"moe_{size}"), load(f"dense_{size}")
    assert {key: getattr(moe, key) for key in SHARED} == {key: getattr(dense, key) for key in SHARED}
    assert dense.num_experts is None
    # Active FFN width: top-k x expert width of the base MoE, unchanged by G.
    assert dense.ffn_hidden_size == moe.moe_router_topk * moe.moe_ffn_hidden_size == moe.ffn_hidden_size
    assert moe.moe_granularity > 1 and moe.moe_layer_freq == 1


@pytest.mark.parametrize("size", SIZES)
def test_sizes_and_the_arithmetic_in_the_comments(size):
    moe, dense = load(f"moe_{size}"), load(f"dense_{size}")
    active = non_embedding_parameters(moe, moe.moe_router_topk)
    assert active == commented_number(f"moe_{size}", "active")
    assert non_embedding_parameters(moe, moe.num_experts) == commented_number(f"moe_{size}", "total")
    assert non_embedding_parameters(dense, 0) == commented_number(f"dense_{size}", "total")
    assert abs(active / SIZES[size] - 1) < 0.05


@pytest.mark.parametrize("size", SIZES)
def test_moe_configs_fit_eight_gpus_with_ep_8(size):
    args = parse_args(["--config", str(CONFIGS / f"moe_{size}.yaml"), "--expert-model-parallel-size", "8"])
    assert check_layout(args, 8).num_experts // 8 == args.num_experts // 8


def test_cpu_default_is_the_small_embedded_run():
    args = load("cpu_default")
    assert (args.moe_granularity, args.moe_layer_freq, args.data_path) == (4, 1, None)
    assert args.hidden_size <= 128 and args.num_layers <= 4 and args.seq_length <= 128
    assert non_embedding_parameters(args, args.moe_router_topk) == commented_number("cpu_default", "active")
    assert non_embedding_parameters(args, args.num_experts) == commented_number("cpu_default", "total")
    assert check_layout(args, 2).data == 2
