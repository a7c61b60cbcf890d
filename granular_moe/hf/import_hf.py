"""``granular-moe import-hf --model DIR --save CHECKPOINT``: a Hugging Face Qwen3-MoE or DeepSeek-V3 folder as a
checkpoint the main job continues training from.

The folder's ``config.json`` becomes the job's model flags (granularity 1: the model's experts are the job's
experts); every field the job cannot build the same way is refused by name before anything is written. Before
any tensor is read, the model must fit in memory and the ``safetensors`` headers must hold exactly the tensors
of the config's shapes; every weight read must be finite (:mod:`granular_moe.hf.import_checks`). The
weights go into the job's model at TP = PP = EP = 1 in one process, saved as iteration 0 of ``CHECKPOINT``
(``torch_dist``, weights and arguments; it reshards to any layout). ``CHECKPOINT`` also gets:

- ``model.yaml``: the model flags, for ``--config``;
- ``tokenizer.model``: the folder's SentencePiece model, when it has one (``export-hf`` writes it), named in
  ``model.yaml`` as ``--tokenizer-model``.

Continue training with ``granular-moe pretrain --config CHECKPOINT/model.yaml --load CHECKPOINT --finetune
--data-path DATA --save RUN [...]``, the data written with that tokenizer (``granular-moe preprocess``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch
import yaml

from granular_moe.config import GranularMoEConfigError
from granular_moe.hf.targets import HfImportError, flags_from_hf, parse_model_flags

MODEL_FLAGS_FILE = "model.yaml"


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``safetensors`` checkpoint (sharded with an index, or one file)."""
    from safetensors.torch import load_file

    from granular_moe.hf.import_checks import safetensors_files

    tensors = {}
    for name in safetensors_files(folder):
        tensors.update(load_file(str(folder / name)))
    return tensors


def flags_as_yaml(flags: list[str]) -> dict:
    """``["--a", "1", "--b", ...]`` as ``{"a": "1", "b": true}`` (the ``--config`` file's form)."""
    entries, index = {}, 0
    while index < len(flags):
        key = flags[index][2:]
        if index + 1 < len(flags) and not flags[index + 1].startswith("--"):
            value = flags[index + 1]
            entries[key] = yaml.safe_load(value) if key != "moe-layer-freq" else value
            index += 2
        else:
            entries[key] = True
            index += 1
    return entries


def import_hf(model_dir: Path, save: Path, *, allow_non_finite: bool = False) -> Path:
    """Write the Hugging Face model in ``model_dir`` as a main-job checkpoint in ``save``; returns the
    checkpoint's folder. Raises :class:`HfImportError` (nothing written) for a model the job cannot build, one
    that does not fit in memory, weights that do not match ``config.json``, and (unless ``allow_non_finite``)
    weights holding NaN or Inf."""
    from transformers import AutoConfig

    from granular_moe.hf import import_checks
    from granular_moe.hf.megatron_io import build_model, one_process_args, save_model, single_process_world
    from granular_moe.hf.tokenizer import SENTENCEPIECE_FILE
    from granular_moe.hf.weights import hf_tensor_shapes, hf_to_megatron
    from granular_moe.training.checkpoint import TRACKER
    from granular_moe.training.model import padded_vocab_size

    model_dir, save = Path(model_dir), Path(save)
    if not (model_dir / "config.json").is_file():
        raise HfImportError(f"--model {model_dir}: no config.json (a Hugging Face model folder holds one)")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    flags = flags_from_hf(config)
    if (save / TRACKER).exists():
        raise HfImportError(f"--save {save} already holds a checkpoint ({TRACKER}); choose a new folder")
    sentencepiece = model_dir / SENTENCEPIECE_FILE
    tokenizer_path = save / SENTENCEPIECE_FILE if sentencepiece.is_file() else None
    padded = padded_vocab_size(config.vocab_size, 1)
    if tokenizer_path is not None:
        from granular_moe.training.tokenizer import SentencePieceTokenizer

        pieces = SentencePieceTokenizer(sentencepiece).vocab_size
        if padded_vocab_size(pieces, 1) != padded:
            raise HfImportError(f"vocab_size {config.vocab_size}: the job pads its tokenizer's {pieces} pieces to "
                                f"{padded_vocab_size(pieces, 1)} rows, the model has {padded}")
        flags += ["--tokenizer-model", str(tokenizer_path.resolve())]
    args = one_process_args(parse_model_flags(flags))
    headers = import_checks.read_headers(model_dir)
    shapes = hf_tensor_shapes(args, config.model_type, config.vocab_size)
    import_checks.check_memory(model_dir, shapes, args, headers, padded)
    import_checks.check_headers(model_dir, shapes, args, headers)
    tensors = read_safetensors(model_dir)
    if not allow_non_finite:
        import_checks.check_finite(model_dir, tensors, headers)
    dtypes = {t.dtype for name, t in tensors.items() if not name.endswith("e_score_correction_bias")}

    args.hf_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(next(iter(dtypes)), "float32") \
        if len(dtypes) == 1 else "float32"
    if padded != config.vocab_size:
        args.hf_vocab_size = config.vocab_size
    with single_process_world():
        model = build_model(args, padded)
        template = model.state_dict()
        try:
            state = hf_to_megatron(tensors, args, config.model_type, template)
        except (KeyError, ValueError) as error:
            raise HfImportError(f"--model {model_dir}: {error.args[0]}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.endswith("_extra_state")]
        if missing or unexpected:
            raise HfImportError(f"--model {model_dir}: tensors missing {missing[:8]}, unexpected {unexpected[:8]}")
        save.mkdir(parents=True, exist_ok=True)
        directory = save_model(save, model, args)
    if tokenizer_path is not None:
        shutil.copyfile(sentencepiece, tokenizer_path)
    (save / MODEL_FLAGS_FILE).write_text(
        f"# the model flags of {model_dir} ({config.model_type}), written by granular-moe import-hf\n"
        + yaml.safe_dump(flags_as_yaml(flags), sort_keys=False))
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granular-moe import-hf", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="the Hugging Face model folder")
    parser.add_argument("--save", type=Path, required=True, help="the checkpoint folder to write (new)")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="import weights holding NaN or Inf (refused by tensor name otherwise)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        directory = import_hf(args.model, args.save, allow_non_finite=args.allow_non_finite)
    except GranularMoEConfigError as error:
        print(f"import-hf: error: {error}", file=sys.stderr, flush=True)
        return 2
    tokenizer = args.save / "tokenizer.model"
    data = "--data-path DATA" + ("" if tokenizer.is_file() else " --tokenizer-model TOKENIZER")
    print(f"import-hf: wrote {directory}; continue training with:\n  granular-moe pretrain --config "
          f"{args.save / MODEL_FLAGS_FILE} --load {args.save} --finetune {data} --save RUN", flush=True)
    if not tokenizer.is_file():
        print("import-hf: note: the folder has no SentencePiece tokenizer.model; the job's --tokenizer-model must "
              "give the ids the model was trained with", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
