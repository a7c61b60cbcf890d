"""Text corpora: reading documents, writing megatron-core indexed datasets (``.bin``/``.idx``), and the
embedded corpus, the Python standard library's own source, tokenized on first use and cached.

An indexed dataset written here holds one sequence per document (its tokens, then ``eod``), so
megatron-core's train/valid/test split, which cuts the sequence list into ranges, splits by document.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy
import sentencepiece
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from granular_moe.training.tokenizer import DEFAULT_VOCAB_SIZE, SentencePieceTokenizer, train_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".jsonl")
ENCODE_BATCH_DOCUMENTS = 256

# Bump when the embedded corpus's selection, tokenizer options or layout change: old caches are then rebuilt.
CORPUS_FORMAT_VERSION = 1
DEFAULT_CORPUS_MAX_BYTES = None  # all of it: ~30 MB of source, ~10M tokens, ~11 s to build on 2 cores
CACHE_ENV = "GRANULAR_MOE_CACHE"


# ---------------------------------------------------------------------------------------------------------
# Documents and indexed datasets


def find_text_files(inputs: Sequence[str | os.PathLike], suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[Path]:
    """Files named in ``inputs`` as given, and the files under each directory there whose name ends in one
    of ``suffixes`` (recursively, sorted by path, hidden entries and ``__pycache__`` skipped)."""
    files = []
    for entry in map(Path, inputs):
        if entry.is_file():
            files.append(entry)
        elif entry.is_dir():
            found = []
            for directory, subdirectories, names in os.walk(entry):
                subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"]
                found += [Path(directory, name) for name in names
                          if not name.startswith(".") and name.endswith(tuple(suffixes))]
            files += sorted(found, key=lambda path: path.relative_to(entry).as_posix())
        else:
            raise FileNotFoundError(f"--input {entry}: no such file or directory")
    return files


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_documents(files: Iterable[Path], json_key: str = "text") -> Iterator[str]:
    """Documents in order: a ``.jsonl`` file gives one per line (its ``json_key`` field), any other file is
    one document. Files that are not UTF-8 are skipped with a warning."""
    for path in files:
        text = read_text(path)
        if text is None:
            warnings.warn(f"skipping {path}: not UTF-8 text", stacklevel=2)
        elif path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if json_key not in record:
                        raise ValueError(f"{path}:{number}: no {json_key!r} field (--json-key)")
                    yield record[json_key]
        else:
            yield text


def write_indexed_dataset(documents: Iterable[str], tokenizer: SentencePieceTokenizer,
                          output_prefix: str | os.PathLike, num_threads: int = -1) -> dict:
    """Tokenize ``documents`` and write megatron-core's indexed dataset ``output_prefix.bin``/``.idx``: one
    sequence per non-empty document, its tokens followed by ``tokenizer.eod``. Files appear complete or not
    at all (written under temporary names, then renamed). Returns ``{"documents": n, "tokens": t}``."""
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    scratch = f"{prefix}.tmp-{os.getpid()}-{threading.get_ident()}"
    builder = IndexedDatasetBuilder(scratch + ".bin", dtype=dtype)
    documents_written = tokens_written = 0
    try:
        for batch in _batches((text for text in documents if text), ENCODE_BATCH_DOCUMENTS):
            for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
                sequence = numpy.array(ids + [tokenizer.eod], dtype=dtype)
                builder.add_document(sequence, [sequence.size])
                documents_written += 1
                tokens_written += sequence.size
        if documents_written == 0:
            raise ValueError(f"{prefix}: no text to write")
        builder.finalize(scratch + ".idx")
        os.replace(scratch + ".bin", prefix + ".bin")
        os.replace(scratch + ".idx", prefix + ".idx")
    finally:
        builder.data_file.close()
        for leftover in (scratch + ".bin", scratch + ".idx"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return {"documents": documents_written, "tokens": tokens_written}


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------------
# The embedded corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """Every ``.py`` file of the standard library (site-packages excluded), in a fixed pseudo-random order
    (by SHA-256 of the path relative to the library), so that any prefix mixes all packages and tests."""
    root = stdlib_root()
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda path: hashlib.sha256(path.relative_to(root).as_posix().encode()).hexdigest())


def select_stdlib_documents(max_bytes: int | None) -> list[tuple[str, str]]:
    """``(relative path, text)`` of the embedded corpus's documents: standard-library sources in
    :func:`stdlib_source_files` order, without empty files, files that are not UTF-8 and the codec tables
    generated by ``gencodec.py``; with ``max_bytes``, the longest prefix of that list within that many bytes."""
    root = stdlib_root()
    selected, total, size = [], 0, 0
    for path in stdlib_source_files():
        text = read_text(path)
        if not text or "with gencodec.py" in text.partition("\n")[0]:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            break
        selected.append((path.relative_to(root).as_posix(), text))
        total += size
    if not selected:
        raise ValueError(f"embedded corpus: no file of {root} fits a cap of {max_bytes} bytes "
                         f"(the first one in order has {size})")
    return selected


def cache_root() -> Path:
    """``$GRANULAR_MOE_CACHE``; else ``.cache/granular-moe`` in the source checkout holding this package when
    it is writable; else ``~/.cache/granular-moe`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.py").is_file() and os.access(checkout, os.W_OK):
        return checkout / ".cache" / "granular-moe"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "granular-moe"


@dataclass(frozen=True)
class EmbeddedCorpus:
    """A built embedded corpus: ``prefix`` (``.bin``/``.idx``), its ``tokenizer_model`` and ``manifest``
    (files, counts, build time); ``built`` tells whether this call built it (False: reused from the cache)."""

    directory: Path
    manifest: dict
    built: bool

    @property
    def prefix(self) -> str:
        return str(self.directory / "corpus")

    @property
    def tokenizer_model(self) -> Path:
        return self.directory / "tokenizer.model"


def embedded_corpus_name(vocab_size: int, max_bytes: int | None) -> str:
    """The cache folder's name: Python version, vocabulary, cap, and a hash of everything the corpus depends
    on (format version, Python and SentencePiece versions, every standard-library source's path and size)."""
    root = stdlib_root()
    key = {
        "format": CORPUS_FORMAT_VERSION,
        "python": [platform.python_implementation(), platform.python_version()],
        "sentencepiece": sentencepiece.__version__,
        "vocab_size": vocab_size,
        "max_bytes": max_bytes,
        "files": [[path.relative_to(root).as_posix(), path.stat().st_size] for path in stdlib_source_files()],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cap = "full" if max_bytes is None else f"{max_bytes}B"
    return f"stdlib-py{platform.python_version()}-vocab{vocab_size}-{cap}-{digest}"


def embedded_corpus(vocab_size: int = DEFAULT_VOCAB_SIZE, max_bytes: int | None = DEFAULT_CORPUS_MAX_BYTES,
                    cache_dir: str | os.PathLike | None = None) -> EmbeddedCorpus:
    """The embedded corpus (see :func:`select_stdlib_documents`; ``max_bytes=None``: all of it), with a
    tokenizer of ``vocab_size`` trained on it, from the cache (``cache_dir``, default :func:`cache_root`)
    or built there on first use. Safe when many processes call it at once: a file lock lets one build
    while the others wait, and the finished folder appears by an atomic rename."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"embedded corpus: the byte cap must be positive or None, got {max_bytes}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    name = embedded_corpus_name(vocab_size, max_bytes)
    directory = root / name
    with _file_lock(root / f"{name}.lock"):
        if (directory / "manifest.json").is_file():
            return EmbeddedCorpus(directory, json.loads((directory / "manifest.json").read_text()), built=False)
        logger.info("building the embedded corpus in %s (first use)", directory)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
        try:
            manifest = _build_embedded_corpus(scratch, vocab_size, max_bytes)
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete folder left by hand, if any
            os.rename(scratch, directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return EmbeddedCorpus(directory, manifest, built=True)


def _build_embedded_corpus(directory: Path, vocab_size: int, max_bytes: int | None) -> dict:
    start = time.perf_counter()
    documents = select_stdlib_documents(max_bytes)
    texts = [text for _, text in documents]
    tokenizer = train_tokenizer(texts, vocab_size, directory / "tokenizer.model")
    counts = write_indexed_dataset(texts, tokenizer, directory / "corpus")
    manifest = {
        "source": str(stdlib_root()),
        "python": platform.python_version(),
        "sentencepiece": sentencepiece.__version__,
        "vocab_size": vocab_size,
        "max_bytes": max_bytes,
        "bytes": sum(len(text.encode("utf-8")) for text in texts),
        **counts,
        "tokenizer_sha256": tokenizer.model_sha256,
        "build_seconds": round(time.perf_counter() - start, 2),
        "files": [path for path, _ in documents],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@contextmanager
def _file_lock(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
