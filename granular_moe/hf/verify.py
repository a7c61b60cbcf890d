"""``granular-moe verify-hf --load CHECKPOINT --model DIR``: the main job's model and a Hugging Face folder
(an export of it, or the folder it was imported from) run on the same small batch, layer by layer, and
compared: the largest difference of each layer's output hidden states and of the logits.

Neither model is ever whole in memory. Both are built with their parameters on the meta device; the
embedding, the final norm and the output layer are loaded, and each decoder layer's weights are loaded just
before it runs (a forward pre-hook) and dropped once it has (a forward hook): megatron-core's from the
checkpoint (:mod:`granular_moe.hf.checkpoint_reader`, read at any layout through the trust boundary, its files
checked against ``integrity.json`` first), ``transformers``' from the ``safetensors`` files (one layer's
tensors through ``transformers``' own loading, which fuses the per-expert tensors as ``from_pretrained``
does). Each model runs its own forward, so what is compared is what each library computes. Both in fp32.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from granular_moe.config import GranularMoEConfigError

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Comparison:
    """The largest absolute difference per decoder layer (output hidden states) and of the logits, with the
    largest absolute value each side reached (for scale)."""

    layers: list[tuple[float, float]]
    logits: tuple[float, float]


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def _by_layer(names, prefix: str) -> dict[int | None, list[str]]:
    """``names`` grouped by decoder layer (None: outside the layers), once, before the hooks run."""
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(_layer_of(name, prefix), []).append(name)
    return groups


def _output(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def megatron_side(load: Path, verify: bool):
    """The checkpoint's one-process model (parameters on meta, fp32) with each layer loaded as it runs, and a
    function giving its logits and per-layer outputs for token ids."""
    from granular_moe.hf.checkpoint_reader import CheckpointReader, open_checkpoint
    from granular_moe.hf.megatron_io import megatron_logits, one_process_args
    from granular_moe.hf.skeleton import checkpoint_layout, sharding_metadata, skeleton

    directory, saved, stored = open_checkpoint(load, verify)
    args = one_process_args(saved, torch.float32)
    model = skeleton(args, args.padded_vocab_size)
    tensors = checkpoint_layout(model, args, sharding_metadata(args, stored)).tensors
    reader = CheckpointReader(directory, tensors)
    prefix = "decoder.layers."

    def load_into(module, module_prefix: str, names: list[str]) -> None:
        state = {name[len(module_prefix):]: value for name, value in reader.read(names).items()}
        _, unexpected = module.load_state_dict(state, strict=False, assign=True)
        meta = [name for name, param in module.named_parameters() if param.is_meta and module_prefix]
        if unexpected or meta:
            raise RuntimeError(f"{directory}: loading {module_prefix or 'the model'} left {meta[:4]} unloaded, "
                               f"{unexpected[:4]} unused")

    by_layer = _by_layer(tensors, prefix)
    load_into(model, "", by_layer.get(None, []))
    outputs: dict[int, torch.Tensor] = {}
    for number, layer in enumerate(model.decoder.layers):
        global_number = layer.layer_number - 1

        def before(module, inputs, number=global_number):
            load_into(module, f"{prefix}{number}.", by_layer.get(number, []))

        def after(module, inputs, output, number=global_number):
            outputs[number] = _output(output).detach().transpose(0, 1).clone()  # [b, s, h]
            module.to("meta")

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)

    def run(ids: torch.Tensor):
        outputs.clear()
        logits = megatron_logits(model, ids)
        return logits, [outputs[number] for number in sorted(outputs)]

    return args, run


def hf_side(folder: Path):
    """The folder's ``transformers`` model (parameters on meta, fp32) with each decoder layer loaded as it
    runs; a function giving its logits and per-layer outputs for token ids."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    from granular_moe.hf.safetensors_io import read_headers, read_tensors

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per layer otherwise
    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    headers = read_headers(folder)
    conversions = get_model_conversion_mapping(model)
    prefix = f"{model.base_model_prefix}.layers."

    def load(names: list[str]) -> None:
        state = read_tensors(folder, headers, names)
        info, _ = convert_and_load_state_dict_in_model(
            model, state, LoadStateDictConfig(weight_mapping=conversions, dtype=torch.float32))
        if info.unexpected_keys or info.mismatched_keys:
            raise RuntimeError(f"{folder}: tensors the model has no place for {sorted(info.unexpected_keys)[:4]}, "
                               f"of another shape {sorted(info.mismatched_keys)[:4]}")

    _rebuild_meta_buffers(model)
    by_layer = _by_layer(headers, prefix)
    load(by_layer.get(None, []))
    if model.config.tie_word_embeddings:
        model.tie_weights()
    outputs: dict[int, torch.Tensor] = {}
    for number, layer in enumerate(model.model.layers):
        def before(module, args, kwargs, number=number):
            load(by_layer.get(number, []))
            meta = [name for name, param in module.named_parameters() if param.is_meta]
            if meta:
                raise RuntimeError(f"{folder}: layer {number} has no tensors for {meta[:4]}")

        def after(module, args, kwargs, output, number=number):
            outputs[number] = _output(output).detach().clone()
            module.to("meta")

        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)

    @torch.no_grad()
    def run(ids: torch.Tensor):
        outputs.clear()
        logits = model(input_ids=ids, use_cache=False).logits
        return logits, [outputs[number] for number in sorted(outputs)]

    return config, run


def _rebuild_meta_buffers(model) -> None:
    """The rotary embeddings' inverse frequencies (computed at construction, not stored): built again off the
    meta device; any other buffer left on it is an error (the model computes something not in the folder)."""
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, type(module)(config=model.config))


def compare(load: Path, folder: Path, *, batch: int = 2, length: int = 32, seed: int = 0,
            verify: bool = True) -> Comparison:
    """Both models on the same random token ids (``batch`` x ``length``, ``seed``), layer by layer."""
    from granular_moe.hf.megatron_io import single_process_world

    with single_process_world():
        args, megatron = megatron_side(load, verify)
        config, hf = hf_side(folder)
        vocab = min(config.vocab_size, args.padded_vocab_size)
        if args.num_layers != config.num_hidden_layers:
            raise GranularMoEConfigError(f"--load has {args.num_layers} layers, --model {folder} "
                                         f"{config.num_hidden_layers}")
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits, hidden = megatron(ids)
        hf_logits, hf_hidden = hf(ids)
    layers = [(float((a - b).abs().max()), float(a.abs().max())) for a, b in zip(hidden, hf_hidden)]
    vocab = config.vocab_size
    difference = float((logits[..., :vocab] - hf_logits[..., :vocab]).abs().max())
    return Comparison(layers, (difference, float(logits[..., :vocab].abs().max())))


def report(comparison: Comparison) -> str:
    lines = [f"{'layer':>8}  {'max |delta|':>12}  {'max |value|':>12}"]
    lines += [f"{number:>8}  {delta:>12.3e}  {value:>12.3e}" for number, (delta, value) in enumerate(comparison.layers)]
    lines.append(f"{'logits':>8}  {comparison.logits[0]:>12.3e}  {comparison.logits[1]:>12.3e}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granular-moe verify-hf", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--load", type=Path, required=True,
                        help="the checkpoint: a --save folder (its newest) or one iter_NNNNNNN folder")
    parser.add_argument("--model", type=Path, required=True, help="the Hugging Face model folder")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences in the batch")
    parser.add_argument("--seq-length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest logits difference that passes (exit status 1 above it)")
    parser.add_argument("--no-verify-integrity", dest="verify", action="store_false",
                        help="read the checkpoint without checking its files against its integrity.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = [f"{flag} must be >= 1, got {value}" for flag, value in
                (("--batch-size", args.batch_size), ("--seq-length", args.seq_length)) if value < 1]
    if not args.tolerance >= 0:
        problems.append(f"--tolerance must be >= 0, got {args.tolerance}")
    if problems:
        print("verify-hf: error: " + "; ".join(problems), file=sys.stderr, flush=True)
        return 2
    try:
        comparison = compare(args.load, args.model, batch=args.batch_size, length=args.seq_length, seed=args.seed,
                             verify=args.verify)
    except GranularMoEConfigError as error:
        print(f"verify-hf: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"verify-hf: {args.load} (megatron-core) vs {args.model} (transformers), {args.batch_size} x "
          f"{args.seq_length} random tokens (seed {args.seed}), fp32, max |delta| per layer's output and of the "
          f"logits:\n{report(comparison)}", flush=True)
    ok = comparison.logits[0] <= args.tolerance
    print(f"verify-hf: {'ok' if ok else 'FAILED'}: logits within {args.tolerance:g}" if ok else
          f"verify-hf: FAILED: logits differ by {comparison.logits[0]:.3e} > --tolerance {args.tolerance:g}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
