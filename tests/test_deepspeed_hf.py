"""Hugging Face MoE models with GranularMoE blocks: replace_moe_blocks keeps a Qwen3-MoE, Mixtral or DeepSeek-V3
model's logits (fp32, before any training) at granularity 1 and 4; save_hf writes a folder transformers loads back to
the same logits; unsupported block classes and configs are refused by name before anything is replaced."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # noqa: E402  (before DeepSpeed's first import)

import copy

import pytest
import torch

from granular_moe.config import GranularMoEConfigError
from granular_moe.deepspeed.finetune import tiny_model

TOLERANCE = 1e-5
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def ds_world(gloo_world):
    from granular_moe.deepspeed.groups import ensure_deepspeed_comm

    ensure_deepspeed_comm()


def random_model(arch, **config):
    """A tiny model whose MoE blocks route decisively and weigh in the output: router, experts and expert bias
    drawn larger than transformers' initialisation."""
    model = tiny_model(arch, seed=1)
    for name, value in config.items():
        setattr(model.config, name, value)
        for module in model.modules():
            if hasattr(module, "gate") and hasattr(module.gate, name):
                setattr(module.gate, name, value)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".mlp.gate.weight" in name:
                tensor.normal_(0, 1.0)
            elif ".mlp.experts." in name or ".mlp.shared_experts." in name:
                tensor.normal_(0, 0.3)
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.normal_(0, 0.1)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


CASES = [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}), ("mixtral", {}), ("deepseek_v3", {})]


@pytest.mark.parametrize("granularity", [1, 4])
@pytest.mark.parametrize("arch, config", CASES, ids=["qwen3_moe", "qwen3_moe-pre-softmax", "mixtral", "deepseek_v3"])
def test_replaced_model_computes_the_original_logits(ds_world, arch, config, granularity):
    from granular_moe.deepspeed import GranularMoE, replace_moe_blocks
    from granular_moe.deepspeed.hf_blocks import GranularMoEBlock

    original = random_model(arch, **config)
    expected = logits(original)
    replaced = replace_moe_blocks(copy.deepcopy(original), granularity=granularity, kernels="torch").eval()
    blocks = [m for m in replaced.modules() if isinstance(m, GranularMoEBlock)]
    assert len(blocks) == (1 if arch == "deepseek_v3" else 2)  # DeepSeek-V3's first layer is dense
    assert all(isinstance(b.moe, GranularMoE) and b.moe.num_experts == 8 * granularity for b in blocks)
    difference = (logits(replaced) - expected).abs().max().item()
    assert difference < TOLERANCE, difference
    # the MoE blocks matter: without the experts' output the logits differ
    for block in blocks:
        block.moe.deepspeed_moe.experts.weight2.data.zero_()
    assert (logits(replaced) - expected).abs().max().item() > 100 * TOLERANCE


def test_unsupported_moe_block_class_is_refused_by_name(ds_world):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from granular_moe.deepspeed import UnsupportedMoEBlockError, replace_moe_blocks

    qwen2 = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                                               moe_intermediate_size=16, shared_expert_intermediate_size=16))
    with pytest.raises(UnsupportedMoEBlockError, match="Qwen2MoeSparseMoeBlock: not supported; supported: "
                                                       "Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, DeepseekV3MoE"):
        replace_moe_blocks(qwen2)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UnsupportedMoEBlockError, match="LlamaForCausalLM has no sparse MoE block"):
        replace_moe_blocks(llama)


@pytest.mark.parametrize("arch, config, granularity, message", [
    ("mixtral", {"router_jitter_noise": 0.1}, 1, "router_jitter_noise 0.1 \\(valid: 0\\)"),
    ("qwen3_moe", {}, 3, "granularity 3 does not divide the expert FFN hidden size 64"),
    ("mixtral", {"top_k": 1}, 1, "one expert per token with its gate renormalised to 1"),
], ids=["jitter", "granularity", "top-1-renormalised"])
def test_unrepresentable_configs_are_refused_before_anything_is_replaced(ds_world, arch, config, granularity,
                                                                          message):
    from granular_moe.deepspeed import replace_moe_blocks

    model = random_model(arch, **config)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(GranularMoEConfigError, match=message):
        replace_moe_blocks(model, granularity=granularity)
    assert {name: type(module) for name, module in model.named_modules()} == before


@pytest.mark.parametrize("arch, granularity", [("qwen3_moe", 2), ("mixtral", 2), ("deepseek_v3", 1)])
def test_save_hf_writes_a_folder_transformers_loads_to_the_same_logits(ds_world, tmp_path, arch, granularity):
    from transformers import AutoModelForCausalLM

    from granular_moe.deepspeed import replace_moe_blocks, save_hf

    original = random_model(arch)
    replaced = replace_moe_blocks(original, granularity=granularity, kernels="torch").eval()
    expected = logits(replaced)
    assert save_hf(replaced, tmp_path / "hf") == tmp_path / "hf"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(loaded) is type(replaced)
    assert loaded.config.num_local_experts == 8 * granularity
    assert loaded.config.num_experts_per_tok == 2 * granularity
    difference = (logits(loaded) - expected).abs().max().item()
    assert difference < TOLERANCE, difference


def test_save_hf_refuses_deepseek_group_limits_at_granularity_above_1(ds_world, tmp_path):
    from granular_moe.deepspeed import UnsupportedMoEBlockError, replace_moe_blocks, save_hf

    replaced = replace_moe_blocks(random_model("deepseek_v3"), granularity=2, kernels="torch")
    with pytest.raises(UnsupportedMoEBlockError, match="n_group 2, topk_group 1"):
        save_hf(replaced, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_options_reach_the_layers_and_moe_aux_loss_sums_them(ds_world):
    from granular_moe.deepspeed import moe_aux_loss, replace_moe_blocks
    from granular_moe.deepspeed.hf_blocks import GranularMoEBlock

    model = replace_moe_blocks(random_model("qwen3_moe"), granularity=2, kernels="torch", drop_tokens=True,
                               capacity_factor=0.5, aux_loss_type="seq_aux_loss").train()
    blocks = [m.moe for m in model.modules() if isinstance(m, GranularMoEBlock)]
    assert all(b.drop_tokens and b.capacity_factor == 0.5 and b.aux_loss_type == "seq_aux_loss" for b in blocks)
    model(IDS)
    assert sum(int(b.stats.dropped) for b in blocks) > 0  # capacity 0.5: some assignments dropped
    total = moe_aux_loss(model)
    torch.testing.assert_close(total, sum(b.l_aux.float() for b in blocks))
    assert total.requires_grad and total.item() > 0
