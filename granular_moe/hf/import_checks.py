"""What ``import-hf`` checks of a Hugging Face folder before it allocates anything for it, and of the weights
once read.

1. Memory: the model ``config.json`` describes (every tensor's shape from
   :func:`granular_moe.hf.weights.hf_tensor_shapes`, nothing allocated) must fit in the memory this machine
   has available; an absurd size is refused naming the largest tensor and the keys its dimensions come from.
2. Headers: the ``safetensors`` files' headers (read without their data) must hold exactly the tensors the
   config describes, each of its shape; a tensor of another shape is named with both shapes.
3. Values: every floating-point weight read must be finite (``--allow-non-finite`` lets NaN / Inf through).

The memory an import needs (:func:`import_memory_bytes`): the checkpoint's bytes (``safetensors`` reads every
tensor) plus the job's model in fp32 three times (the model, the converted state dict loaded into it, and the
conversion's and the save's transients). Measured peak RSS over the process's baseline, random fp32 Qwen3-MoE
folders on this CPU: 2.73 GB for an 827 MB checkpoint (estimate 3.31 GB), 1.57 GB for a 445 MB one (1.78 GB).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from granular_moe.hf.targets import HfImportError
from granular_moe.hf.weights import expanded, tensor_copies

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# bytes per element of the safetensors dtypes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MODEL_BYTES_PER_PARAMETER = 4  # the job's model at import: fp32
MODEL_COPIES = 3  # the model, the converted state dict, the transients (measured: see above)


@dataclass(frozen=True)
class Header:
    """One tensor of a ``safetensors`` file, as its header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 4)


def safetensors_files(folder: Path) -> list[str]:
    """The folder's ``safetensors`` files: those its index names, or the one ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise HfImportError(f"--model {folder}: {INDEX_FILE} is damaged ({type(error).__name__}: {error})") \
                from None
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise HfImportError(f"--model {folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_headers(folder: Path) -> dict[str, Header]:
    """Every tensor's file, dtype and shape, from the headers alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    headers = {}
    for name in safetensors_files(folder):
        path = folder / name
        if not path.is_file():
            raise HfImportError(f"--model {folder}: {INDEX_FILE} names {name}, which is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    headers[key] = Header(name, tensor.get_dtype(), tuple(tensor.get_shape()))
        except (SafetensorError, OSError) as error:
            raise HfImportError(f"--model {folder}: {name} is not a readable safetensors file ({error})") from None
    return headers


def _shape_text(shape) -> str:
    return "[" + ", ".join(f"{key} {size:,}" for size, key in shape) + "]"


def import_memory_bytes(shapes: dict, args, headers: dict[str, Header], padded_vocab_size: int) -> int:
    """Bytes an import holds at its peak: the checkpoint's tensors, and the fp32 model three times."""
    parameters = sum(math.prod(size for size, _ in shape) * tensor_copies(name, args) for name, shape in shapes.items())
    padding = (padded_vocab_size - shapes["model.embed_tokens.weight"][0][0]) * args.hidden_size
    parameters += padding * (2 if args.untie_embeddings_and_output_weights else 1)
    return sum(header.nbytes for header in headers.values()) + MODEL_COPIES * MODEL_BYTES_PER_PARAMETER * parameters


def available_memory_bytes() -> int:
    """This machine's available memory (``MemAvailable``; the physical memory where it is not reported)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(folder: Path, shapes: dict, args, headers: dict[str, Header], padded_vocab_size: int) -> None:
    """Refuse a model that cannot be imported in this machine's memory, naming its largest tensor's sizes and
    the config keys they come from."""
    needed = import_memory_bytes(shapes, args, headers, padded_vocab_size)
    available = available_memory_bytes()
    if needed <= available:
        return
    name, shape = max(shapes.items(), key=lambda item: math.prod(size for size, _ in item[1]))
    copies = tensor_copies(name, args)
    each = f" (one of {copies:,}, one per routed expert)" if copies > 1 else ""
    raise HfImportError(
        f"--model {folder}: config.json describes a model whose import needs {needed / 1e9:,.1f} GB of memory "
        f"(the checkpoint's tensors, and the model in fp32 three times), this machine has {available / 1e9:,.1f} GB "
        f"available; its largest tensor, {name.format(expert=0)}{each}, is {_shape_text(shape)}: check these "
        "config.json values")


def check_headers(folder: Path, shapes: dict, args, headers: dict[str, Header]) -> None:
    """The checkpoint's headers hold exactly the tensors ``config.json`` describes, each of its shape: every
    difference named (the Hugging Face tensor name, the config's shape and the file's)."""
    wanted = expanded(shapes, args)
    problems = [f"{name} ({headers[name].file}): config.json gives {_shape_text(shape)}, the file holds "
                f"{list(headers[name].shape)}" for name, shape in wanted.items()
                if name in headers and tuple(size for size, _ in shape) != headers[name].shape]
    if len(problems) > 8:
        problems = problems[:8] + [f"... and {len(problems) - 8} more tensor(s) of another shape"]
    missing = [name for name in wanted if name not in headers]
    unexpected = sorted(set(headers) - set(wanted))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) config.json describes: {', '.join(missing[:8])}"
                        + (", ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model has no place for: {', '.join(unexpected[:8])}"
                        + (", ..." if len(unexpected) > 8 else ""))
    if problems:
        raise HfImportError(f"--model {folder}: its weights do not match its config.json:\n  - "
                            + "\n  - ".join(problems))


def check_finite(folder: Path, tensors: dict[str, torch.Tensor], headers: dict[str, Header]) -> None:
    """Every floating-point tensor finite; the others named (pass ``--allow-non-finite`` to import them)."""
    bad = [name for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        listed = ", ".join(f"{name} ({headers[name].file})" if name in headers else name for name in bad[:8])
        raise HfImportError(f"--model {folder}: {len(bad)} tensor(s) hold NaN or Inf: {listed}"
                            + (", ..." if len(bad) > 8 else "") + "; pass --allow-non-finite to import them anyway")
