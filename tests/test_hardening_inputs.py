"""Every bad input named once, before any process starts: the command line's values get the checks the
config file's get; empty or malformed --data-path files and a --tokenizer-model that is not SentencePiece are
opened by the launcher and named with their flag; --resume-if-exists refuses a mistyped --load (one that does
not exist and is not --save) instead of starting from scratch over the earlier run."""

import os
from pathlib import Path

import pytest

from granular_moe.config import GranularMoEConfigError
from granular_moe.training.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--micro-batch-size", "4",
        "--train-iters", "4"]


def launch(argv, monkeypatch):
    from granular_moe.training import launch as launcher

    monkeypatch.setattr(launcher.os, "execvpe", lambda *a: pytest.fail("the launcher started the job"))
    return launcher.main(["torchrun", "--script", str(SCRIPT), "--nproc-per-node", "2", *argv],
                         {"PATH": os.environ["PATH"]})


@pytest.mark.parametrize("flag, value, message", [
    ("--hidden-size", "-64", "--hidden-size must be >= 1, got -64"),
    ("--num-experts", "-4", "--num-experts must be >= 0, got -4"),
    ("--seq-length", "0", "--seq-length must be >= 1, got 0"),
    ("--hidden-dropout", "1.5", "--hidden-dropout must lie in [0, 1), got 1.5"),
    ("--adam-eps", "0", "--adam-eps must be > 0, got 0.0"),
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--moe-aux-loss-coeff", "-0.01", "--moe-aux-loss-coeff must be >= 0, got -0.01"),
])
def test_command_line_values_get_the_config_files_checks(tmp_path, monkeypatch, capsys, flag, value, message):
    """--hidden-size -64 on the command line used to start the workers, each failing on a negative dimension."""
    with pytest.raises(GranularMoEConfigError) as on_the_command_line:
        parse_args(TINY + [flag, value])
    config = tmp_path / "job.yaml"
    config.write_text(f"{flag[2:]}: {value}\n")
    others = [arg for index, arg in enumerate(TINY) if flag not in TINY[max(index - 1, 0):index + 1]]
    with pytest.raises(GranularMoEConfigError) as in_the_config:
        parse_args(others + ["--config", str(config)])
    assert str(on_the_command_line.value) == str(in_the_config.value) == message
    assert launch(TINY + [flag, value, "--save", str(tmp_path / "run")], monkeypatch) == 2
    assert capsys.readouterr().err == f"granular-moe launch: error: {message}\n"
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small indexed dataset (.bin/.idx) and the SentencePiece model it was written with."""
    from granular_moe.training.corpus import write_indexed_dataset
    from granular_moe.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    texts = [f"def function_{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    tokenizer = train_tokenizer(texts, 300, root / "tokenizer.model")
    write_indexed_dataset(texts, tokenizer, str(root / "data"))
    return root / "data", root / "tokenizer.model"


@pytest.mark.parametrize("damage, named", [
    ("both empty", "{prefix}.idx is empty"),
    ("empty bin", "{prefix}.bin is empty"),
    ("garbage idx", "{prefix}.idx is not a megatron-core index"),
    ("cut bin", "{prefix}.bin holds"),
])
def test_empty_or_malformed_data_files_are_named_with_their_flag_by_the_launcher(
        dataset, tmp_path, monkeypatch, capsys, damage, named):
    """An empty .bin/.idx used to give 7 tracebacks ("cannot mmap an empty file"), neither flag nor file named."""
    prefix, tokenizer = dataset
    bad = tmp_path / "data"
    index, data = prefix.with_suffix(".idx").read_bytes(), prefix.with_suffix(".bin").read_bytes()
    contents = {"both empty": (b"", b""), "empty bin": (index, b""), "garbage idx": (b"MMIDIDX\x00\x00" + b"\x07" * 40,
                                                                                     data),
                "cut bin": (index, data[: len(data) // 2])}[damage]
    bad.with_suffix(".idx").write_bytes(contents[0])
    bad.with_suffix(".bin").write_bytes(contents[1])
    assert launch(TINY + ["--data-path", str(bad), "--tokenizer-model", str(tokenizer), "--save",
                          str(tmp_path / "run")], monkeypatch) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"granular-moe launch: error: --data-path {bad}: {named.format(prefix=bad)}")
    assert error.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_tokenizer_that_is_not_sentencepiece_is_named_by_the_launcher(dataset, tmp_path, monkeypatch, capsys):
    """It used to be named only after the workers started, once per rank."""
    prefix, _ = dataset
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {"type": "BPE"}}')
    assert launch(TINY + ["--data-path", str(prefix), "--tokenizer-model", str(tokenizer), "--save",
                          str(tmp_path / "run")], monkeypatch) == 2
    assert capsys.readouterr().err.startswith(
        f"granular-moe launch: error: --tokenizer-model {tokenizer}: not a SentencePiece model")


def test_the_checked_dataset_still_opens(dataset, monkeypatch):
    from granular_moe.training.data import check_data_files

    prefix, tokenizer = dataset
    check_data_files(parse_args(TINY + ["--data-path", str(prefix), "--tokenizer-model", str(tokenizer)]))


def test_resume_if_exists_refuses_a_mistyped_load_and_leaves_the_earlier_run(tmp_path, monkeypatch, capsys):
    """--resume-if-exists with a mistyped --load used to start from scratch and replace the run's newest
    checkpoint."""
    from granular_moe.training.arguments import check_inputs

    run = tmp_path / "run"
    (run / "iter_0000004").mkdir(parents=True)
    (run / "iter_0000004" / "metadata.json").write_text("{}")
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    flags = TINY + ["--save", str(run), "--resume-if-exists", "--load", str(tmp_path / "rnu")]
    with pytest.raises(GranularMoEConfigError, match="--load .*rnu: no such folder \\(a typo\\?\\); with "
                       "--resume-if-exists a --load other than --save"):
        check_inputs(parse_args(flags))
    assert launch(flags, monkeypatch) == 2
    assert "rnu: no such folder (a typo?)" in capsys.readouterr().err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    # a --load that is --save may not exist yet: a requeued job's first start (it says so when it starts)
    check_inputs(parse_args(TINY + ["--save", str(tmp_path / "new"), "--load", str(tmp_path / "new"),
                                    "--resume-if-exists"]))
