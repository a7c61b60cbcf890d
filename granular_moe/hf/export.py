"""``granular-moe export-hf --load CHECKPOINT --output DIR [--target auto|FAMILY] [--workers N]``: a main-job
checkpoint, saved at any (TP, PP, EP, DP) layout, as a Hugging Face model folder, streamed.

The checkpoint is read a mapping at a time (:mod:`granular_moe.hf.checkpoint_reader`: each tensor of the
one-process model assembled from the stored chunks it overlaps, at most one layer's experts in memory) and
the ``safetensors`` shards are written as they fill: their boundaries and the index are planned from the
shapes first, so peak memory is one shard plus one layer, and ``--workers`` processes (or torchrun's ranks)
write their own shards, the same bytes as one. The folder gets ``config.json`` (the target's exact
architecture), the shards with ``model.safetensors.index.json`` (every routed expert under its own id),
``generation_config.json`` and the tokenizer (the job's SentencePiece model converted to ``tokenizer.json``,
and the model itself as ``tokenizer.model``). What the target cannot represent is refused, every problem named
by its flag, before anything is written; the folder is written beside ``DIR`` and renamed into place at the
end, so a failed or killed export leaves nothing under ``DIR``. The checkpoint's files are checked against the
SHA-256 digests its save recorded before anything reads them (``--no-verify-integrity`` skips it), and it is
read through the trust boundary: nothing unpickled but checkpoint metadata and plain data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from granular_moe.config import GranularMoEConfigError
from granular_moe.hf.families import FAMILIES
from granular_moe.hf.mappings import Mapping, sizes
from granular_moe.hf.parallel import Ranks, check_workers, run_workers, torchrun_ranks
from granular_moe.hf.safetensors_io import INDEX_FILE, parse_size, plan_shards, shard_name, write_index
from granular_moe.hf.skeleton import LocalTensor
from granular_moe.hf.targets import TARGETS, HfExportError, choose_target, hf_config

__all__ = ["INDEX_FILE", "export_hf", "main"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExportPlan:
    """Everything a worker needs (picklable): where to read, what to write, shard by shard."""

    directory: Path
    staging: Path
    args: argparse.Namespace
    target: str
    vocab_size: int
    dtype: torch.dtype
    tensors: dict[str, LocalTensor]
    shards: list[list[str]]


def export_mappings(plan: ExportPlan) -> list[Mapping]:
    return FAMILIES[plan.target].mappings(plan.args, plan.vocab_size)


def hf_sizes(mappings: list[Mapping], dtype: torch.dtype) -> dict[str, int]:
    """Every Hugging Face tensor's bytes in the export's dtype (a target's fixed dtype where it has one)."""
    out = {}
    for mapping in mappings:
        for name, shape in mapping.hf_shapes().items():
            element = (mapping.hf_dtype(name) or dtype).itemsize
            out[name] = element * torch.Size(sizes(shape)).numel()
    return out


def write_shards(plan: ExportPlan, index: int, count: int) -> None:
    """Write shards ``index, index + count, ...`` of ``plan`` into its staging folder."""
    from safetensors.torch import save_file

    from granular_moe.hf.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(plan.directory, plan.tensors)
    mappings = export_mappings(plan)
    owner = {name: number for number, mapping in enumerate(mappings) for name in mapping.hf_shapes()}
    cached, converted = None, {}
    for shard in range(index, len(plan.shards), count):
        tensors = {}
        for name in plan.shards[shard]:
            number = owner[name]
            if cached != number:  # one mapping's tensors in memory at a time
                mapping = mappings[number]
                converted = mapping.to_hf(reader.read(mapping.megatron))
                cached = number
            dtype = mappings[number].hf_dtype(name) or plan.dtype
            tensors[name] = converted[name].to(dtype).contiguous()
        save_file(tensors, str(plan.staging / shard_name(shard, len(plan.shards))), metadata={"format": "pt"})
        del tensors


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise HfExportError(f"--output {output} already exists; choose a new folder, or pass --overwrite to "
                            "replace it")
    if not output.parent.is_dir():
        raise HfExportError(f"--output {output}: the folder it goes in, {output.parent}, does not exist")


def _check_dtype(dtype: str) -> None:
    if dtype not in ("auto", *DTYPES):
        raise HfExportError(f"--dtype {dtype!r} is not valid; valid values: auto, {', '.join(DTYPES)}")


def _staging(output: Path, ranks: Ranks) -> Path:
    name = f".{output.name}.tmp-{os.getpid()}" if ranks.coordinator else None
    return output.with_name(ranks.broadcast("staging", name))


def prepare(load: Path, target: str, dtype: str, verify: bool, ranks: Ranks):
    """Every check of the checkpoint and the target, then the plan's inputs: ``(directory, args, target,
    dtype name, layout tensors)``."""
    from granular_moe.hf.checkpoint_reader import open_checkpoint
    from granular_moe.hf.megatron_io import one_process_args, single_process_world
    from granular_moe.hf.skeleton import checkpoint_layout, sharding_metadata, skeleton

    directory, saved, stored = open_checkpoint(load, verify, (ranks.rank, ranks.world))
    args = one_process_args(saved)
    target = choose_target(args, target)  # every refusal before any work
    _check_dtype(dtype)
    if dtype == "auto":
        dtype = getattr(args, "hf_dtype", None) or ("bfloat16" if args.bf16 else "float32")
    with single_process_world():
        layout = checkpoint_layout(skeleton(args, args.padded_vocab_size), args, sharding_metadata(args, stored))
    return directory, args, target, dtype, layout.tensors


def export_hf(load: Path, output: Path, target: str = "auto", *, tokenizer_model: Path | None = None,
              dtype: str = "auto", max_shard_size: str = "5GB", overwrite: bool = False, verify: bool = True,
              workers: int = 1) -> tuple[str, Path]:
    """Write the checkpoint under ``load`` as a Hugging Face folder ``output``; returns ``(target, output)``.
    Raises :class:`HfExportError` (nothing written) for a model ``target`` cannot represent, and
    :class:`~granular_moe.training.checkpoint.CheckpointError` naming the file for a damaged checkpoint
    (``verify``: its files checked against their digests first). Under torchrun every rank calls it."""
    from granular_moe.hf.tokenizer import job_tokenizer_model, special_ids, write_tokenizer

    load, output = Path(load), Path(output)
    problems = []
    for check in (lambda: parse_size(max_shard_size), lambda: check_workers(workers)):
        try:
            check()
        except GranularMoEConfigError as error:
            problems.append(str(error))
    if problems:  # the flags' own problems, together, before anything is read
        raise HfExportError("; ".join(problems))
    max_bytes = parse_size(max_shard_size)
    ranks = torchrun_ranks()
    directory, args, target, dtype, tensors = prepare(load, target, dtype, verify, ranks)
    _check_output(output, overwrite)
    tokenizer_model = Path(tokenizer_model) if tokenizer_model is not None else job_tokenizer_model(args)
    if not tokenizer_model.is_file():
        raise HfExportError(f"--tokenizer-model {tokenizer_model}: no such file (the checkpoint's job trained with "
                            "it; pass --tokenizer-model to name where it is now)")
    vocab_size = getattr(args, "hf_vocab_size", None) or args.padded_vocab_size
    mappings = FAMILIES[target].mappings(args, vocab_size)
    missing = sorted({name for mapping in mappings for name in mapping.megatron} - set(tensors))
    if missing:
        raise HfExportError(f"{directory}: the model has no tensors {missing[:8]} that {target} needs")
    hf_bytes = hf_sizes(mappings, DTYPES[dtype])
    config = hf_config(args, target, vocab_size, special_ids(tokenizer_model), dtype)

    staging = _staging(output, ranks)
    try:
        if ranks.coordinator:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        ranks.broadcast("staging-made", True)
        plan = ExportPlan(directory, staging, args, target, vocab_size, DTYPES[dtype], tensors,
                          plan_shards(hf_bytes, max_bytes))
        failure = None
        try:
            run_workers(write_shards, plan, ranks, workers)
        except Exception as error:  # reported to rank 0, which removes the staging folder
            failure = f"rank {ranks.rank}: {type(error).__name__}: {error}"
            if not ranks.store:
                raise
        reports = ranks.gather("shards-written", failure)
        if not ranks.coordinator:
            if failure:
                raise HfExportError(failure)
            return target, output
        failures = [report for report in reports if report]
        if failures:
            raise HfExportError("the export failed:\n  - " + "\n  - ".join(failures))
        config.save_pretrained(str(staging))
        _write_generation_config(config, staging)
        write_index(staging, plan.shards, sum(hf_bytes.values()))
        write_tokenizer(tokenizer_model, staging)
        if output.exists():  # --overwrite
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        if ranks.coordinator:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, output


def _write_generation_config(config, folder: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(folder))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granular-moe export-hf", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--load", type=Path, required=True,
                        help="the checkpoint: a --save folder (its newest) or one iter_NNNNNNN folder")
    parser.add_argument("--output", type=Path, required=True, help="the Hugging Face folder to write")
    parser.add_argument("--target", choices=("auto", *TARGETS), default="auto",
                        help="auto: the first target that represents the model exactly")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="the job's SentencePiece model (default: the checkpoint's --tokenizer-model, or the "
                        "embedded corpus's)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="weights' dtype (auto: bfloat16 for a --bf16 checkpoint, else float32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing shards (each holds one shard and one layer; under torchrun, per rank)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--no-verify-integrity", dest="verify", action="store_false",
                        help="read the checkpoint without checking its files against the SHA-256 digests its save "
                        "recorded (integrity.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        target, output = export_hf(args.load, args.output, args.target, tokenizer_model=args.tokenizer_model,
                                   dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                   verify=args.verify, workers=args.workers)
    except GranularMoEConfigError as error:
        if rank0:  # once, not once per rank
            print(f"export-hf: error: {error}", file=sys.stderr, flush=True)
        return 2
    if rank0:
        print(f"export-hf: wrote {output} ({target}); load it with transformers.AutoModelForCausalLM.from_pretrained"
              f"({str(output)!r})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
