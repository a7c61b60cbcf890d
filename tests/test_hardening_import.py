"""import-hf checks a folder before it allocates anything for it: a config.json whose sizes need more memory
than the machine has is refused naming the keys (hidden_size 1e9 used to try to allocate 8 TB, vocab_size 1e12
128 TB), the safetensors headers must hold the config's tensors at its shapes (a tensor of another shape is
named with both shapes: it used to fail in torch.stack, unnamed), and weights holding NaN / Inf are refused by
name unless --allow-non-finite (they used to import silently)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config

from granular_moe.cli import main as cli
from granular_moe.hf import HfImportError, import_hf as import_module
from granular_moe.hf.import_hf import import_hf
from granular_moe.hf.megatron_io import one_process_args
from granular_moe.hf.targets import flags_from_hf, parse_model_flags
from test_hf import RANDOM, random_deepseek, random_qwen3, write_random_model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "qwen3"
    torch.manual_seed(1)
    write_random_model(folder, random_qwen3(tie=False))
    return folder


@pytest.fixture
def changed(qwen3, tmp_path):
    """A copy of the folder, to change."""
    shutil.copytree(qwen3, tmp_path / "model")
    return tmp_path / "model"


def edit_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensor(folder, name, tensor):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("key, value, named", [
    ("hidden_size", 10**9, "hidden_size 1,000,000,000"),
    ("vocab_size", 10**12, "vocab_size 1,000,000,000,000"),
    ("moe_intermediate_size", 10**6, "moe_intermediate_size 1,000,000"),
])
def test_absurd_sizes_are_refused_by_key_before_anything_is_allocated(changed, tmp_path, monkeypatch, key, value,
                                                                       named):
    from granular_moe.hf import megatron_io, skeleton

    monkeypatch.setattr(import_module, "read_tensors", lambda *a: pytest.fail("read the tensors"))
    monkeypatch.setattr(megatron_io, "build_model", lambda *a: pytest.fail("built the model"))
    monkeypatch.setattr(skeleton, "skeleton", lambda *a: pytest.fail("built the model's skeleton"))
    edit_config(changed, **{key: value})
    if key == "vocab_size":
        (changed / "tokenizer.model").unlink()  # else the tokenizer's vocabulary refuses it first
    with pytest.raises(HfImportError) as refused:
        import_hf(changed, tmp_path / "ckpt")
    assert named in str(refused.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_tensor_of_another_shape_is_named_with_both_shapes(changed, tmp_path):
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    edit_tensor(changed, name, torch.zeros(15, 32))
    with pytest.raises(HfImportError) as refused:
        import_hf(changed, tmp_path / "ckpt")
    assert str(refused.value).splitlines()[1:] == [
        f"  - {name} (model.safetensors): config.json gives [moe_intermediate_size 16, hidden_size 32], the file "
        "holds [15, 32]"]
    assert not (tmp_path / "ckpt").exists()


def test_non_finite_weights_are_refused_by_name_unless_allowed(changed, tmp_path, capsys):
    name = "model.layers.0.mlp.experts.5.down_proj.weight"
    tensor = load_file(str(changed / "model.safetensors"))[name]
    tensor[3, 7] = float("nan")
    edit_tensor(changed, name, tensor)
    assert cli(["import-hf", "--model", str(changed), "--save", str(tmp_path / "ckpt")]) == 2
    assert (f"import-hf: error: --model {changed}: 1 tensor(s) hold NaN or Inf: {name} (model.safetensors); pass "
            "--allow-non-finite") in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
    assert cli(["import-hf", "--model", str(changed), "--save", str(tmp_path / "ckpt"), "--allow-non-finite"]) == 0
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "0"


def deepseek_without_query_rank():
    model = random_deepseek()
    config = DeepseekV3Config(**{**model.config.to_dict(), "q_lora_rank": None})
    return type(model)(config)


OTHERS = ("mixtral", "qwen2_moe", "olmoe", "glm4_moe")


@pytest.mark.parametrize("make", [lambda: random_qwen3(tie=True), lambda: random_qwen3(tie=False), random_deepseek,
                                  deepseek_without_query_rank, *[RANDOM[name] for name in OTHERS]],
                         ids=["qwen3-tied", "qwen3", "deepseek_v3", "deepseek_v3-full-query", *OTHERS])
def test_the_shapes_checked_are_the_ones_transformers_writes(tmp_path, make):
    from granular_moe.hf.families import FAMILIES
    from granular_moe.hf.mappings import hf_shapes, sizes

    model = make()
    write_random_model(tmp_path / "hf", model)
    args = one_process_args(parse_model_flags(flags_from_hf(model.config)))
    args.padded_vocab_size = 2048
    expected = hf_shapes(FAMILIES[model.config.model_type].mappings(args, model.config.vocab_size))
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {name: sizes(shape) for name, shape in expected.items()} == {
        name: tuple(tensor.shape) for name, tensor in written.items()}
