"""Megatron-LM integration: the no-patch wrapper (on a fake Megatron-LM tree), argument translation with
Megatron-LM's flag names, and the patch. With MEGATRON_LM_DIR pointing at a core_v0.16.1 checkout, the patch
is also applied to it and both routes build a GPT with Megatron-LM's own parser and builder."""

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from megatron.core.transformer.mlp import MLP

from granular_moe import GranularMoELayer
from granular_moe.config import GranularMoEConfigError
from granular_moe.megatron import megatron_lm
from granular_moe.megatron.megatron_lm import (
    granular_moe_args_provider,
    granular_moe_decoder_block_spec,
    with_granular_moe_args,
)

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.16.1-granular-moe.patch"
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")

FAKE_TRAINING = '''
"""A fake megatron.training: pretrain parses a few Megatron-LM flags and builds the model's spec."""
import argparse

RESULTS = {}
_ARGS = None


def get_args():
    return _ARGS


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
             process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}):
    global _ARGS
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for name in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
                 "--num-experts", "--moe-ffn-hidden-size"):
        parser.add_argument(name, type=int, default=None)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-layer-freq", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    _ARGS = RESULTS["args"] = parser.parse_args()
    RESULTS["spec"] = model_provider()
'''
FAKE_BUILDERS = '''
"""A fake gpt_builders.py: the MoE branch of Megatron-LM's gpt_builder."""
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig


def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_layer_freq=args.moe_layer_freq, add_bias_linear=False,
    )
    if args.num_experts:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="LayerNorm",
                                          qk_l2_norm=False, vp_stage=vp_stage)
    return None
'''
FAKE_PRETRAIN_GPT = '''
"""A fake pretrain_gpt.py: its __main__ calls pretrain with a ModelOpt-like extra_args_provider."""
from gpt_builders import gpt_builder
from megatron.training import get_args, pretrain


def add_modelopt_args(parser):
    parser.add_argument("--fake-modelopt-flag", type=int, default=0)
    return parser


def model_provider(pre_process=True, post_process=True):
    return gpt_builder(get_args(), pre_process, post_process)


if __name__ == "__main__":
    pretrain(None, model_provider, None, None, args_defaults={}, extra_args_provider=add_modelopt_args)
'''


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch, gloo_world):
    """A fake Megatron-LM tree (megatron-core's parallel state set up, as Megatron-LM's pretrain does before
    it builds the model); the test's imports, sys.argv, sys.path and environment are undone after."""
    from megatron.core import package_info

    (tmp_path / "megatron" / "training").mkdir(parents=True)
    (tmp_path / "megatron" / "core").mkdir()
    (tmp_path / "megatron" / "training" / "__init__.py").write_text(FAKE_TRAINING)
    (tmp_path / "megatron" / "core" / "package_info.py").write_text(
        f"MAJOR = {package_info.MAJOR}\nMINOR = {package_info.MINOR}\nPATCH = 0\n")
    (tmp_path / "gpt_builders.py").write_text(FAKE_BUILDERS)
    (tmp_path / "pretrain_gpt.py").write_text(FAKE_PRETRAIN_GPT)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.delenv("MEGATRON_LM_DIR", raising=False)
    yield tmp_path
    import megatron

    for name in ("megatron.training", "gpt_builders", "pretrain_gpt"):
        sys.modules.pop(name, None)
    if "training" in vars(megatron):
        delattr(megatron, "training")


MODEL = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "64"]


def run_wrapper(checkout, *argv):
    assert megatron_lm.main(["--megatron-lm-dir", str(checkout), *MODEL, *argv]) == 0
    return sys.modules["megatron.training"].RESULTS


def test_wrapper_adds_the_flags_and_uses_the_granular_spec(fake_checkout):
    results = run_wrapper(fake_checkout, "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4",
                          "--moe-router-type", "expert_choice", "--moe-kernels", "torch", "--fake-modelopt-flag", "3")
    args = results["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (16, 4, 16)
    assert args.fake_modelopt_flag == 3  # pretrain_gpt's own extra_args_provider still runs
    mlps = [layer.submodules.mlp for layer in results["spec"].layer_specs]
    assert [mlp.module for mlp in mlps] == [GranularMoELayer, GranularMoELayer]
    assert mlps[0].params == {"router_type": "expert_choice", "kernels": "torch"}
    assert sys.argv[0] == str(fake_checkout / "pretrain_gpt.py")
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_wrapper_keeps_dense_layers_dense(fake_checkout, monkeypatch):
    monkeypatch.setenv("MEGATRON_LM_DIR", str(fake_checkout))
    assert megatron_lm.main([*MODEL, "--num-experts", "2", "--moe-layer-freq", "2"]) == 0
    spec = sys.modules["megatron.training"].RESULTS["spec"]
    assert [layer.submodules.mlp.module for layer in spec.layer_specs] == [GranularMoELayer, MLP]


def test_wrapper_translation_errors_surface(fake_checkout):
    with pytest.raises(GranularMoEConfigError, match="--moe-granularity needs an MoE model"):
        run_wrapper(fake_checkout, "--moe-granularity", "2")


@pytest.mark.parametrize("setup, expected", [
    (lambda path: None, "pass --megatron-lm-dir PATH (or set MEGATRON_LM_DIR)"),
    (lambda path: (path / "gpt_builders.py").unlink(), "is not a Megatron-LM checkout (no gpt_builders.py)"),
    (lambda path: (path / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\nMINOR = 9\n"),
     "holds megatron-core 0.9, but"),
])
def test_wrapper_rejects_a_missing_or_mismatched_checkout(fake_checkout, setup, expected):
    setup(fake_checkout)
    argv = [] if "pass --megatron-lm-dir" in expected else ["--megatron-lm-dir", str(fake_checkout)]
    with pytest.raises(GranularMoEConfigError, match=re.escape(expected)):
        megatron_lm.main(argv)


def test_with_granular_moe_args_binds_positional_providers_and_needs_the_parameter():
    seen = []

    def pretrain(datasets, model, model_type, forward, process=None, extra_args_provider=None):
        seen.append(extra_args_provider(argparse.ArgumentParser()))

    with_granular_moe_args(pretrain)(1, 2, 3, 4, None, lambda parser: parser)
    assert "--moe-granularity" in seen[0]._option_string_actions
    with pytest.raises(GranularMoEConfigError, match="takes no extra_args_provider"):
        with_granular_moe_args(lambda datasets, model: None)


# --------------------------------------------------------------------------- argument translation


def megatron_lm_parser():
    """The flags translation touches, named, typed and defaulted as in Megatron-LM core_v0.16.1."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--ffn-hidden-size", type=int, default=None)
    parser.add_argument("--swiglu", action="store_true")
    parser.add_argument("--num-experts", type=int, default=None)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    return parser


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--hidden-size", "1024", "--ffn-hidden-size", "4096", "--num-experts", "8", "--moe-granularity", "4"],
            (32, 8, 1024),
        ),
        (
            ["--hidden-size", "1024", "--num-experts", "8", "--moe-router-topk", "1", "--moe-granularity", "8"],
            (64, 8, 512),
        ),
        # SwiGLU without --ffn-hidden-size: Megatron-LM's default, int(4 h 2/3 / 64) x 64 = 2688, split in 4.
        (["--hidden-size", "1024", "--swiglu", "--num-experts", "8", "--moe-granularity", "4"], (32, 8, 672)),
        (
            [
                "--hidden-size",
                "64",
                "--ffn-hidden-size",
                "256",
                "--moe-ffn-hidden-size",
                "128",
                "--num-experts",
                "4",
                "--moe-granularity",
                "2",
                "--expert-model-parallel-size",
                "8",
            ],
            (8, 4, 64),
        ),
    ],
)
def test_translation_with_megatron_lm_flag_names(argv, expected):
    parser = granular_moe_args_provider(None)(megatron_lm_parser())
    args = parser.parse_args(argv)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == expected


def test_translation_runs_experts_without_tensor_parallelism_unless_told_otherwise():
    parser = granular_moe_args_provider(None)(megatron_lm_parser())
    moe = ["--hidden-size", "64", "--num-experts", "4"]
    assert parser.parse_args(moe).expert_tensor_parallel_size == 1  # Megatron-LM would take TP
    assert parser.parse_args(moe + ["--expert-tensor-parallel-size", "2"]).expert_tensor_parallel_size == 2
    assert parser.parse_args(["--hidden-size", "64"]).expert_tensor_parallel_size is None  # dense: untouched


def test_translation_errors_name_the_flags():
    parser = granular_moe_args_provider(None)(megatron_lm_parser())
    with pytest.raises(GranularMoEConfigError, match="are not divisible by --expert-model-parallel-size 3"):
        parser.parse_args(["--hidden-size", "64", "--num-experts", "4", "--moe-granularity", "2",
                           "--expert-model-parallel-size", "3"])


def test_the_provider_composes_and_adds_the_flags_once():
    def modelopt(parser):
        parser.add_argument("--export-format")
        return parser

    # A patched pretrain_gpt.py run through the wrapper: the wrapper's provider wraps the patch's.
    parser = granular_moe_args_provider(granular_moe_args_provider(modelopt))(megatron_lm_parser())
    args = parser.parse_args(
        ["--hidden-size", "64", "--num-experts", "2", "--moe-granularity", "2", "--export-format", "x"]
    )
    assert (args.num_experts, args.export_format) == (4, "x")


def test_decoder_block_spec_helper_reads_router_and_kernels_from_args(gloo_world):
    from helpers import moe_config

    config = moe_config(2, num_experts=4, topk=1)
    spec = granular_moe_decoder_block_spec(argparse.Namespace(moe_router_type="expert_choice", moe_kernels="torch"),
                                           config, use_transformer_engine=False, normalization="LayerNorm")
    assert spec.layer_specs[0].submodules.mlp.params == {"router_type": "expert_choice", "kernels": "torch"}
    defaults = granular_moe_decoder_block_spec(argparse.Namespace(), config, False)
    assert defaults.layer_specs[1].submodules.mlp.params == {"router_type": "token_choice", "kernels": "auto"}


# --------------------------------------------------------------------------- the patch


def patch_files():
    """{path: [hunk, ...]} with each hunk's header, old-side lines and new-side lines."""
    files, hunk = {}, None
    lines = PATCH.read_text().splitlines()
    for line in lines:
        if line.startswith("+++ b/"):
            current = files.setdefault(line[len("+++ b/"):], [])
        elif line.startswith("@@"):
            match = re.match(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@(.*)", line)
            hunk = {"counts": (int(match.group(2)), int(match.group(4))), "where": match.group(5), "old": [], "new": []}
            current.append(hunk)
        elif hunk is not None and line[:1] in (" ", "-", "+") and not line.startswith(("---", "+++")):
            if line[0] in " -":
                hunk["old"].append(line[1:])
            if line[0] in " +":
                hunk["new"].append(line[1:])
    return files


def test_patch_touches_pretrain_gpt_and_the_moe_branch_of_gpt_builder():
    files = patch_files()
    assert sorted(files) == ["gpt_builders.py", "pretrain_gpt.py"]
    for hunks in files.values():
        for hunk in hunks:
            assert hunk["counts"] == (len(hunk["old"]), len(hunk["new"])), "hunk line counts match its lines"
    builder_hunk = files["gpt_builders.py"][1]
    assert builder_hunk["where"].strip().startswith("def gpt_builder(")
    assert "            elif args.num_experts:" in builder_hunk["old"]
    assert "                transformer_layer_spec = get_gpt_decoder_block_spec(" in builder_hunk["old"]
    main_hunk = files["pretrain_gpt.py"][1]
    assert main_hunk["where"].strip() == 'if __name__ == "__main__":'


def test_patch_calls_our_helpers_with_signatures_they_have():
    import inspect

    added = "\n".join(line for hunks in patch_files().values() for hunk in hunks for line in hunk["new"])
    imports = re.findall(r"^from granular_moe\.megatron\.megatron_lm import (\w+)$", added, re.M)
    assert sorted(imports) == ["granular_moe_args_provider", "granular_moe_decoder_block_spec"]
    builder = "\n".join(patch_files()["gpt_builders.py"][1]["new"])
    call = re.search(r"granular_moe_decoder_block_spec\((.*?)\n\s*\)", builder, re.S).group(1)
    positional = [a.strip() for a in call.split(",") if a.strip() and "=" not in a]
    keywords = re.findall(r"(\w+)=", call)
    assert positional == ["args", "config"] and keywords == ["use_transformer_engine", "normalization", "qk_l2_norm",
                                                             "vp_stage"]
    inspect.signature(granular_moe_decoder_block_spec).bind(*positional, **dict.fromkeys(keywords))
    provider_call = re.search(r"extra_args_provider=granular_moe_args_provider\((.*)\),$", added, re.M)
    assert provider_call.group(1) == "add_modelopt_args if has_nvidia_modelopt else None"
    inspect.signature(granular_moe_args_provider).bind(None)


def test_patch_applies_to_the_text_it_expects(tmp_path):
    """``git apply`` accepts the patch on files holding its old-side lines, and yields its new-side lines."""
    for name, hunks in patch_files().items():
        (tmp_path / name).write_text("\n".join(line for hunk in hunks for line in hunk["old"]) + "\n")
    result = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- against a real checkout

CHECKOUT_SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    warnings.simplefilter("ignore")
    mode = sys.argv[1]
    sys.argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                "--num-experts", "4", "--moe-granularity", "4", "--moe-router-topk", "1", "--ffn-hidden-size", "256",
                "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
                "--transformer-impl", "local", "--disable-bias-linear", "--tokenizer-type", "NullTokenizer",
                "--vocab-size", "128", "--moe-router-type", "expert_choice", "--no-persist-layer-norm",
                "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion"]
    import torch.distributed as dist
    from granular_moe import GranularMoELayer
    from granular_moe.megatron.cpu_shims import apply_cpu_shims
    from granular_moe.megatron.megatron_lm import granular_moe_args_provider, use_granular_moe_spec
    from granular_moe.training.launch import distributed_env
    import gpt_builders
    from megatron.core import parallel_state, tensor_parallel
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.global_vars import set_args
    if mode == "patched":
        import pretrain_gpt
        provider = pretrain_gpt.granular_moe_args_provider(None)
    else:
        provider = granular_moe_args_provider(None)
        use_granular_moe_spec(gpt_builders)
    args = parse_args(extra_args_provider=provider)
    args.padded_vocab_size = 128
    validate_args(args, {})
    args.use_cpu_initialization = True
    set_args(args)
    where = distributed_env()
    dist.init_process_group("gloo", init_method=where.init_method, rank=0, world_size=1)
    apply_cpu_shims()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = gpt_builders.gpt_builder(args, True, True, config=core_transformer_config_from_args(args))
    layers = [m for m in model.modules() if isinstance(m, GranularMoELayer)]
    print(json.dumps({"experts": args.num_experts, "topk": args.moe_router_topk, "layers": len(layers),
                      "router": layers[0].router_type, "weight1": list(layers[0].experts.weight1.shape)}))
''')


@pytest.mark.skipif(MEGATRON_LM_DIR is None, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")
def test_patch_applies_to_the_checkout():
    forward = subprocess.run(
        ["git", "-C", MEGATRON_LM_DIR, "apply", "--check", str(PATCH)], capture_output=True, text=True
    )
    applied = subprocess.run(["git", "-C", MEGATRON_LM_DIR, "apply", "--check", "--reverse", str(PATCH)],
                             capture_output=True, text=True)
    assert forward.returncode == 0 or applied.returncode == 0, forward.stderr


@pytest.mark.skipif(MEGATRON_LM_DIR is None, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")
@pytest.mark.parametrize("mode", ["patched", "wrapper"])
def test_megatron_lm_builds_a_granular_gpt(mode, tmp_path):
    checkout = Path(MEGATRON_LM_DIR)
    first = checkout
    if mode == "patched":
        already = (
            subprocess.run(["git", "-C", str(checkout), "apply", "--check", "--reverse", str(PATCH)]).returncode == 0
        )
        if not already:
            for name in ("pretrain_gpt.py", "gpt_builders.py"):
                (tmp_path / name).write_text((checkout / name).read_text())
            subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
            first = tmp_path
    path = os.pathsep.join([str(first), str(checkout), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", CHECKOUT_SCRIPT, mode], env={**env, "PYTHONPATH": path},
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built == {"experts": 16, "topk": 4, "layers": 2, "router": "expert_choice", "weight1": [16, 64, 64]}
