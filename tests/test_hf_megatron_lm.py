"""A checkpoint Megatron-LM core_v0.19.0 writes with the plugin (the patched pretrain_gpt.py, or the no-patch
wrapper) exports as the main job's do: Megatron-LM's own pretrain_gpt.py __main__ parses Megatron-LM's flags
(a GLM-4.5-shaped model: --add-qkv-bias, --rotary-percent 0.5, per-head q/k norms, grouped-query attention,
sigmoid routing with the expert bias in groups, a shared expert, a dense first layer), builds the model with its
GPTModelBuilder and saves it with its save_checkpoint (torch_dist, --verify-integrity); export-hf streams it to
a folder whose transformers logits equal the megatron-core model's (loaded by the main job from the same
checkpoint), and verify-hf passes. Needs MEGATRON_LM_DIR (skipped without it, as tests/test_megatron_lm.py)."""

import json
import textwrap

import pytest
import torch

from granular_moe.cli import main as cli
from test_hf import TOLERANCE, corpus, hf_logits
from test_megatron_lm import MEGATRON_LM_DIR, NEEDS_CHECKOUT, pretrain_gpt_folder, run_script

SAVE_SCRIPT = textwrap.dedent('''
    """Megatron-LM's pretrain_gpt.py __main__ (patched, or through the wrapper), pretrain replaced by: build the
    model from the config pretrain_gpt.py made, move its norms and expert bias off their initial values, save it
    with Megatron-LM's save_checkpoint."""
    import sys, warnings
    warnings.simplefilter("ignore")
    mode, checkout, first, save = sys.argv[1:5]
    FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--kv-channels", "16", "--qk-layernorm", "--add-qkv-bias",
             "--rotary-percent", "0.5", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
             "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "96", "--num-experts", "4",
             "--moe-granularity", "2", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2",
             "--moe-layer-freq", "([0]+[1])", "--moe-router-score-function", "sigmoid",
             "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
             "--moe-shared-expert-intermediate-size", "32", "--seq-length", "32", "--max-position-embeddings", "32",
             "--micro-batch-size", "2", "--transformer-impl", "local", "--disable-bias-linear",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", "2047", "--no-persist-layer-norm",
             "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
             "--no-rope-fusion",
             "--use-cpu-initialization", "--mock-data", "--train-iters", "1", "--ckpt-format", "torch_dist",
             "--save", save, "--save-interval", "1", "--no-save-optim", "--no-save-rng", "--verify-integrity"]
    import torch
    from megatron_lm_driver import build_model, run_pretrain_gpt


    def pretrain(full_config, *args, **kwargs):
        from megatron.training import checkpointing

        model = build_model(full_config, cpu_checkpointing=True)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if isinstance(tensor, torch.Tensor) and ("norm" in name or "bias" in name):
                    tensor.add_(0.1 * torch.randn_like(tensor))
        checkpointing.save_checkpoint(1, [model], None, None, 0)


    run_pretrain_gpt(mode, checkout, first, FLAGS, pretrain)
''')


@NEEDS_CHECKOUT
@pytest.mark.parametrize("mode", ["patched", "wrapper"])
def test_a_megatron_lm_checkpoint_exports_as_the_main_jobs_do(gloo_world, mode, tmp_path, capsys):
    from granular_moe.hf.megatron_io import load_model, megatron_logits

    save = tmp_path / "mlm"
    run_script(SAVE_SCRIPT, [mode, MEGATRON_LM_DIR, pretrain_gpt_folder(mode, tmp_path), save], tmp_path)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (save / "iter_0000001" / "integrity.json").is_file()  # Megatron-LM's --verify-integrity manifest

    tokenizer = corpus().tokenizer_model  # Megatron-LM's NullTokenizer has none; 2048 pieces, as its padded vocab
    assert cli(["export-hf", "--load", str(save), "--output", str(tmp_path / "hf"), "--tokenizer-model",
                str(tokenizer), "--max-shard-size", "100KB"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["attention_bias"], config["use_qk_norm"]) == ("glm4_moe", True, True)
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5 and config["n_routed_experts"] == 8
    ids = torch.randint(3, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    _, megatron = load_model(save)  # the main job's model, loaded from Megatron-LM's checkpoint
    _, got = hf_logits(tmp_path / "hf", ids)
    difference = (got - megatron_logits(megatron, ids)).abs().max().item()
    with capsys.disabled():
        print(f"Megatron-LM ({mode}) checkpoint as glm4_moe: max |logits difference| {difference:.3g}")
    assert difference < TOLERANCE
    assert cli(["verify-hf", "--load", str(save), "--model", str(tmp_path / "hf"), "--seq-length", "16"]) == 0
    assert "verify-hf: ok" in capsys.readouterr().out
