"""SentencePiece tokenizer: training from text documents, and a wrapper megatron-core's GPT dataset accepts.

Models trained here are byte-level BPE with byte fallback and no normalisation, so every text
round-trips exactly (whitespace, newlines and rare characters included): ``decode(encode(t)) == t``.
Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2 (the end-of-document token, ``eod``), then 256 byte pieces.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

# SentencePiece writes "▁" for a space; a literal "▁" in the text is encoded as its UTF-8 bytes instead.
SPACE_SYMBOL = "\u2581"
DEFAULT_VOCAB_SIZE = 2048
NUM_SPECIAL_PIECES = 3
NUM_BYTE_PIECES = 256

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=0.9995,
    max_sentence_length=1 << 30,  # each document is one "sentence", newlines included
    pad_id=0,
    unk_id=1,
    eos_id=2,
    bos_id=-1,
    num_threads=1,  # the trained model depends on the thread count: one thread makes it the same everywhere
    minloglevel=2,
)


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece model with what megatron-core's ``GPTDataset`` reads (``vocab_size``, ``eod``,
    ``pad``, ``unique_identifiers``) and what a trainer needs (``encode``/``decode``, ``tokenize``/
    ``detokenize``). Pickles by value, so data-loader workers get a copy."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer-model {path}: no such file")
        self._load(str(path), path.read_bytes())

    def _load(self, path: str, proto: bytes) -> None:
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"--tokenizer-model {path}: not a SentencePiece model ({error})") from None
        if processor.eos_id() < 0:
            raise ValueError(f"--tokenizer-model {path}: the model has no end-of-sequence piece (</s>), "
                             "which marks the end of each document")
        super().__init__(path, {})
        self._processor = processor
        self._proto = proto
        self.model_sha256 = hashlib.sha256(proto).hexdigest()
        byte_pieces = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in SPACE_SYMBOL.encode()]
        has_bytes = all(processor.is_byte(piece) for piece in byte_pieces)
        self._space_symbol_ids = byte_pieces if has_bytes else None

    def __getstate__(self) -> dict:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._load(state["path"], state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def eos(self) -> int:
        return self._processor.eos_id()

    @property
    def pad(self) -> int:
        """The padding id, or -1 (megatron-core's "none") when the model has no ``<pad>`` piece."""
        return self._processor.pad_id()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._processor.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core hashes into its dataset-index cache names: the model's content, not its path."""
        return OrderedDict([("class", type(self).__qualname__), ("model_sha256", self.model_sha256)])

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode several texts (in parallel threads; -1: all cores)."""
        if self._space_symbol_ids is None:
            return self._processor.encode(list(texts), num_threads=num_threads)
        pieces = [text.split(SPACE_SYMBOL) for text in texts]
        encoded = iter(self._processor.encode([part for parts in pieces for part in parts], num_threads=num_threads))
        result = []
        for parts in pieces:
            ids = list(next(encoded))
            for _ in parts[1:]:
                ids += self._space_symbol_ids
                ids += next(encoded)
            result.append(ids)
        return result

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special pieces (``</s>``, ``<pad>``) decode to nothing."""
        return self._processor.decode([int(i) for i in ids])

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("granular-moe's pretraining tokenizer has no chat template")


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, output_path: str | os.PathLike
) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE model of ``vocab_size`` pieces on ``documents`` (each a whole text, newlines
    included), write it to ``output_path`` (atomically) and load it. Deterministic: the same documents give
    the same model file on any machine with the same SentencePiece version."""
    minimum = NUM_SPECIAL_PIECES + NUM_BYTE_PIECES + 1
    if vocab_size < minimum:
        raise ValueError(f"--vocab-size {vocab_size}: too small, a byte-fallback vocabulary needs at least "
                         f"{minimum} pieces ({NUM_SPECIAL_PIECES} special, {NUM_BYTE_PIECES} bytes, 1 more)")
    texts = [text for text in documents if text]
    if not texts:
        raise ValueError("cannot train a tokenizer: no text")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, **TRAINER_OPTIONS)
    except RuntimeError as error:
        raise ValueError(f"--vocab-size {vocab_size}: SentencePiece cannot train this vocabulary on "
                         f"{len(texts)} documents ({str(error).strip()})") from None
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    scratch.write_bytes(model.getvalue())
    os.replace(scratch, output_path)
    return SentencePieceTokenizer(output_path)
