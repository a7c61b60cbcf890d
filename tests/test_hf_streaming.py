"""Hugging Face conversion streamed and split: the export of checkpoints saved at TP 2 and PP 2 is the whole-model
conversion byte for byte; ``--workers 2`` and two torchrun ranks write the same files as one worker (export:
every shard and the index; import: every checkpoint file, ``.metadata`` included); the streamed import is what
megatron-core's own save of the model writes (the same entries, the same tensors once loaded) and reshards; a
failed or killed conversion leaves nothing under the output name; ``verify-hf`` compares layer by layer, its
layer-by-layer forwards equal the whole models', and it names the first layer a damaged folder changes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import free_port, without_rendezvous
from distributed import run_distributed
from granular_moe.cli import main as cli
from granular_moe.hf.export import export_hf
from granular_moe.hf.families import FAMILIES
from granular_moe.hf.import_hf import import_hf
from granular_moe.hf.mappings import to_hf, to_megatron
from granular_moe.hf.megatron_io import build_model, load_model, megatron_logits, one_process_args, save_model
from granular_moe.training.checkpoint import find_checkpoint
from granular_moe.training.trusted_reader import read_metadata_file
from test_hf import CONFIGS, TRAIN, job, random_glm4, random_qwen2, tensors_of, write_random_model

ROOT = Path(__file__).resolve().parents[1]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --------------------------------------------------------------------------- export from any layout


def train(root: Path, preset: str, layout: str) -> Path:
    """The preset trained 2 steps on 2 gloo processes with ``layout`` 2."""
    save = root / "run"
    run_distributed(job, 2, ["--config", str(CONFIGS / f"{preset}.yaml"), *TRAIN[:1], "2", *TRAIN[2:],
                             layout, "2", "--save-interval", "2", "--save", str(save)])
    return save


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    return train(tmp_path_factory.mktemp("tp2"), "moe_qwen2_tiny", "--tensor-model-parallel-size")


@pytest.fixture(scope="module")
def pp2_checkpoint(tmp_path_factory):
    return train(tmp_path_factory.mktemp("pp2"), "moe_glm4_tiny", "--pipeline-model-parallel-size")


@pytest.fixture(params=[("qwen2_moe", "tp2_checkpoint"), ("glm4_moe", "pp2_checkpoint")], ids=["TP2", "PP2"])
def saved(request):
    target, checkpoint = request.param
    return target, request.getfixturevalue(checkpoint)


def test_an_export_from_tp2_or_pp2_is_the_whole_model_conversion(gloo_world, saved, tmp_path):
    target, save = saved
    export_hf(save, tmp_path / "hf", max_shard_size="300KB")
    args, megatron = load_model(save)  # megatron-core's own resharding load into one process
    reference = to_hf(megatron.state_dict(), FAMILIES[target].mappings(args, 2048))
    written = tensors_of(tmp_path / "hf")
    assert sorted(written) == sorted(reference)
    for name, tensor in reference.items():
        expected = tensor.float() if name.endswith("e_score_correction_bias") else tensor
        assert torch.equal(written[name].view(torch.uint8), expected.contiguous().view(torch.uint8)), name


def test_workers_and_torchrun_ranks_write_the_shards_one_worker_writes(gloo_world, tp2_checkpoint, tmp_path):
    save = tp2_checkpoint
    export_hf(save, tmp_path / "one", max_shard_size="300KB")
    one = files_of(tmp_path / "one")
    assert sum(name.endswith(".safetensors") for name in one) > 3
    assert cli(["export-hf", "--load", str(save), "--output", str(tmp_path / "workers"), "--max-shard-size", "300KB",
                "--workers", "2"]) == 0
    assert files_of(tmp_path / "workers") == one
    done = torchrun(["export-hf", "--load", str(save), "--output", str(tmp_path / "ranks"), "--max-shard-size",
                     "300KB"])
    assert done.stdout.count("export-hf: wrote") == 1  # said once, not once per rank
    assert files_of(tmp_path / "ranks") == one
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one", "ranks", "workers"]  # no staging left


# --------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2") / "hf"
    torch.manual_seed(3)
    write_random_model(folder, random_qwen2())
    return folder


def test_the_streamed_import_is_what_megatron_core_saves_and_it_reshards(gloo_world, qwen2_folder, tmp_path):
    """Reference: the whole folder converted at once into the one-process model, saved by megatron-core."""
    from safetensors.torch import load_file

    directory = import_hf(qwen2_folder, tmp_path / "streamed")
    args, streamed = load_model(tmp_path / "streamed")
    model = build_model(one_process_args(args), args.padded_vocab_size)
    state = to_megatron(load_file(str(qwen2_folder / "model.safetensors")),
                        FAMILIES["qwen2_moe"].mappings(args, args.padded_vocab_size))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing)
    reference = save_model(tmp_path / "reference", model, args)
    ours, theirs = (read_metadata_file(d / ".metadata").state_dict_metadata for d in (directory, reference))
    assert sorted(ours) == sorted(theirs)
    for key, entry in theirs.items():
        assert type(ours[key]) is type(entry), key
        if hasattr(entry, "chunks"):
            assert (ours[key].size, ours[key].properties.dtype) == (entry.size, entry.properties.dtype), key
            assert [(c.offsets, c.sizes) for c in ours[key].chunks] == [(c.offsets, c.sizes) for c in entry.chunks]
    assert sorted(p.name for p in directory.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                          "__2_0.distcp", "__3_0.distcp", "integrity.json",
                                                          "metadata.json"]
    _, saved_by_megatron = load_model(tmp_path / "reference")
    ours_state, reference_state = streamed.state_dict(), saved_by_megatron.state_dict()
    assert all(torch.equal(ours_state[name], value) for name, value in reference_state.items()
               if isinstance(value, torch.Tensor))
    # and it reshards: the main job at TP 2 loads it (test_hf trains from an import at EP 2)
    sums = run_distributed(_load_at_tp2, 2, str(tmp_path / "streamed"))[0]
    whole = {name: value.double().sum().item() for name, value in ours_state.items() if isinstance(value, torch.Tensor)}
    assert sums.keys() <= whole.keys() and len(sums) > 10 and any("experts" in name for name in sums)
    for name, value in sums.items():
        assert value == pytest.approx(whole[name], rel=1e-9, abs=1e-9), name


def _load_at_tp2(rank, world_size, load):
    """Load the import into the main job's model at TP 2; the sums of the tensors split over TP (gathered)."""
    import torch.distributed as dist

    from granular_moe.parallel import initialize_model_parallel
    from granular_moe.training.arguments import parse_args
    from granular_moe.training.checkpoint import find_checkpoint, load_checkpoint
    from granular_moe.training.engine import build_engine
    from granular_moe.training.model import transformer_config_from_args

    args = parse_args(["--config", str(Path(load) / "model.yaml"), "--tensor-model-parallel-size", "2",
                       "--micro-batch-size", "2", "--fp32", "--load", load, "--finetune"])
    initialize_model_parallel(tensor=2)
    args.global_batch_size, args.padded_vocab_size = 2, 2048
    engine = build_engine(args, transformer_config_from_args(args), 2048)
    load_checkpoint(find_checkpoint(load), engine, args, finetune=True)
    sums = {}
    for name, param in engine.modules[0].named_parameters():
        total = param.detach().double().sum()
        if getattr(param, "tensor_model_parallel", False):
            dist.all_reduce(total)
        sums[name.removeprefix("module.")] = total.item()
    return sums


def test_workers_and_torchrun_ranks_write_the_checkpoint_one_worker_writes(qwen2_folder, tmp_path):
    import_hf(qwen2_folder, tmp_path / "ckpt")  # the same --save each time: the arguments saved name it
    one = files_of(tmp_path / "ckpt")
    os.replace(tmp_path / "ckpt", tmp_path / "one")
    assert cli(["import-hf", "--model", str(qwen2_folder), "--save", str(tmp_path / "ckpt"), "--workers", "2"]) == 0
    assert files_of(tmp_path / "ckpt") == one
    os.replace(tmp_path / "ckpt", tmp_path / "workers")
    torchrun(["import-hf", "--model", str(qwen2_folder), "--save", str(tmp_path / "ckpt")])
    assert files_of(tmp_path / "ckpt") == one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "one", "workers"]


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    """``granular-moe ARGV`` on two ranks started by torchrun (``torch.distributed.run``)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "granular_moe.cli", *argv], env=without_rendezvous(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# --------------------------------------------------------------------------- failures leave nothing


def test_bad_flags_are_named_together_before_anything_is_read(tmp_path, capsys, monkeypatch):
    from granular_moe.hf import export

    monkeypatch.setattr(export, "prepare", lambda *a: pytest.fail("read the checkpoint"))
    assert cli(["export-hf", "--load", str(tmp_path), "--output", str(tmp_path / "hf"), "--workers", "0",
                "--max-shard-size", "lots"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "export-hf: error: --max-shard-size 'lots' is not valid; give a size such as 5GB, 500MB, 64KB or a byte "
        "count; --workers must be >= 1, got 0"]
    assert cli(["import-hf", "--model", str(tmp_path), "--save", str(tmp_path / "ckpt"), "--workers", "0"]) == 2
    assert "import-hf: error: --workers must be >= 1, got 0" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_a_failing_conversion_leaves_nothing(gloo_world, qwen2_folder, tmp_path, monkeypatch):
    from granular_moe.hf import checkpoint_writer, export

    real_write, real_save = checkpoint_writer.write_file, export.write_shards
    calls = []

    def failing_write(directory, layout, plan, produce):
        calls.append(plan.name)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real_write(directory, layout, plan, produce)

    monkeypatch.setattr("granular_moe.hf.import_hf.write_file", failing_write)
    with pytest.raises(OSError, match="injected"):
        import_hf(qwen2_folder, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr("granular_moe.hf.import_hf.write_file", real_write)
    import_hf(qwen2_folder, tmp_path / "ckpt")

    def failing_shards(plan, index, count):
        real_save(plan, index, count)
        raise OSError("disk full (injected)")

    monkeypatch.setattr("granular_moe.hf.export.write_shards", failing_shards)
    with pytest.raises(OSError, match="injected"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


KILLED = textwrap.dedent('''
    """Run a conversion whose writer kills its own process after its first file or shard."""
    import os, signal, sys
    from granular_moe.hf import checkpoint_writer, export
    from granular_moe.cli import main

    def then_die(real):
        def write(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return write

    import granular_moe.hf.import_hf as import_module
    import_module.write_file = then_die(checkpoint_writer.write_file)
    real_save_file = __import__("safetensors.torch", fromlist=["save_file"]).save_file
    import safetensors.torch
    safetensors.torch.save_file = then_die(real_save_file)
    main(sys.argv[1:])
''')


def test_a_killed_conversion_leaves_nothing_under_the_output_name(qwen2_folder, tmp_path):
    for argv, output in ((["import-hf", "--model", str(qwen2_folder), "--save", str(tmp_path / "ckpt")], "ckpt"),):
        done = subprocess.run([sys.executable, "-c", KILLED, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        assert not (tmp_path / output).exists()
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(f".{output}.tmp-")]
        assert len(staged) == 1 and (staged[0] / "iter_0000000" / "__0_0.distcp").is_file()  # killed mid-way
    import_hf(qwen2_folder, tmp_path / "ckpt")
    done = subprocess.run([sys.executable, "-c", KILLED, "export-hf", "--load", str(tmp_path / "ckpt"), "--output",
                           str(tmp_path / "hf"), "--max-shard-size", "100KB"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (tmp_path / "hf").exists() and find_checkpoint(tmp_path / "ckpt") is not None


# --------------------------------------------------------------------------- verify-hf


@pytest.fixture(scope="module")
def glm4_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4")
    torch.manual_seed(4)
    write_random_model(root / "hf", random_glm4())
    import_hf(root / "hf", root / "ckpt")
    return root / "ckpt", root / "hf"


def test_verify_hf_prints_each_layer_and_passes(gloo_world, glm4_pair, capsys):
    ckpt, folder = glm4_pair
    assert cli(["verify-hf", "--load", str(ckpt), "--model", str(folder), "--seq-length", "16"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("0", "1", "2", "logits")]
    assert [row[0] for row in rows] == ["0", "1", "2", "logits"]
    assert all(float(row[1]) < 1e-6 and float(row[2]) > 1e-3 for row in rows)
    assert out.rstrip().endswith("verify-hf: ok: logits within 0.0001")


def test_the_layer_by_layer_forwards_are_the_whole_models(gloo_world, glm4_pair):
    """Each side's streamed forward (layers loaded as they run) against the whole model's forward."""
    from transformers import AutoModelForCausalLM

    from granular_moe.hf.verify import hf_side, megatron_side

    ckpt, folder = glm4_pair
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(5))
    _, megatron = megatron_side(ckpt, verify=True)
    _, hf = hf_side(folder)
    with torch.no_grad():
        streamed, hidden = megatron(ids)
        _, whole = load_model(ckpt)
        assert torch.equal(streamed, megatron_logits(whole, ids)) and len(hidden) == 3
        hf_streamed, hf_hidden = hf(ids)
        reference = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(ids, output_hidden_states=True)
    assert torch.equal(hf_streamed, reference.logits) and len(hf_hidden) == 3
    assert torch.equal(hf_hidden[0], reference.hidden_states[1])


def test_verify_hf_names_the_first_layer_a_damaged_folder_changes(gloo_world, glm4_pair, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt, folder = glm4_pair
    damaged = tmp_path / "hf"
    damaged.mkdir()
    for path in folder.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(damaged / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight"] *= 1.5
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    assert cli(["verify-hf", "--load", str(ckpt), "--model", str(damaged), "--seq-length", "16"]) == 1
    out = capsys.readouterr().out
    deltas = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
              if line.strip().split(" ")[0] in ("0", "1", "2", "logits")}
    assert deltas["0"] < 1e-6 and deltas["1"] > 1e-3 and deltas["logits"] > 1e-4
    assert "verify-hf: FAILED: logits differ by" in out
    assert json.loads((damaged / "config.json").read_text())["model_type"] == "glm4_moe"
