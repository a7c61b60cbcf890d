"""What ``import-hf`` checks of a Hugging Face folder before it reads a tensor, and of the weights as it
reads them.

1. Memory: the largest group of tensors a worker converts at once (its ``safetensors`` tensors and the job's
   fp32 tensors made from them; a layer's routed experts at most), times the workers, must fit in the memory
   this machine has available; an absurd size is refused naming the largest tensor and the ``config.json``
   keys its dimensions come from. Sizes come from the mappings' shapes: nothing is allocated, and a routed
   expert's tensors are counted without listing them.
2. Headers: the ``safetensors`` files' headers (read without their data) must hold exactly the tensors the
   config describes, each of its shape; a tensor of another shape is named with both shapes.
3. Values: every floating-point weight read must be finite (``--allow-non-finite`` lets NaN / Inf through);
   the conversion lists every one that is not, and the checkpoint is not written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from granular_moe.hf.mappings import Mapping, hf_shapes, shape_text, sizes
from granular_moe.hf.safetensors_io import Header
from granular_moe.hf.targets import HfImportError

MEGATRON_BYTES_PER_ELEMENT = 4  # the job's model at import: fp32
# a group's fp32 tensors, held twice at once besides its Hugging Face tensors: the per-expert concatenations
# and their stack (measured with benchmarks/bench_hf_convert.py's wide model: 0.91 GB over the process's
# baseline for a group of 402 MB, estimate 1.21 GB)
MEGATRON_COPIES = 2


def group_bytes(mapping: Mapping, element_bytes: int) -> int:
    """The memory converting ``mapping`` takes: its Hugging Face tensors and the job's tensors made from them."""
    numel = mapping.hf_numel()
    return numel * element_bytes + MEGATRON_COPIES * MEGATRON_BYTES_PER_ELEMENT * numel


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


def check_memory(folder: Path, mappings: list[Mapping], headers: dict[str, Header], workers: int = 1) -> None:
    """Refuse a model whose largest group cannot be converted in this machine's memory (by ``workers``
    processes at once), naming its largest tensor's sizes and the config keys they come from."""
    element = max((header.element_bytes for header in headers.values()), default=4)
    largest = max(mappings, key=lambda mapping: group_bytes(mapping, element))
    needed = workers * group_bytes(largest, element)
    available = available_memory_bytes()
    if needed <= available:
        return
    name, shape, copies = largest.largest()
    each = f" (one of {copies:,} in its group)" if copies > 1 else ""
    per = f"{workers} workers x " if workers > 1 else ""
    raise HfImportError(
        f"--model {folder}: config.json describes a model whose largest group of tensors needs {per}"
        f"{needed / workers / 1e9:,.1f} GB of memory to convert (its tensors, and the job's fp32 tensors made from "
        f"them), this machine has {available / 1e9:,.1f} GB available; its largest tensor, {name}{each}, is "
        f"{shape_text(shape)}: check these config.json values")


def check_headers(folder: Path, mappings: list[Mapping], headers: dict[str, Header]) -> None:
    """The checkpoint's headers hold exactly the tensors ``config.json`` describes, each of its shape: every
    difference named (the Hugging Face tensor name, the config's shape and the file's)."""
    wanted = hf_shapes(mappings)
    problems = [f"{name} ({headers[name].file}): config.json gives {shape_text(shape)}, the file holds "
                f"{list(headers[name].shape)}" for name, shape in wanted.items()
                if name in headers and sizes(shape) != headers[name].shape]
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


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors holding NaN or Inf."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def refuse_non_finite(folder: Path, bad: list[str], headers: dict[str, Header]) -> None:
    """One error listing the tensors holding NaN or Inf (pass ``--allow-non-finite`` to import them)."""
    if not bad:
        return
    listed = ", ".join(f"{name} ({headers[name].file})" if name in headers else name for name in bad[:8])
    raise HfImportError(f"--model {folder}: {len(bad)} tensor(s) hold NaN or Inf: {listed}"
                        + (", ..." if len(bad) > 8 else "") + "; pass --allow-non-finite to import them anyway")
