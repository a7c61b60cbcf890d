"""``granular-moe export-hf --load CHECKPOINT --output DIR [--target auto|qwen3_moe|deepseek_v3]``: a main-job
checkpoint, saved at any (TP, PP, EP, DP) layout, as a Hugging Face model folder.

One process on the CPU reads the checkpoint into the job's model at TP = PP = EP = 1 (the checkpoint reshards)
and writes ``config.json`` (the target's exact architecture), the weights as ``safetensors`` shards with
``model.safetensors.index.json`` (every routed expert under its own id, as the target's checkpoints hold them),
``generation_config.json`` and the tokenizer (the job's SentencePiece model converted to ``tokenizer.json``, and
the model itself as ``tokenizer.model``). What the target cannot represent is refused, every problem named by
its flag, before anything is written; the folder is written beside ``DIR`` and renamed into place at the end, so
a failed export leaves nothing. The checkpoint's files are checked against the SHA-256 digests its save recorded
before anything reads them (``--no-verify-integrity`` skips it), and it is read as the main job reads it:
nothing unpickled but checkpoint metadata and plain data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

from granular_moe.config import GranularMoEConfigError
from granular_moe.hf.targets import TARGETS, HfExportError, choose_target, hf_config

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """``5GB``, ``200MB``, ``64KB`` or a byte count."""
    text = str(text).strip().upper()
    for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors, each at most ``max_bytes`` (a larger tensor alone)."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> None:
    """``model-0000i-of-0000n.safetensors`` shards and their ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    groups = shard(tensors, max_bytes)
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        name = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise HfExportError(f"--output {output} already exists; choose a new folder, or pass --overwrite to "
                            "replace it")
    if not output.parent.is_dir():
        raise HfExportError(f"--output {output}: the folder it goes in, {output.parent}, does not exist")


def export_hf(load: Path, output: Path, target: str = "auto", *, tokenizer_model: Path | None = None,
              dtype: str = "auto", max_shard_size: str = "5GB", overwrite: bool = False,
              verify: bool = True) -> tuple[str, Path]:
    """Write the checkpoint under ``load`` as a Hugging Face folder ``output``; returns ``(target, output)``.
    Raises :class:`HfExportError` (nothing written) for a model ``target`` cannot represent, and
    :class:`~granular_moe.training.checkpoint.CheckpointError` naming the file for a damaged checkpoint
    (``verify``: its files checked against their digests first)."""
    from granular_moe.hf.megatron_io import load_model, one_process_args, single_process_world
    from granular_moe.hf.tokenizer import job_tokenizer_model, special_ids, write_tokenizer
    from granular_moe.hf.weights import megatron_to_hf
    from granular_moe.training.checkpoint import read_checkpoint, require_checkpoint

    load, output = Path(load), Path(output)
    max_bytes = parse_size(max_shard_size)
    directory = load if (load / "metadata.json").is_file() else require_checkpoint(load)
    if verify:
        from granular_moe.training.checkpoint_integrity import verify_checkpoint

        verify_checkpoint(directory)
    args = one_process_args(read_checkpoint(directory))
    target = choose_target(args, target)  # every refusal before any work
    _check_output(output, overwrite)
    if dtype not in ("auto", *DTYPES):
        raise HfExportError(f"--dtype {dtype!r} is not valid; valid values: auto, {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = getattr(args, "hf_dtype", None) or ("bfloat16" if args.bf16 else "float32")
    tokenizer_model = Path(tokenizer_model) if tokenizer_model is not None else job_tokenizer_model(args)
    if not tokenizer_model.is_file():
        raise HfExportError(f"--tokenizer-model {tokenizer_model}: no such file (the checkpoint's job trained with "
                            "it; pass --tokenizer-model to name where it is now)")

    with single_process_world():
        args, model = load_model(directory)
        vocab_size = getattr(args, "hf_vocab_size", None) or args.padded_vocab_size
        tensors = megatron_to_hf(model.state_dict(), args, target, vocab_size)
    tensors = {name: t if name.endswith("e_score_correction_bias") else t.to(DTYPES[dtype])
               for name, t in tensors.items()}
    config = hf_config(args, target, vocab_size, special_ids(tokenizer_model), dtype)

    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        config.save_pretrained(str(staging))
        _write_generation_config(config, staging)
        write_safetensors(tensors, staging, max_bytes)
        write_tokenizer(tokenizer_model, staging)
        if output.exists():  # --overwrite
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
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
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--no-verify-integrity", dest="verify", action="store_false",
                        help="read the checkpoint without checking its files against the SHA-256 digests its save "
                        "recorded (integrity.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target, output = export_hf(args.load, args.output, args.target, tokenizer_model=args.tokenizer_model,
                                   dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                   verify=args.verify)
    except GranularMoEConfigError as error:
        print(f"export-hf: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"export-hf: wrote {output} ({target}); load it with transformers.AutoModelForCausalLM.from_pretrained"
          f"({str(output)!r})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
