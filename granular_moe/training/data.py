"""Pretraining data: megatron-core GPT datasets over an indexed dataset (``--data-path``, or the embedded
corpus), deterministic resumable micro-batch iterators, and the ``granular-moe preprocess`` command.

The trainer calls :func:`build_data` on every rank, then :func:`train_batches` (resumable from a sample count)
and :func:`eval_batches`. Sample order is megatron-core's: fixed by ``--seed``, ``--seq-length``, ``--split``,
the data and the number of samples asked for (``--train-iters`` x global batch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from granular_moe.config import GranularMoEConfigError
from granular_moe.training.corpus import (
    DEFAULT_CORPUS_MAX_BYTES,
    DEFAULT_SUFFIXES,
    cache_root,
    embedded_corpus,
    find_text_files,
    read_documents,
    write_indexed_dataset,
)
from granular_moe.training.tokenizer import DEFAULT_VOCAB_SIZE, SentencePieceTokenizer, train_tokenizer

logger = logging.getLogger(__name__)

# Token ids checked against the vocabulary when a dataset is opened (the whole file when smaller).
TOKENS_CHECKED = 1 << 24


@dataclass
class PretrainingData:
    """What :func:`build_data` returns. ``valid`` and ``test`` are None with ``--eval-iters 0`` or a split
    that gives them no document."""

    tokenizer: SentencePieceTokenizer
    train: GPTDataset
    valid: GPTDataset | None
    test: GPTDataset | None
    data_prefix: str


class DataPathError(GranularMoEConfigError, FileNotFoundError):
    """A ``--data-path`` / ``--tokenizer-model`` that names no file, or one without the other."""


class DataFileError(GranularMoEConfigError):
    """A ``--data-path`` / ``--tokenizer-model`` file that cannot be used (empty, malformed, of another
    tokenizer): the message names the flag and the file."""


def _require_indexed_dataset(prefix: str) -> None:
    missing = [path for path in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(path)]
    if missing:
        raise DataPathError(f"--data-path {prefix}: no {' or '.join(missing)} "
                            "(--data-path is the prefix of PREFIX.bin and PREFIX.idx)")


def check_data_flags(args: argparse.Namespace) -> None:
    """``--data-path`` and ``--tokenizer-model`` come together and name files that exist (the embedded corpus
    when neither is given). Checked before any process starts, and again by :func:`build_data`."""
    if args.data_path is not None and args.tokenizer_model is None:
        raise DataPathError(f"--data-path {args.data_path} needs --tokenizer-model (the model it was written with)")
    if args.tokenizer_model is not None and args.data_path is None:
        raise DataPathError(f"--tokenizer-model {args.tokenizer_model} needs --data-path; the embedded corpus trains "
                            "its own tokenizer (--vocab-size)")
    if args.tokenizer_model is not None and not os.path.isfile(args.tokenizer_model):
        raise DataPathError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.data_path is not None:
        _require_indexed_dataset(str(args.data_path))


def check_data_files(args: argparse.Namespace) -> None:
    """:func:`check_data_flags`, then open the files as the job will: ``--tokenizer-model`` as a SentencePiece
    model and ``--data-path`` as an indexed dataset of its tokens (:func:`open_indexed_dataset`). The launcher
    calls it before any process starts; what cannot be used is named by flag and file."""
    check_data_flags(args)
    if args.data_path is not None:
        open_indexed_dataset(str(args.data_path), open_tokenizer(args.tokenizer_model))


def open_tokenizer(path) -> SentencePieceTokenizer:
    """``--tokenizer-model``'s SentencePiece model; an error naming the flag when it is not one."""
    try:
        return SentencePieceTokenizer(path)
    except FileNotFoundError as error:
        raise DataPathError(str(error)) from None
    except ValueError as error:
        raise DataFileError(str(error)) from None


def _open_index(prefix: str) -> IndexedDataset:
    """megatron-core's ``IndexedDataset`` of ``prefix``, its two files checked first: an error naming the flag
    and the file for an empty or malformed ``.idx``, and a ``.bin`` that is empty or not the size the index
    describes (cut short, or of another index)."""
    index, data = prefix + ".idx", prefix + ".bin"
    for path in (index, data):
        if os.path.getsize(path) == 0:
            raise DataFileError(f"--data-path {prefix}: {path} is empty (write the dataset with `granular-moe "
                                "preprocess`, or Megatron-LM's preprocess_data.py)")
    try:
        dataset = IndexedDataset(prefix)
    except (AssertionError, ValueError, KeyError, IndexError, OSError, struct.error) as error:
        raise DataFileError(f"--data-path {prefix}: {index} is not a megatron-core index ({type(error).__name__}: "
                            f"{str(error).strip()[:200]})") from None
    lengths, pointers = dataset.index.sequence_lengths, dataset.index.sequence_pointers
    expected = int(pointers[-1]) + int(lengths[-1]) * dataset.index.dtype_size if len(lengths) else 0
    if os.path.getsize(data) != expected:
        raise DataFileError(f"--data-path {prefix}: {data} holds {os.path.getsize(data):,} bytes, its index "
                            f"{index} describes {expected:,} (a file cut short, or the two are of different datasets)")
    return dataset


def open_indexed_dataset(prefix: str, tokenizer: SentencePieceTokenizer) -> IndexedDataset:
    """Open ``prefix.bin``/``.idx`` after checking what the pretraining job relies on: both files exist and
    agree, every document is one sequence (so the split is by document), and token ids fit the tokenizer's
    vocabulary. Errors name ``--data-path`` and the file."""
    _require_indexed_dataset(prefix)
    dataset = _open_index(prefix)
    if len(dataset.document_indices) - 1 != len(dataset.sequence_lengths):
        raise DataFileError(
            f"--data-path {prefix}: {len(dataset.sequence_lengths)} sequences in {len(dataset.document_indices) - 1} "
            "documents; the train/valid split is by sequence, so each document must be one sequence "
            "(write it with `granular-moe preprocess`, or Megatron-LM's preprocessing without sentence splitting)")
    tokens = numpy.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")[:TOKENS_CHECKED]
    largest = int(tokens.max()) if tokens.size else -1
    if largest >= tokenizer.vocab_size:
        raise DataFileError(f"--data-path {prefix} holds token id {largest}, beyond the vocabulary of "
                            f"--tokenizer-model {tokenizer.path} ({tokenizer.vocab_size}): not the tokenizer this data "
                            "was written with")
    return dataset


def build_gpt_datasets(data_prefix: str, tokenizer: SentencePieceTokenizer, *, seq_length: int, seed: int,
                       split: str, num_samples: Sequence[int]) -> list[GPTDataset | None]:
    """megatron-core ``GPTDataset`` splits ``[train, valid, test]`` of the indexed dataset ``data_prefix``,
    through its ``BlendedMegatronDatasetBuilder``; ``num_samples`` samples of ``seq_length`` tokens each (plus
    the next-token label). ``split`` (e.g. ``"969,30,1"``) cuts the document list into consecutive ranges.
    A split is None when it is asked for no samples or its range holds no document (an error for train, and
    for valid when it is asked for samples). Call on every rank: with ``torch.distributed`` initialised,
    rank 0 builds the sample indices (cached under :func:`cache_root`, keyed by the data files) while the
    others wait, then they load them."""
    documents = len(open_indexed_dataset(data_prefix, tokenizer).sequence_lengths)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=split,
        path_to_cache=str(_sample_index_cache(data_prefix)),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # megatron-core's causal attention makes the mask itself
    )
    for split_name, index in (("training", Split.train.value), ("validation", Split.valid.value),
                              ("test", Split.test.value)):
        bounds = config.split_matrix[index]
        wanted = num_samples[index] is None or num_samples[index] > 0
        if bounds is None or round(bounds[0] * documents) == round(bounds[1] * documents):
            if wanted and index != Split.test.value:
                raise ValueError(f"--split {split} leaves the {split_name} split of --data-path {data_prefix} "
                                 f"no document (of {documents}): give it more weight or use more data")
            config.split_matrix[index] = None
        elif not wanted:
            config.split_matrix[index] = None
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return builder.build()


def _sample_index_cache(data_prefix: str) -> Path:
    """Where megatron-core caches the sample indices of ``data_prefix``: named by the files' path, sizes and
    modification times, so rewriting the data never reuses stale indices."""
    stats = [os.stat(data_prefix + suffix) for suffix in (".bin", ".idx")]
    key = json.dumps([os.path.abspath(data_prefix)] + [[s.st_size, s.st_mtime_ns] for s in stats])
    return cache_root() / "sample-indices" / hashlib.sha256(key.encode()).hexdigest()[:16]


def pretraining_sample_counts(args: argparse.Namespace, data_parallel_size: int = 1) -> tuple[int, int, int]:
    """Samples of the train, valid and test datasets: ``--train-iters`` global batches, and ``--eval-iters``
    global batches for each evaluation set (every evaluation reads the same validation batches)."""
    global_batch = args.global_batch_size or args.micro_batch_size * data_parallel_size
    return args.train_iters * global_batch, args.eval_iters * global_batch, args.eval_iters * global_batch


def build_data(args: argparse.Namespace, data_parallel_size: int = 1,
               corpus_max_bytes: int | None = DEFAULT_CORPUS_MAX_BYTES) -> PretrainingData:
    """Tokenizer and datasets of the main job. ``args``: :func:`granular_moe.training.arguments.parse_args`'s
    namespace. With ``--data-path``, that indexed dataset and ``--tokenizer-model`` (required); without, the
    embedded corpus with a ``--vocab-size`` tokenizer (at most ``corpus_max_bytes`` of source; None: all),
    built on first use. Call on every rank."""
    check_data_flags(args)
    if args.data_path is not None:
        tokenizer = open_tokenizer(args.tokenizer_model)
        data_prefix = str(args.data_path)
    else:
        corpus = embedded_corpus(args.vocab_size, corpus_max_bytes)
        tokenizer = SentencePieceTokenizer(corpus.tokenizer_model)
        data_prefix = corpus.prefix
    train, valid, test = build_gpt_datasets(
        data_prefix, tokenizer, seq_length=args.seq_length, seed=args.seed, split=args.split,
        num_samples=pretraining_sample_counts(args, data_parallel_size))
    return PretrainingData(tokenizer, train, valid, test, data_prefix)


class PretrainingBatchSampler(torch.utils.data.Sampler):
    """Megatron-LM's ``MegatronPretrainingSampler``: dataset indices in order from ``consumed_samples``; each
    step takes the next ``micro_batch_size x data_parallel_size`` indices and this rank gets its slice of
    ``micro_batch_size``. An incomplete last step is dropped."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        step = micro_batch_size * data_parallel_size
        if micro_batch_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"micro batch {micro_batch_size}, data-parallel rank {data_parallel_rank} of "
                             f"{data_parallel_size}: need a positive batch and a rank inside the group")
        if consumed_samples % step or not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed samples {consumed_samples}: must be a multiple of micro batch x data "
                             f"parallel ({step}) within the dataset's {total_samples} samples")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = step

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        for begin in range(self.consumed_samples, self.total_samples - self.step + 1, self.step):
            first = begin + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def train_batches(dataset: GPTDataset, micro_batch_size: int, consumed_samples: int = 0,
                  data_parallel_rank: int = 0, data_parallel_size: int = 1,
                  num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches after ``consumed_samples`` samples (counted over all data-parallel ranks):
    dicts of ``tokens``, ``labels`` (int64 ``[b, s]``), ``loss_mask`` (float ``[b, s]``) and ``position_ids``
    (int64 ``[b, s]``), on the CPU. Resuming at ``consumed_samples = n`` gives exactly the micro-batches the
    uninterrupted iterator gives after its first ``n`` samples. No attention mask: megatron-core's causal
    attention makes it (pass ``attention_mask=None``)."""
    sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                      data_parallel_rank, data_parallel_size)
    return _loader(dataset, sampler, num_workers)


def eval_batches(dataset: GPTDataset, micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the whole evaluation set (the ``num_samples`` it was built with, e.g.
    ``--eval-iters`` global batches), in the same order at every call; tensors as in :func:`train_batches`."""
    total = dataset.num_samples if dataset.num_samples is not None else len(dataset)
    sampler = PretrainingBatchSampler(total, 0, micro_batch_size, data_parallel_rank, data_parallel_size)
    return _loader(dataset, sampler, num_workers)


def _loader(dataset: GPTDataset, sampler: PretrainingBatchSampler, num_workers: int) -> Iterator[dict]:
    """A DataLoader iterator with its own generator: starting one draws a seed, which must not come from the
    global RNG that dropout uses (a resumed run would draw it at another point than the uninterrupted one)."""
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available(), generator=torch.Generator()))


# ---------------------------------------------------------------------------------------------------------
# granular-moe preprocess


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granular-moe preprocess",
        description="Tokenize text into megatron-core's indexed dataset (PREFIX.bin/.idx) for --data-path, "
                    "with a SentencePiece model given or trained on the same text; or build the embedded corpus.",
        allow_abbrev=False,
    )
    parser.add_argument("--input", nargs="+", type=Path, metavar="FILE_OR_DIR",
                        help="text files (.jsonl: one document per line) and directories (searched recursively)")
    parser.add_argument("--output-prefix", type=Path, help="writes PREFIX.bin and PREFIX.idx (and PREFIX.model)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer-model", type=Path, help="an existing SentencePiece model")
    tokenizer.add_argument("--train-tokenizer", action="store_true",
                           help="train a byte-fallback BPE model on the input, saved as PREFIX.model")
    parser.add_argument(
        "--vocab-size", type=int, default=None, help=f"vocabulary to train (default {DEFAULT_VOCAB_SIZE})"
    )
    parser.add_argument("--suffixes", nargs="+", default=list(DEFAULT_SUFFIXES),
                        help="file name endings read from directories (default: %(default)s)")
    parser.add_argument("--json-key", default="text", help="the text field of .jsonl records (default: text)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing threads")
    parser.add_argument("--embedded-corpus", action="store_true",
                        help="instead: build (or find) the embedded corpus and print its --data-path and "
                             "--tokenizer-model")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_CORPUS_MAX_BYTES,
                        help="with --embedded-corpus: cap on the source bytes (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``granular-moe preprocess``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.embedded_corpus:
            if args.input or args.output_prefix or args.tokenizer_model or args.train_tokenizer:
                parser.error("--embedded-corpus takes only --vocab-size and --max-bytes")
            corpus = embedded_corpus(args.vocab_size or DEFAULT_VOCAB_SIZE, args.max_bytes)
            manifest = corpus.manifest
            print(f"{'built' if corpus.built else 'cached'}: {manifest['documents']} documents, "
                  f"{manifest['tokens']} tokens, vocabulary {manifest['vocab_size']}")
            print(f"--data-path {corpus.prefix} --tokenizer-model {corpus.tokenizer_model}")
            return 0
        if args.max_bytes is not None:
            parser.error("--max-bytes needs --embedded-corpus")
        if not args.input or args.output_prefix is None:
            parser.error("--input and --output-prefix are required (or --embedded-corpus)")
        if not (args.tokenizer_model or args.train_tokenizer):
            parser.error("give --tokenizer-model MODEL, or --train-tokenizer to train one on the input")
        if args.vocab_size is not None and not args.train_tokenizer:
            parser.error("--vocab-size needs --train-tokenizer (a given model has its own vocabulary)")
        documents = list(read_documents(find_text_files(args.input, args.suffixes), args.json_key))
        if args.train_tokenizer:
            model_path = Path(f"{args.output_prefix}.model")
            tokenizer = train_tokenizer(documents, args.vocab_size or DEFAULT_VOCAB_SIZE, model_path)
        else:
            tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        counts = write_indexed_dataset(documents, tokenizer, args.output_prefix, num_threads=args.workers)
    except (OSError, ValueError) as error:
        print(f"granular-moe preprocess: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, {counts['tokens']} tokens, "
          f"vocabulary {tokenizer.vocab_size}")
    print(f"--data-path {args.output_prefix} --tokenizer-model {tokenizer.path}")
    return 0
