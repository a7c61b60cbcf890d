"""Data: tokenizer, preprocessing into megatron-core's indexed dataset, the embedded corpus and its cache,
GPT datasets split by document, resumable micro-batch iterators, and ``granular-moe preprocess``."""

import json
import os
import pickle
import random
import re
import threading
from pathlib import Path

import numpy
import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import free_port
from granular_moe import cli
from granular_moe.training import corpus as corpus_module
from granular_moe.training.arguments import parse_args
from granular_moe.training.corpus import (
    embedded_corpus,
    find_text_files,
    select_stdlib_documents,
    stdlib_root,
    write_indexed_dataset,
)
from granular_moe.training.data import (
    PretrainingBatchSampler,
    build_data,
    build_gpt_datasets,
    eval_batches,
    main,
    train_batches,
)
from granular_moe.training.tokenizer import SentencePieceTokenizer, train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta theta lambda sigma omega def return class import yield "
         "for while if else pass print self value index total count").split()
VOCAB = 400


def make_documents(count, seed=0):
    """Small documents of Python-like text, document ``i`` tagged ``doc<i>`` (about 0.5 KB each)."""
    rng = random.Random(seed)
    documents = []
    for i in range(count):
        lines = [f"# doc{i}"]
        for _ in range(rng.randint(4, 10)):
            indent = "    " * rng.randint(0, 2)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
            lines.append(f"{indent}{words} = {rng.randint(0, 999)}")
        documents.append("\n".join(lines) + "\n")
    return documents


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches (embedded corpora, sample indices) in its own folder."""
    monkeypatch.setenv("GRANULAR_MOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(make_documents(60, seed=1), VOCAB, tmp_path_factory.mktemp("tok") / "t.model")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, tokenizer):
    """40 tagged documents written as an indexed dataset: (prefix, documents)."""
    documents = make_documents(40, seed=2)
    prefix = str(tmp_path_factory.mktemp("data") / "small")
    write_indexed_dataset(documents, tokenizer, prefix)
    return prefix, documents


def test_tokenizer_round_trips_any_text_and_reloads_equal(tmp_path, tokenizer):
    awkward = ["a\r\n\tb  \n", "  leading and trailing  ", "\u2581 literal\u2581space symbol \u2581",
               "caf\u00e9 \u4e2d\u6587 \U0001F600 \x00 \ufeff", "</s><pad><unk>", ""]
    for text in awkward + make_documents(3, seed=9):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    reloaded = SentencePieceTokenizer(tokenizer.path)
    assert reloaded.vocab_size == tokenizer.vocab_size == VOCAB
    assert (reloaded.eod, reloaded.pad) == (2, 0)
    assert reloaded.vocab == tokenizer.vocab
    assert tokenizer.eod not in tokenizer.encode("</s>")
    text = make_documents(1, seed=5)[0]
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == tokenizer.encode(text)
    # Training is deterministic: the same documents give the same model file.
    again = train_tokenizer(make_documents(60, seed=1), VOCAB, tmp_path / "again.model")
    assert Path(again.path).read_bytes() == Path(tokenizer.path).read_bytes()
    assert again.unique_identifiers == tokenizer.unique_identifiers


def test_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--vocab-size 100: too small"):
        train_tokenizer(make_documents(5), 100, tmp_path / "x.model")
    with pytest.raises(ValueError, match="--vocab-size 50000"):
        train_tokenizer(make_documents(5), 50000, tmp_path / "x.model")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*no such file"):
        SentencePieceTokenizer(tmp_path / "absent.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="--tokenizer-model .*not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


def test_preprocessing_round_trip_through_indexed_and_gpt_dataset(small_dataset, tokenizer):
    prefix, documents = small_dataset
    indexed = IndexedDataset(prefix)
    assert len(indexed) == len(indexed.document_indices) - 1 == len(documents)  # one sequence per document
    for i, document in enumerate(documents):
        sequence = indexed[i]
        assert sequence[-1] == tokenizer.eod and tokenizer.eod not in sequence[:-1]
        assert tokenizer.decode(sequence[:-1]) == document

    seq_length = 100
    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=seq_length, seed=3, split="1,0,0",
                                            num_samples=[None, 0, 0])
    assert valid is None and test is None
    epoch_tokens = sum(len(indexed[i]) for i in range(len(documents)))
    assert len(train) == (epoch_tokens - 1) // seq_length
    sequences = [indexed[i].tolist() for i in range(len(documents))]
    whole_documents = 0
    for index in range(len(train)):
        sample = train[index]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (seq_length,)
        assert (tokens[1:] == labels[:-1]).all() and (sample["loss_mask"] == 1).all()
        ids = tokens.tolist() + labels[-1:].tolist()
        ends = [i + 1 for i, token in enumerate(ids) if token == tokenizer.eod]
        pieces = [ids[a:b] for a, b in zip([0] + ends, ends + [len(ids)])]
        if len(pieces) == 1:  # inside one document
            assert any(_contains(sequence, ids) for sequence in sequences)
            continue
        # The sample: the end of a document, whole documents (each ending in EOD), the start of a document.
        assert any(sequence[len(sequence) - len(pieces[0]):] == pieces[0] for sequence in sequences)
        for inner in pieces[1:-1]:
            assert tokenizer.decode(inner[:-1]) in documents and inner[-1] == tokenizer.eod
            whole_documents += 1
        assert any(sequence[: len(pieces[-1])] == pieces[-1] for sequence in sequences)
    assert whole_documents > 0


def _contains(sequence, part):
    return any(sequence[i: i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_split_is_by_document(small_dataset, tokenizer):
    prefix, documents = small_dataset
    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=32, seed=1, split="3,1,0",
                                            num_samples=[200, 40, 0])
    assert test is None
    assert len(train.indices) == 30 and len(valid.indices) == 10
    assert not set(train.indices.tolist()) & set(valid.indices.tolist())

    def tags(dataset, count):
        text = " ".join(tokenizer.decode(dataset[i]["tokens"]) for i in range(count))
        return set(int(tag) for tag in re.findall(r"# doc(\d+)\n", text))

    valid_tags, train_tags = tags(valid, 40), tags(train, 200)
    assert valid_tags and train_tags
    assert valid_tags <= set(valid.indices.tolist()) and train_tags <= set(train.indices.tolist())

    with pytest.raises(ValueError, match="--split 999,1,0 leaves the validation split .* no document"):
        build_gpt_datasets(prefix, tokenizer, seq_length=32, seed=1, split="999,1,0", num_samples=[10, 10, 0])


def test_resumed_iterator_reproduces_the_stream_and_ranks_partition_batches(small_dataset, tokenizer):
    prefix, _ = small_dataset
    train = build_gpt_datasets(prefix, tokenizer, seq_length=16, seed=7, split="1,0,0",
                               num_samples=[96, 0, 0])[0]
    stream = list(train_batches(train, micro_batch_size=2))
    assert len(stream) == len(train) // 2
    resumed = list(train_batches(train, micro_batch_size=2, consumed_samples=20))
    assert len(resumed) == len(stream) - 10
    for got, expected in zip(resumed, stream[10:]):
        assert all((got[key] == expected[key]).all() for key in ("tokens", "labels", "loss_mask", "position_ids"))

    # Two data-parallel ranks of micro batch 2: each step, rank 0 then rank 1 make one micro batch of 4.
    ranks = [list(train_batches(train, 2, consumed_samples=8, data_parallel_rank=r, data_parallel_size=2))
             for r in range(2)]
    wide = list(train_batches(train, 4, consumed_samples=8))
    assert len(ranks[0]) == len(ranks[1]) == len(wide)
    for rank0, rank1, both in zip(*ranks, wide):
        assert (numpy.concatenate([rank0["tokens"], rank1["tokens"]]) == both["tokens"].numpy()).all()

    with pytest.raises(ValueError, match="consumed samples 3: must be a multiple"):
        train_batches(train, 2, consumed_samples=3, data_parallel_size=2)
    assert list(PretrainingBatchSampler(10, 4, 2, 1, 2)) == [[6, 7]]


def test_eval_batches_cover_the_eval_set_the_same_way_each_time(small_dataset, tokenizer):
    prefix, _ = small_dataset
    valid = build_gpt_datasets(prefix, tokenizer, seq_length=16, seed=7, split="3,1,0",
                               num_samples=[8, 12, 0])[1]
    first = list(eval_batches(valid, micro_batch_size=3))
    assert len(first) == 4
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(first, eval_batches(valid, 3)))
    halves = [list(eval_batches(valid, 3, data_parallel_rank=r, data_parallel_size=2)) for r in range(2)]
    assert len(halves[0]) == 2 and (halves[1][0]["tokens"] == first[1]["tokens"]).all()


def test_embedded_corpus_is_deterministic_cached_and_capped(tmp_path, monkeypatch):
    cap = 120_000
    corpus = embedded_corpus(vocab_size=VOCAB, max_bytes=cap, cache_dir=tmp_path / "a")
    assert corpus.built
    manifest = corpus.manifest
    assert manifest["bytes"] <= cap and manifest["documents"] == len(manifest["files"]) > 3
    assert not any("site-packages" in f for f in manifest["files"])

    # The documents are the standard library's files, read back exactly through the tokenizer.
    tokenizer = SentencePieceTokenizer(corpus.tokenizer_model)
    indexed = IndexedDataset(corpus.prefix)
    for i, relative in enumerate(manifest["files"]):
        assert tokenizer.decode(indexed[i][:-1]) == (stdlib_root() / relative).read_text(encoding="utf-8")

    # Cached: a second call reuses the folder and builds nothing.
    stamps = {path: path.stat().st_mtime_ns for path in corpus.directory.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(corpus_module, "_build_embedded_corpus", lambda *args: pytest.fail("rebuilt"))
        again = embedded_corpus(vocab_size=VOCAB, max_bytes=cap, cache_dir=tmp_path / "a")
    assert not again.built and again.directory == corpus.directory and again.manifest == manifest
    assert stamps == {path: path.stat().st_mtime_ns for path in corpus.directory.iterdir()}

    # Deterministic: a fresh build elsewhere gives the same bytes; a larger cap extends the same file list.
    other = embedded_corpus(vocab_size=VOCAB, max_bytes=cap, cache_dir=tmp_path / "b")
    assert other.built and other.directory.name == corpus.directory.name
    for name in ("corpus.bin", "corpus.idx", "tokenizer.model"):
        assert (other.directory / name).read_bytes() == (corpus.directory / name).read_bytes()
    larger = [path for path, _ in select_stdlib_documents(2 * cap)]
    assert larger[: len(manifest["files"])] == manifest["files"] and len(larger) > len(manifest["files"])


def test_embedded_corpus_is_built_once_when_many_start_together(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        embedded_corpus(vocab_size=VOCAB, max_bytes=60_000, cache_dir=tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(result.built for result in results) == [False, False, True]
    assert len({result.directory for result in results}) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch folder left


def test_build_data_from_the_embedded_corpus_and_from_data_path(small_dataset, tokenizer):
    args = parse_args(["--vocab-size", str(VOCAB), "--seq-length", "32", "--micro-batch-size", "2",
                       "--global-batch-size", "4", "--train-iters", "5", "--eval-iters", "2", "--split", "9,1,0"])
    data = build_data(args, corpus_max_bytes=300_000)
    assert data.tokenizer.vocab_size == VOCAB and data.data_prefix.endswith("corpus")
    assert data.train.num_samples == 20 and data.valid.num_samples == 8 and data.test is None
    batch = next(train_batches(data.train, 2))
    assert batch["tokens"].shape == (2, 32) and int(batch["tokens"].max()) < VOCAB

    prefix, _ = small_dataset
    args = parse_args(["--data-path", prefix, "--tokenizer-model", tokenizer.path, "--split", "9,1,0",
                       "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "1"])
    data = build_data(args, data_parallel_size=2)
    assert data.data_prefix == prefix and data.train.num_samples == 12 and data.valid.num_samples == 4


DISTRIBUTED_FLAGS = ["--vocab-size", str(VOCAB), "--seq-length", "32", "--micro-batch-size", "2",
                     "--train-iters", "3", "--eval-iters", "1", "--split", "9,1,0"]


def _rank_main(rank, world_size, port, cache, output):
    """One rank of a gloo job: build the data (corpus and sample indices) as every rank of the trainer does."""
    os.environ["GRANULAR_MOE_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        built = embedded_corpus(vocab_size=VOCAB, max_bytes=300_000).built
        data = build_data(parse_args(DISTRIBUTED_FLAGS), data_parallel_size=world_size, corpus_max_bytes=300_000)
        batches = train_batches(data.train, 2, consumed_samples=4, data_parallel_rank=rank,
                                data_parallel_size=world_size)
        tokens = torch.stack([batch["tokens"] for batch in batches])
        torch.save({"built": built, "tokens": tokens}, os.path.join(output, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_of_a_distributed_job_share_one_build_and_split_each_global_batch(tmp_path):
    cache = str(tmp_path / "cache")
    # Spawned, not forked: a forked child would inherit any process group this test session holds.
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), cache, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert sorted(result["built"] for result in ranks) == [False, True]
    data = build_data(parse_args(DISTRIBUTED_FLAGS), data_parallel_size=2, corpus_max_bytes=300_000)
    wide = torch.stack([batch["tokens"] for batch in train_batches(data.train, 4, consumed_samples=4)])
    assert ranks[0]["tokens"].shape == (len(data.train) // 4 - 1, 2, 32)
    assert (torch.cat([ranks[0]["tokens"], ranks[1]["tokens"]], dim=1) == wide).all()


def test_build_data_errors_name_the_flag(tmp_path, small_dataset, tokenizer):
    prefix, _ = small_dataset
    with pytest.raises(ValueError, match="--data-path .* needs --tokenizer-model"):
        build_data(parse_args(["--data-path", prefix]))
    with pytest.raises(ValueError, match="--tokenizer-model .* needs --data-path"):
        build_data(parse_args(["--tokenizer-model", tokenizer.path]))
    with pytest.raises(FileNotFoundError, match=r"--data-path .*absent: no .*absent\.bin or .*absent\.idx"):
        build_data(parse_args(["--data-path", str(tmp_path / "absent"), "--tokenizer-model", tokenizer.path]))
    smaller = train_tokenizer(make_documents(60, seed=1), 300, tmp_path / "smaller.model")
    with pytest.raises(ValueError, match="holds token id .* beyond the vocabulary of --tokenizer-model"):
        build_data(parse_args(["--data-path", prefix, "--tokenizer-model", smaller.path]))


def test_preprocess_command(tmp_path, capsys):
    source = tmp_path / "text"
    (source / "sub").mkdir(parents=True)
    documents = make_documents(30, seed=4)
    for i, document in enumerate(documents[:20]):
        (source / ("sub" if i % 2 else "") / f"{i:02d}.py").write_text(document)
    (source / "records.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[20:]))
    (source / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (source / "image.png").write_bytes(b"\x89PNG")
    files = find_text_files([source])
    assert [f.relative_to(source).as_posix() for f in files][:3] == ["00.py", "02.py", "04.py"]

    prefix = tmp_path / "out" / "corpus"
    with pytest.warns(UserWarning, match="skipping .*latin1.txt: not UTF-8"):
        assert cli.main(["preprocess", "--input", str(source), "--output-prefix", str(prefix),
                         "--train-tokenizer", "--vocab-size", str(VOCAB)]) == 0
    assert f"--data-path {prefix} --tokenizer-model {prefix}.model" in capsys.readouterr().out
    indexed, model = IndexedDataset(str(prefix)), SentencePieceTokenizer(f"{prefix}.model")
    expected = documents[0:20:2] + documents[20:] + documents[1:20:2]  # 00.py ... 18.py, records.jsonl, sub/
    assert [model.decode(indexed[i][:-1]) for i in range(len(indexed))] == expected

    # An existing model: the same ids for the same text.
    again = tmp_path / "again"
    assert main(["--input", str(source / "00.py"), "--output-prefix", str(again),
                 "--tokenizer-model", f"{prefix}.model"]) == 0
    reread = IndexedDataset(str(again))  # (keep it: its items are views of its memory map)
    assert (reread[0] == indexed[0]).all()

    assert main(["--input", str(tmp_path / "absent"), "--output-prefix", str(again), "--train-tokenizer"]) == 1
    assert "--input" in capsys.readouterr().err
    for wrong in (
        ["--input", str(source), "--output-prefix", str(again)],
        ["--input", str(source), "--output-prefix", str(again), "--tokenizer-model", "m", "--vocab-size", "9"],
    ):
        with pytest.raises(SystemExit):
            main(wrong)


def test_preprocess_command_builds_the_embedded_corpus(capsys):
    assert main(["--embedded-corpus", "--vocab-size", str(VOCAB), "--max-bytes", "60000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("built:")
    data_path = out.split("--data-path ")[1].split()[0]
    assert IndexedDataset(data_path).sequence_lengths.size > 0
    assert main(["--embedded-corpus", "--vocab-size", str(VOCAB), "--max-bytes", "60000"]) == 0
    assert capsys.readouterr().out.startswith("cached:")
