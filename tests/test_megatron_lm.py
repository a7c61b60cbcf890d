"""Megatron-LM integration: the no-patch wrapper (on a fake Megatron-LM tree), argument translation with
Megatron-LM's flag names, and the patch. With MEGATRON_LM_DIR pointing at a core_v0.19.0 checkout, the patch
is also applied to it and both routes run Megatron-LM's own pretrain_gpt.py __main__ (its parser, model config
and GPTModelBuilder) up to the built model."""

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

from conftest import without_rendezvous
from granular_moe.config import GranularMoEConfigError
from granular_moe.megatron import megatron_lm
from granular_moe.megatron.megatron_lm import (
    granular_moe_args_provider,
    granular_moe_decoder_block_spec,
    with_granular_moe_spec,
)
from granular_moe.megatron.spec import is_granular_moe

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "core_v0.19.0" / "megatron-lm-granular-moe.patch"
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")

FAKE_TRAINING = '''
"""A fake megatron.training: pretrain builds the spec of the model config it is given."""
RESULTS = {}


def pretrain(full_config, dataset_provider=None, model_type=None, forward_step=None, **kwargs):
    RESULTS["config"] = full_config
    spec = full_config.transformer_layer_spec
    RESULTS["spec"] = spec(full_config, vp_stage=None) if callable(spec) else spec
'''
FAKE_ARGUMENTS = '''
"""A fake megatron.training.arguments: parse_and_validate_args parses a few Megatron-LM flags."""
import argparse


def parse_and_validate_args(extra_args_provider=None, ignore_unknown_args=False, args_defaults={}):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for name in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
                 "--num-experts", "--moe-ffn-hidden-size", "--mtp-num-layers"):
        parser.add_argument(name, type=int, default=None)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-layer-freq", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--spec", nargs=2, default=None)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser.parse_args()
'''
FAKE_ARGUMENT_UTILS = '''
"""A fake megatron.training.argument_utils: gpt_config_from_args makes a GPTModelConfig-like object."""
import types

from megatron.core.transformer.transformer_config import TransformerConfig


def gpt_config_from_args(args, config=None, model_config_cls=None):
    transformer = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_layer_freq=args.moe_layer_freq, add_bias_linear=False,
        transformer_impl="local", mtp_num_layers=args.mtp_num_layers,
    )
    return types.SimpleNamespace(transformer=transformer, restore_modelopt_state=False,
                                 transformer_layer_spec=None if args.spec is None else tuple(args.spec))
'''
FAKE_PRETRAIN_GPT = '''
"""A fake pretrain_gpt.py: its __main__ parses with a ModelOpt-like extra_args_provider and pretrains the
config gpt_config_from_args makes, as Megatron-LM core_v0.19.0's does."""
from megatron.training import RESULTS, pretrain
from megatron.training.argument_utils import gpt_config_from_args
from megatron.training.arguments import parse_and_validate_args


def add_modelopt_args(parser):
    parser.add_argument("--fake-modelopt-flag", type=int, default=0)
    return parser


if __name__ == "__main__":
    args = RESULTS["args"] = parse_and_validate_args(extra_args_provider=add_modelopt_args, args_defaults={})
    model_cfg = gpt_config_from_args(args)
    pretrain(model_cfg, None, None, None)
'''


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch, gloo_world):
    """A fake Megatron-LM tree (megatron-core's parallel state set up, as Megatron-LM's pretrain does before
    it builds the model); the test's imports, sys.argv, sys.path and environment are undone after."""
    from megatron.core import package_info

    (tmp_path / "megatron" / "training").mkdir(parents=True)
    (tmp_path / "megatron" / "core").mkdir()
    (tmp_path / "megatron" / "training" / "__init__.py").write_text(FAKE_TRAINING)
    (tmp_path / "megatron" / "training" / "arguments.py").write_text(FAKE_ARGUMENTS)
    (tmp_path / "megatron" / "training" / "argument_utils.py").write_text(FAKE_ARGUMENT_UTILS)
    (tmp_path / "megatron" / "core" / "package_info.py").write_text(
        f"MAJOR = {package_info.MAJOR}\nMINOR = {package_info.MINOR}\nPATCH = 0\n")
    (tmp_path / "pretrain_gpt.py").write_text(FAKE_PRETRAIN_GPT)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.delenv("MEGATRON_LM_DIR", raising=False)
    yield tmp_path
    import megatron

    for name in ("megatron.training", "megatron.training.arguments", "megatron.training.argument_utils",
                 "pretrain_gpt"):
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
    assert results["args"].fake_modelopt_flag == 3  # pretrain_gpt's own extra_args_provider still runs
    transformer = results["config"].transformer
    assert (transformer.num_moe_experts, transformer.moe_router_topk, transformer.moe_ffn_hidden_size) == (16, 4, 16)
    mlps = [layer.submodules.mlp for layer in results["spec"].layer_specs]
    assert all(is_granular_moe(mlp) for mlp in mlps)
    assert {k: mlps[0].keywords[k] for k in ("router_type", "kernels")} == {"router_type": "expert_choice",
                                                                             "kernels": "torch"}
    assert sys.argv[0] == str(fake_checkout / "pretrain_gpt.py")
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_wrapper_keeps_dense_layers_dense(fake_checkout, monkeypatch):
    monkeypatch.setenv("MEGATRON_LM_DIR", str(fake_checkout))
    assert megatron_lm.main([*MODEL, "--num-experts", "2", "--moe-layer-freq", "2"]) == 0
    spec = sys.modules["megatron.training"].RESULTS["spec"]
    kinds = [layer.submodules.mlp for layer in spec.layer_specs]
    assert is_granular_moe(kinds[0]) and kinds[1].func.__self__ is MLP


def test_wrapper_leaves_dense_models_to_megatron(fake_checkout):
    results = run_wrapper(fake_checkout)
    assert results["spec"] is None and results["config"].transformer_layer_spec is None


def test_wrapper_translation_errors_surface(fake_checkout):
    with pytest.raises(GranularMoEConfigError, match="--moe-granularity needs an MoE model"):
        run_wrapper(fake_checkout, "--moe-granularity", "2")


@pytest.mark.parametrize("argv, flag", [
    (["--spec", "my.module", "my_spec"], "--spec"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers"),
])
def test_what_cannot_carry_the_layer_is_refused_by_name(fake_checkout, argv, flag):
    with pytest.raises(GranularMoEConfigError, match=re.escape(flag)):
        run_wrapper(fake_checkout, "--num-experts", "4", *argv)


@pytest.mark.parametrize("setup, expected", [
    (lambda path: None, "pass --megatron-lm-dir PATH (or set MEGATRON_LM_DIR)"),
    (lambda path: (path / "pretrain_gpt.py").unlink(),
     "is not a Megatron-LM core_v0.19.0 checkout (no pretrain_gpt.py)"),
    (lambda path: (path / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\nMINOR = 16\n"),
     "holds megatron-core 0.16, but"),
])
def test_wrapper_rejects_a_missing_or_mismatched_checkout(fake_checkout, setup, expected):
    setup(fake_checkout)
    argv = [] if "pass --megatron-lm-dir" in expected else ["--megatron-lm-dir", str(fake_checkout)]
    with pytest.raises(GranularMoEConfigError, match=re.escape(expected)):
        megatron_lm.main(argv)


def test_the_spec_is_attached_once(gloo_world):
    from helpers import moe_config

    config = types_namespace(transformer=moe_config(2, num_experts=4, topk=1), transformer_layer_spec=None)
    args = argparse.Namespace(num_experts=8, spec=None, moe_router_type="token_choice", moe_kernels="torch")
    first = with_granular_moe_spec(config, args).transformer_layer_spec
    # a patched pretrain_gpt.py run through the wrapper attaches it twice
    assert with_granular_moe_spec(config, args).transformer_layer_spec is first


def types_namespace(**fields):
    import types

    return types.SimpleNamespace(restore_modelopt_state=False, **fields)


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
    chosen = spec.layer_specs[0].submodules.mlp.keywords
    assert (chosen["router_type"], chosen["kernels"]) == ("expert_choice", "torch")
    defaults = granular_moe_decoder_block_spec(argparse.Namespace(), config, False).layer_specs[1].submodules.mlp
    assert (defaults.keywords["router_type"], defaults.keywords["kernels"]) == ("token_choice", "auto")


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


def test_patch_touches_the_parser_and_the_model_config_of_pretrain_gpt():
    files = patch_files()
    assert sorted(files) == ["pretrain_gpt.py"]
    hunks = files["pretrain_gpt.py"]
    for hunk in hunks:
        assert hunk["counts"] == (len(hunk["old"]), len(hunk["new"])), "hunk line counts match its lines"
    assert [hunk["where"].strip() for hunk in hunks[1:]] == ['if __name__ == "__main__":'] * 2
    assert "    args = parse_and_validate_args(" in hunks[1]["old"]
    assert "        model_cfg = gpt_config_from_args(args)" in hunks[2]["old"]
    added = sum(len(hunk["new"]) - len(hunk["old"]) for hunk in hunks)
    assert added == 2  # an import and the spec line; the provider line is changed in place


def test_patch_calls_our_helpers_with_signatures_they_have():
    import inspect

    added = "\n".join(line for hunks in patch_files().values() for hunk in hunks for line in hunk["new"])
    imported = re.search(r"^from granular_moe\.megatron\.megatron_lm import (.+)$", added, re.M).group(1)
    assert sorted(name.strip() for name in imported.split(",")) == ["granular_moe_args_provider",
                                                                   "with_granular_moe_spec"]
    provider_call = re.search(r"extra_args_provider=granular_moe_args_provider\((.*)\),$", added, re.M)
    assert provider_call.group(1) == "add_modelopt_args if has_nvidia_modelopt else None"
    inspect.signature(granular_moe_args_provider).bind(None)
    spec_call = re.search(r"^    with_granular_moe_spec\((.*)\)$", added, re.M).group(1)
    assert spec_call == "model_cfg, args"
    inspect.signature(with_granular_moe_spec).bind("model_cfg", "args")


def test_patch_applies_to_the_text_it_expects(tmp_path):
    """``git apply`` accepts the patch on files holding its old-side lines, and yields its new-side lines."""
    for name, hunks in patch_files().items():
        (tmp_path / name).write_text("\n".join(line for hunk in hunks for line in hunk["old"]) + "\n")
    result = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- against a real checkout

CHECKOUT_SCRIPT = textwrap.dedent('''
    """Megatron-LM's pretrain_gpt.py __main__ (patched, or through the wrapper) with pretrain stopped once
    Megatron-LM's GPTModelBuilder has built the model from the config pretrain_gpt.py made."""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    mode, checkout, first = sys.argv[1:4]
    FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "4",
             "--moe-granularity", "4", "--moe-router-topk", "1", "--ffn-hidden-size", "256", "--seq-length", "64",
             "--max-position-embeddings", "64", "--micro-batch-size", "2", "--transformer-impl", "local",
             "--disable-bias-linear", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
             "--moe-router-type", "expert_choice", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
             "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--use-cpu-initialization", "--mock-data",
             "--train-iters", "1"]
    from granular_moe import GranularMoELayer
    from megatron_lm_driver import build_model, run_pretrain_gpt


    def pretrain(full_config, *args, **kwargs):
        model = build_model(full_config)
        transformer = full_config.model.transformer
        layers = [m for m in model.modules() if isinstance(m, GranularMoELayer)]
        print(json.dumps({"experts": transformer.num_moe_experts, "topk": transformer.moe_router_topk,
                          "layers": len(layers), "router": layers[0].router_type,
                          "weight1": list(layers[0].experts.weight1.shape)}))


    run_pretrain_gpt(mode, checkout, first, FLAGS, pretrain)
''')
NEEDS_CHECKOUT = pytest.mark.skipif(MEGATRON_LM_DIR is None,
                                    reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.19.0 checkout")


def pretrain_gpt_folder(mode: str, tmp_path: Path) -> Path:
    """Where the ``patched`` route finds a patched pretrain_gpt.py: the checkout when the patch is applied to
    it, else a patched copy in ``tmp_path`` (the checkout itself for the ``wrapper`` route)."""
    checkout = Path(MEGATRON_LM_DIR)
    if mode != "patched":
        return checkout
    applied = subprocess.run(["git", "-C", str(checkout), "apply", "--check", "--reverse", str(PATCH)],
                             capture_output=True).returncode == 0
    if applied:
        return checkout
    (tmp_path / "pretrain_gpt.py").write_text((checkout / "pretrain_gpt.py").read_text())
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    return tmp_path


def run_script(script: str, argv: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """``script`` (importing the checkout, this package and tests/megatron_lm_driver.py) as its own process,
    outside the test session's process group; an assertion naming its error when it fails."""
    path = os.pathsep.join([MEGATRON_LM_DIR, str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script, *map(str, argv)],
                            env={**without_rendezvous(), "PYTHONPATH": path},
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@NEEDS_CHECKOUT
def test_patch_applies_to_the_checkout():
    forward = subprocess.run(
        ["git", "-C", MEGATRON_LM_DIR, "apply", "--check", str(PATCH)], capture_output=True, text=True
    )
    applied = subprocess.run(["git", "-C", MEGATRON_LM_DIR, "apply", "--check", "--reverse", str(PATCH)],
                             capture_output=True, text=True)
    assert forward.returncode == 0 or applied.returncode == 0, forward.stderr


@NEEDS_CHECKOUT
@pytest.mark.parametrize("mode", ["patched", "wrapper"])
def test_megatron_lm_builds_a_granular_gpt(mode, tmp_path):
    result = run_script(CHECKOUT_SCRIPT, [mode, MEGATRON_LM_DIR, pretrain_gpt_folder(mode, tmp_path)], tmp_path)
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built == {"experts": 16, "topk": 4, "layers": 2, "router": "expert_choice", "weight1": [16, 64, 64]}


INTERCHANGE_SCRIPT = textwrap.dedent('''
    """Megatron-LM's pretrain_gpt.py __main__ through the wrapper (--ckpt-format torch_dist), pretrain replaced
    by: build the model from the config pretrain_gpt.py made, load the main job's checkpoint with Megatron-LM's
    own load_checkpoint, report its weights, double them and save with Megatron-LM's save_checkpoint."""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    checkout, load, save = sys.argv[1:4]
    FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-experts", "4",
             "--moe-granularity", "4", "--moe-router-topk", "1", "--ffn-hidden-size", "128", "--seq-length", "32",
             "--max-position-embeddings", "32", "--micro-batch-size", "4", "--transformer-impl", "local",
             "--disable-bias-linear", "--tokenizer-type", "NullTokenizer", "--vocab-size", "2047",
             "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
             "--no-bias-dropout-fusion", "--use-cpu-initialization", "--mock-data", "--train-iters", "1",
             "--ckpt-format", "torch_dist", "--load", load, "--save", save, "--save-interval", "1",
             "--no-load-optim", "--no-load-rng", "--no-save-optim", "--no-save-rng", "--finetune",
             "--verify-integrity"]  # checks the main job's integrity.json, and records one for the main job
    import torch
    from granular_moe import GranularMoELayer
    from megatron_lm_driver import build_model, run_pretrain_gpt


    def pretrain(full_config, *args, **kwargs):
        from megatron.training import checkpointing

        model = build_model(full_config, cpu_checkpointing=True)
        checkpointing.load_checkpoint([model], None, None)
        weights = {name: p.detach().double().sum().item() for name, p in model.named_parameters()}
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(2.0)
        checkpointing.save_checkpoint(7, [model], None, None, 0)
        granular = sum(isinstance(m, GranularMoELayer) for m in model.modules())
        print(json.dumps({"weights": weights, "granular": granular}))


    run_pretrain_gpt("wrapper", checkout, checkout, FLAGS, pretrain)
''')
MAIN_JOB = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--ffn-hidden-size", "128",
            "--micro-batch-size", "4", "--corpus-max-bytes", "300000", "--eval-iters", "1"]


def main_job_weights(rank, world_size, argv):
    """Train (or, with --finetune, load) the main job; its model's weight sums by name."""
    from granular_moe.training.arguments import parse_args
    from granular_moe.training.checkpoint import find_checkpoint, load_checkpoint
    from granular_moe.training.engine import build_engine
    from granular_moe.training.model import padded_vocab_size, transformer_config_from_args
    from granular_moe.training.pretrain import pretrain

    args = parse_args(argv)
    if args.load is None:
        pretrain(args)  # joins this process group and leaves megatron-core's parallel state set up
        args.load = args.save
    else:
        from granular_moe.parallel import initialize_model_parallel
        from granular_moe.training.checkpoint_integrity import verify_checkpoint

        verify_checkpoint(find_checkpoint(args.load))  # what the job's launcher checks first
        initialize_model_parallel()
    args.global_batch_size, args.padded_vocab_size = args.micro_batch_size, padded_vocab_size(2048, 1)
    engine = build_engine(args, transformer_config_from_args(args), 2048)
    load_checkpoint(find_checkpoint(args.load), engine, args, finetune=True)
    return {name: p.detach().double().sum().item() for name, p in engine.modules[0].named_parameters()}


@NEEDS_CHECKOUT
def test_checkpoints_interchange_with_megatron_lm(tmp_path):
    """The main job's torch_dist checkpoint loads in Megatron-LM core_v0.19.0 (its own load_checkpoint, model
    built by its GPTModelBuilder through the wrapper), and one Megatron-LM saves loads in the main job."""
    from distributed import run_distributed

    [saved] = run_distributed(main_job_weights, 1, MAIN_JOB + ["--train-iters", "2", "--save", str(tmp_path / "main")])
    result = run_script(INTERCHANGE_SCRIPT, [MEGATRON_LM_DIR, tmp_path / "main", tmp_path / "mlm"], tmp_path)
    megatron = json.loads(result.stdout.strip().splitlines()[-1])
    assert megatron["granular"] == 2 and megatron["weights"].keys() == saved.keys()
    for name, value in saved.items():
        assert megatron["weights"][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    [loaded] = run_distributed(main_job_weights, 1, MAIN_JOB + ["--load", str(tmp_path / "mlm"), "--finetune",
                                                               "--save", str(tmp_path / "unused")])
    for name, value in saved.items():
        assert loaded[name] == pytest.approx(2 * value, rel=1e-12, abs=1e-12), name
