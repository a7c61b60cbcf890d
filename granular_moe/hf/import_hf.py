"""``granular-moe import-hf --model DIR --save CHECKPOINT [--workers N]``: a Hugging Face folder of one of the
families (:mod:`granular_moe.hf.families`) as a checkpoint the main job continues training from, streamed.

The folder's ``config.json`` becomes the job's model flags (granularity 1: the model's experts are the job's
experts); every field the job cannot build the same way is refused by name before anything is written. Before
any tensor is read, the largest group of tensors must fit in memory and the ``safetensors`` headers must hold
exactly the tensors of the config's shapes (:mod:`granular_moe.hf.import_checks`). The tensors are then read
one group at a time (``safe_open``: a layer's routed experts at most) and written as iteration 0 of
``CHECKPOINT`` (``torch_dist``, weights and arguments, the layout a save of the job's model at TP = PP = EP = 1
has: it reshards to any layout) by :mod:`granular_moe.hf.checkpoint_writer`; ``--workers`` processes (or
torchrun's ranks) write its files, the same bytes as one. Every weight read must be finite; those that are not
are listed together and nothing is kept. ``CHECKPOINT`` also gets:

- ``model.yaml``: the model flags, for ``--config``;
- ``tokenizer.model``: the folder's SentencePiece model, when it has one (``export-hf`` writes it), named in
  ``model.yaml`` as ``--tokenizer-model``.

Everything is written beside ``CHECKPOINT`` and moved into it at the end (the tracker last): a failed or
killed import leaves nothing there. Continue training with ``granular-moe pretrain --config
CHECKPOINT/model.yaml --load CHECKPOINT --finetune --data-path DATA --save RUN [...]``, the data written with
that tokenizer (``granular-moe preprocess``).
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
import yaml

from granular_moe.config import GranularMoEConfigError
from granular_moe.hf.checkpoint_writer import FilePlan, finish, plan_files, write_file
from granular_moe.hf.families import FAMILIES
from granular_moe.hf.parallel import check_workers, run_workers, torchrun_ranks
from granular_moe.hf.safetensors_io import TORCH_DTYPES, Header, read_headers, read_tensors
from granular_moe.hf.skeleton import Layout
from granular_moe.hf.targets import HfImportError, import_family, parse_model_flags

MODEL_FLAGS_FILE = "model.yaml"
ITERATION_FOLDER = "iter_0000000"


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


@dataclass(frozen=True)
class ImportPlan:
    """Everything a worker needs (picklable)."""

    model_dir: Path
    headers: dict[str, Header]
    args: argparse.Namespace
    family: str
    vocab_size: int
    layout: Layout
    files: list[FilePlan]
    directory: Path
    check_finite: bool


def write_files(plan: ImportPlan, index: int, count: int) -> tuple[list, list[str], dict[str, str]]:
    """Write files ``index, index + count, ...`` of the checkpoint; ``(entries written, non-finite tensors,
    each file's SHA-256)``: the worker hashes what it wrote, so the manifest's hashing is split as the writing."""
    from granular_moe.hf.import_checks import non_finite
    from granular_moe.training.checkpoint_integrity import file_digest

    mappings = FAMILIES[plan.family].mappings(plan.args, plan.vocab_size)
    by_names = {tuple(mapping.megatron): mapping for mapping in mappings if mapping.megatron}
    bad: list[str] = []

    def produce(names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        mapping = by_names[names]
        tensors = read_tensors(plan.model_dir, plan.headers, mapping.hf_shapes())
        if plan.check_finite:
            bad.extend(non_finite(tensors))
        return mapping.to_megatron(tensors)

    results, digests = [], {}
    for file in plan.files[index::count]:
        results += write_file(plan.directory, plan.layout, file, produce)
        digests[file.name] = file_digest(plan.directory / file.name)
    return results, bad, digests


def _hf_dtype(headers: dict[str, Header], mappings: list) -> str:
    """The folder's weights' dtype (the export writes it back): the one dtype of its tensors other than those
    the family stores in a fixed dtype (the expert bias), else float32."""
    from granular_moe.hf.export import DTYPES

    fixed = {name for mapping in mappings for name in mapping.hf_shapes() if mapping.hf_dtype(name) is not None}
    dtypes = {TORCH_DTYPES.get(h.dtype) for name, h in headers.items() if name not in fixed}
    names = {dtype: name for name, dtype in DTYPES.items()}
    return names.get(next(iter(dtypes)), "float32") if len(dtypes) == 1 else "float32"


def _move_into(staging: Path, save: Path, tracker: str) -> None:
    """The staged checkpoint into ``save``: the folder renamed when ``save`` does not exist, else its entries
    moved in, the tracker last (until then ``save`` holds no checkpoint)."""
    if not save.exists():
        os.replace(staging, save)
        return
    entries = sorted((p for p in staging.iterdir() if p.name != tracker), key=lambda p: p.name)
    for entry in [*entries, staging / tracker]:
        target = save / entry.name
        if target.is_dir():  # a checkpoint folder no tracker named: what a killed save left
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def import_hf(model_dir: Path, save: Path, *, allow_non_finite: bool = False, workers: int = 1) -> Path:
    """Write the Hugging Face model in ``model_dir`` as a main-job checkpoint in ``save``; returns the
    checkpoint's folder. Raises :class:`HfImportError` (nothing written) for a model the job cannot build, one
    whose largest group does not fit in memory, weights that do not match ``config.json``, and (unless
    ``allow_non_finite``) weights holding NaN or Inf. Under torchrun every rank calls it."""
    from transformers import AutoConfig

    from granular_moe.hf import import_checks
    from granular_moe.hf.megatron_io import one_process_args, single_process_world
    from granular_moe.hf.skeleton import checkpoint_layout, sharding_metadata, skeleton
    from granular_moe.hf.tokenizer import SENTENCEPIECE_FILE
    from granular_moe.training.checkpoint import TRACKER
    from granular_moe.training.model import padded_vocab_size

    model_dir, save = Path(model_dir), Path(save)
    check_workers(workers)
    if not (model_dir / "config.json").is_file():
        raise HfImportError(f"--model {model_dir}: no config.json (a Hugging Face model folder holds one)")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    family = import_family(config)
    flags = [str(flag) for flag in family.flags(config)]
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
    args.padded_vocab_size = padded
    headers = read_headers(model_dir, HfImportError)
    mappings = family.mappings(args, config.vocab_size)
    import_checks.check_memory(model_dir, mappings, headers, workers)
    import_checks.check_headers(model_dir, mappings, headers)
    args.hf_dtype = _hf_dtype(headers, mappings)
    if padded != config.vocab_size:
        args.hf_vocab_size = config.vocab_size

    ranks = torchrun_ranks()
    with single_process_world():
        layout = checkpoint_layout(skeleton(args, padded), args, sharding_metadata(args))
    filled = [name for mapping in mappings for name in mapping.megatron]
    unfilled, unknown = sorted(set(layout.tensors) - set(filled)), sorted(set(filled) - set(layout.tensors))
    if unfilled or unknown:
        raise HfImportError(f"--model {model_dir}: no Hugging Face tensor fills {unfilled[:8]}; the model has no "
                            f"place for {unknown[:8]}")

    save.parent.mkdir(parents=True, exist_ok=True)
    staging = save.with_name(ranks.broadcast("staging", f".{save.name}.tmp-{os.getpid()}"))
    try:
        if ranks.coordinator:
            shutil.rmtree(staging, ignore_errors=True)
            (staging / ITERATION_FOLDER).mkdir(parents=True)
        ranks.broadcast("staging-made", True)
        files = plan_files(layout, [(mapping.layer, tuple(mapping.megatron)) for mapping in mappings
                                    if mapping.megatron])
        plan = ImportPlan(model_dir, headers, args, family.name, config.vocab_size, layout, files,
                          staging / ITERATION_FOLDER, not allow_non_finite)
        try:
            reports = [[results, bad, digests, None]
                       for results, bad, digests in run_workers(write_files, plan, ranks, workers)]
        except Exception as error:  # reported to rank 0, which removes the staging folder
            if not ranks.store:
                raise
            reports = [[[], [], {}, f"rank {ranks.rank}: {type(error).__name__}: {error}"]]
        gathered = ranks.gather("files-written", reports)
        if not ranks.coordinator:
            failures = [failure for *_, failure in reports if failure]
            if failures:
                raise HfImportError(failures[0])
            return save / ITERATION_FOLDER
        reports = [report for rank_reports in gathered for report in rank_reports]
        failures = [failure for *_, failure in reports if failure]
        if failures:
            raise HfImportError("the import failed:\n  - " + "\n  - ".join(failures))
        import_checks.refuse_non_finite(model_dir, [name for _, bad, *_ in reports for name in bad], headers)
        finish(staging / ITERATION_FOLDER, layout, [tuple(entry) for results, *_ in reports for entry in results],
               {name: digest for _, _, digests, _ in reports for name, digest in digests.items()})
        (staging / TRACKER).write_text("0")
        if tokenizer_path is not None:
            shutil.copyfile(sentencepiece, staging / SENTENCEPIECE_FILE)
        (staging / MODEL_FLAGS_FILE).write_text(
            f"# the model flags of {model_dir} ({config.model_type}), written by granular-moe import-hf\n"
            + yaml.safe_dump(flags_as_yaml(flags), sort_keys=False))
        _move_into(staging, save, TRACKER)
    except BaseException:
        if ranks.coordinator:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return save / ITERATION_FOLDER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granular-moe import-hf", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="the Hugging Face model folder")
    parser.add_argument("--save", type=Path, required=True, help="the checkpoint folder to write (new)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing the checkpoint's files (each holds one layer; per rank under torchrun)")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="import weights holding NaN or Inf (refused by tensor name otherwise)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        directory = import_hf(args.model, args.save, allow_non_finite=args.allow_non_finite, workers=args.workers)
    except GranularMoEConfigError as error:
        if rank0:  # once, not once per rank
            print(f"import-hf: error: {error}", file=sys.stderr, flush=True)
        return 2
    if not rank0:
        return 0
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
