"""The ``safetensors`` side of a conversion: the shards an export writes (planned from the tensors' shapes
before any is read, so their boundaries and the index do not depend on who writes them), and a Hugging Face
folder's tensors read lazily (``safe_open``: headers without data, then one tensor at a time)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from granular_moe.config import GranularMoEConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# bytes per element of the safetensors dtypes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """``5GB``, ``200MB``, ``64KB`` or a byte count; an error naming ``flag`` for anything else."""
    value = str(text).strip().upper()
    try:
        for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if value.endswith(suffix):
                size = int(float(value[: -len(suffix)]) * factor)
                break
        else:
            size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise GranularMoEConfigError(f"{flag} {text!r} is not valid; give a size such as 5GB, 500MB, 64KB or a "
                                     "byte count")
    return size


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of the tensors (``name: bytes``, in checkpoint order), each at most ``max_bytes`` (a
    larger tensor alone)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, shards: list[list[str]], total_size: int) -> None:
    """``model.safetensors.index.json`` for ``shards`` (what ``transformers`` writes)."""
    weight_map = {name: shard_name(index, len(shards)) for index, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (Path(folder) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class Header:
    """One tensor of a ``safetensors`` file, as its header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)


def safetensors_files(folder: Path, error=GranularMoEConfigError) -> list[str]:
    """The folder's ``safetensors`` files: those its index names, or the one ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as damage:
            raise error(f"--model {folder}: {INDEX_FILE} is damaged ({type(damage).__name__}: {damage})") from None
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise error(f"--model {folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_headers(folder: Path, error=GranularMoEConfigError) -> dict[str, Header]:
    """Every tensor's file, dtype and shape, from the headers alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    headers = {}
    for name in safetensors_files(folder, error):
        path = folder / name
        if not path.is_file():
            raise error(f"--model {folder}: {INDEX_FILE} names {name}, which is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    headers[key] = Header(name, tensor.get_dtype(), tuple(tensor.get_shape()))
        except (SafetensorError, OSError) as damage:
            raise error(f"--model {folder}: {name} is not a readable safetensors file ({damage})") from None
    return headers


def read_tensors(folder: Path, headers: dict[str, Header], names) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the folder, each file opened for the tensors it holds and closed again (so
    the memory its pages took is given back)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(headers[name].file, []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with safe_open(str(Path(folder) / file), framework="pt") as handle:
            for name in wanted:
                out[name] = handle.get_tensor(name)
    return out
