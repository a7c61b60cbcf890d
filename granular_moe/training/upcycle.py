"""Upcycling: start a granular MoE job from a dense checkpoint of the same model (``--moe-upcycle-from DIR``).

The conversion is megatron-core's (``megatron.core.transformer.moe.upcycling_utils``, after Komatsuzaki et al.
2022 and He et al. 2024, https://arxiv.org/abs/2410.07524), for a model of ``E*G`` fine-grained experts, top
``k*G``, expert FFN ``d_ff / G``:

- every MoE layer's dense FFN is cut into ``G`` slices of ``d_ff / G`` hidden units (with SwiGLU: the same rows
  of the activation half and of the linear half); expert ``i`` holds slice ``i % G``, so the ``E`` groups of
  ``G`` consecutive experts each hold the whole FFN;
- the router keeps its random initialisation, but expert ``i`` takes router row ``i // G``: the ``G`` experts
  of a group always score alike, so top-``k*G`` routing picks ``k`` whole groups;
- both expert matrices are multiplied by ``scale ** (1/2)`` (``scale ** (1/3)`` for a gated unit or squared
  ReLU), so the experts' output is ``scale`` times their share of the dense FFN's: ``scale = G`` when the
  router renormalises its top-k gates to sum 1 (this router does for top-k > 1; each expert of a chosen group
  then gets ``1/G`` of its group's gate), else ``E*G*G / (k*G)`` (top-1 routing keeps the raw probability,
  about ``1/E`` at initialisation), divided by ``moe_router_topk_scaling_factor`` when that is set.

With a renormalising router, dropless routing (no ``--moe-expert-capacity-factor``) and an activation that
commutes with the scale (ReLU, and ReLU-gated units), the upcycled layer computes the dense FFN exactly; with
GELU or SiLU (SwiGLU) closely (``benchmarks/upcycle_closeness.py`` measures how closely). With top-1 routing
(``G = 1``, top-1) it computes ``E * p_top(x)`` times the dense FFN: the dense FFN where the router is uniform,
and close to it at initialisation, where ``p_top`` is about ``1/E``. Everything that is not an MoE layer's FFN
(embeddings, attention, norms, the layers ``--moe-layer-freq`` keeps dense, the output layer) is the dense
checkpoint's, loaded from any (TP, PP, DP) layout it was saved at into this job's (TP, PP, EP, DP) layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel

from granular_moe.layer import GranularMoELayer
from granular_moe.megatron.arguments import megatron_default_ffn_hidden_size
from granular_moe.training.checkpoint import READ_ERRORS, CheckpointError, read_checkpoint, require_checkpoint
from granular_moe.training.model import build_model_chunks, padded_vocab_size

FLAG = "--moe-upcycle-from"
# Flags whose values fix the tensors the dense checkpoint and this job share.
SHARED_ARCHITECTURE_FLAGS = (
    "num_layers", "hidden_size", "num_attention_heads", "swiglu", "normalization", "position_embedding_type",
    "untie_embeddings_and_output_weights", "max_position_embeddings",
)


# --------------------------------------------------------------------------- the conversion


def moe_activation_scale(config, granularity: int) -> float:
    """How much larger the upcycled experts' output is than their share of the dense FFN's (megatron-core's
    ``moe_activation_scale``): ``G`` for a router that renormalises its top-k gates (top-k > 1), else
    ``E*G*G / topk`` with ``E*G = config.num_moe_experts`` and ``topk = config.moe_router_topk`` (fine-grained
    values), divided by ``moe_router_topk_scaling_factor`` when set (the router multiplies its gates by it)."""
    if config.moe_router_topk > 1:
        scale = float(granularity)
    else:
        scale = config.num_moe_experts * granularity / config.moe_router_topk
    factor = getattr(config, "moe_router_topk_scaling_factor", None)
    return scale / factor if factor else scale


def expert_weight_scale(config, granularity: int) -> float:
    """The factor on both expert matrices: the activation scale's square root, its cube root for a gated
    linear unit or squared ReLU (their output grows with the cube of the weights' scale)."""
    cubic = config.gated_linear_unit or getattr(config.activation_func, "__name__", "") == "squared_relu"
    return moe_activation_scale(config, granularity) ** (1 / 3 if cubic else 1 / 2)


def upcycled_router_weight(router_weight: torch.Tensor, granularity: int) -> torch.Tensor:
    """``[E*G, hidden]`` -> ``[E*G, hidden]``: row ``i`` of the result is row ``i // G`` of the given one (its
    first ``E`` rows, each repeated ``G`` times), so the ``G`` experts cut from one FFN score alike."""
    rows = torch.arange(router_weight.shape[0], device=router_weight.device) // granularity
    return router_weight.detach().index_select(0, rows).clone()


def upcycled_expert_weights(fc1: torch.Tensor, fc2: torch.Tensor, config, granularity: int,
                            expert_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts ``expert_ids`` (global indices) of one layer from its dense FFN.

    ``fc1`` is Megatron's ``linear_fc1.weight`` ``[d_ff, hidden]`` (``[2*d_ff, hidden]`` with a gated unit,
    activation half first), ``fc2`` its ``linear_fc2.weight`` ``[hidden, d_ff]``, both whole (not tensor-parallel
    shards). Returns :class:`~granular_moe.experts.GroupedExperts`' ``weight1 [n, hidden, d_ff/G (x2)]`` and
    ``weight2 [n, d_ff/G, hidden]``: expert ``i`` is slice ``i % G`` of the FFN, both matrices times
    :func:`expert_weight_scale`, in ``config.params_dtype`` (computed in float64, rounded once).
    """
    gated = config.gated_linear_unit
    ffn = fc2.shape[1]
    if fc1.shape != ((2 if gated else 1) * ffn, fc2.shape[0]) or ffn % granularity:
        raise CheckpointError(
            f"{FLAG}: dense FFN weights of shapes {tuple(fc1.shape)} and {tuple(fc2.shape)} cannot be cut into "
            f"{granularity} experts{' with a gated linear unit' if gated else ''}"
        )
    width, ids = ffn // granularity, [int(i) for i in expert_ids]
    scale = expert_weight_scale(config, granularity)
    hidden, dtype = fc2.shape[0], config.params_dtype
    weight1 = torch.empty(len(ids), hidden, width * (2 if gated else 1), dtype=dtype, device=fc1.device)
    weight2 = torch.empty(len(ids), width, hidden, dtype=dtype, device=fc2.device)
    with torch.no_grad():
        for local, expert in enumerate(ids):  # slice first: float64 copies of one slice at a time
            rows = slice((expert % granularity) * width, (expert % granularity + 1) * width)
            slice1 = torch.cat([fc1[:ffn][rows], fc1[ffn:][rows]]) if gated else fc1[rows]
            weight1[local] = (slice1.to(torch.float64) * scale).t()
            weight2[local] = (fc2[:, rows].to(torch.float64) * scale).t()
    return weight1, weight2


# --------------------------------------------------------------------------- checks


def _dense_ffn_size(saved: argparse.Namespace) -> int:
    return saved.ffn_hidden_size or megatron_default_ffn_hidden_size(saved.hidden_size, saved.swiglu)


def _moe_layers(chunk) -> list:
    """``(local index, global layer index from 0, layer)`` of the chunk's granular MoE layers."""
    return [(index, layer.layer_number - 1, layer) for index, layer in enumerate(chunk.decoder.layers)
            if isinstance(layer.mlp, GranularMoELayer)]


def check_upcyclable(saved: argparse.Namespace, args: argparse.Namespace, config, vocab_size: int,
                     directory: Path) -> int:
    """Refuse, naming the flags, a dense checkpoint (saved with ``saved``) this job cannot start from; returns
    its FFN hidden size. Every rank reaches the same verdict (it reads the same files)."""
    if getattr(saved, "num_experts", None):
        saved_granularity = getattr(saved, "moe_granularity", 1) or 1
        experts = saved.num_experts // (saved_granularity if getattr(saved, "moe_granularity_applied", False) else 1)
        raise CheckpointError(
            f"{FLAG} {directory}: the checkpoint is of an MoE model (--num-experts {experts} at --moe-granularity "
            f"{saved_granularity}); upcycling starts from a dense one (to continue an MoE run, pass --load instead)"
        )
    granularity = args.moe_granularity
    differing = [
        f"--{name.replace('_', '-')}: dense checkpoint {getattr(saved, name)!r}, this job {getattr(args, name)!r}"
        for name in SHARED_ARCHITECTURE_FLAGS
        if hasattr(saved, name) and getattr(saved, name) != getattr(args, name)
    ]
    padded = padded_vocab_size(vocab_size, args.tensor_model_parallel_size)
    if getattr(saved, "padded_vocab_size", padded) != padded:
        differing.append(
            f"padded vocabulary: dense checkpoint {saved.padded_vocab_size}, this job {padded} (the tokenizer's "
            f"{vocab_size} padded to a multiple of 128 x --tensor-model-parallel-size "
            f"{args.tensor_model_parallel_size}; the dense job ran at --tensor-model-parallel-size "
            f"{getattr(saved, 'tensor_model_parallel_size', '?')})"
        )
    dense_ffn = _dense_ffn_size(saved)
    expert_ffn = config.moe_ffn_hidden_size
    if dense_ffn != granularity * expert_ffn:
        differing.append(
            f"--ffn-hidden-size: dense checkpoint {dense_ffn}, this job's experts --moe-granularity {granularity} x "
            f"{expert_ffn} = {granularity * expert_ffn} (upcycling cuts the dense FFN into G experts: set "
            f"--moe-ffn-hidden-size, else --ffn-hidden-size, to {dense_ffn})"
        )
    if _keeps_dense_layers(config) and config.ffn_hidden_size != dense_ffn:
        differing.append(
            f"--ffn-hidden-size (the layers --moe-layer-freq {config.moe_layer_freq!r} keeps dense): dense "
            f"checkpoint {dense_ffn}, this job {config.ffn_hidden_size}"
        )
    if differing:
        raise CheckpointError(
            f"{FLAG} {directory}: the dense checkpoint's model does not match this job's:\n  - "
            + "\n  - ".join(differing)
        )
    return dense_ffn


def _keeps_dense_layers(config) -> bool:
    frequency = config.moe_layer_freq
    if isinstance(frequency, int):
        return frequency > 1
    return 0 in frequency


def _check_job(args: argparse.Namespace, config) -> None:
    if not config.num_moe_experts:
        raise CheckpointError(f"{FLAG} needs an MoE model: set --num-experts")
    if args.moe_router_type != "token_choice":
        raise CheckpointError(
            f"{FLAG} needs --moe-router-type token_choice, got {args.moe_router_type!r}: expert-choice routing "
            f"lets each expert pick its tokens, so an upcycled layer does not compute the dense FFN (tokens get "
            f"any number of experts, including none)"
        )


def _check_keys_and_shapes(request: dict, stored: dict, directory: Path) -> None:
    """Every tensor requested is in the checkpoint with the requested global shape; an error naming them."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    problems = []
    for entry in nested_values(request):
        if isinstance(entry, ShardedTensorFactory):
            if entry.key not in stored and f"{entry.key}_w" not in stored:
                problems.append(f"{entry.key}: not in the checkpoint")
        elif isinstance(entry, ShardedTensor):
            if entry.key not in stored:
                problems.append(f"{entry.key}: not in the checkpoint")
            elif tuple(stored[entry.key].global_shape) != tuple(entry.global_shape):
                problems.append(f"{entry.key}: checkpoint {tuple(stored[entry.key].global_shape)}, this job "
                                f"{tuple(entry.global_shape)}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointError(f"{FLAG} {directory}: the dense checkpoint does not hold this job's tensors:\n  - "
                              + "\n  - ".join(shown))


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _random_state_kept():
    """Run the block without changing any generator this job draws from (torch's, CUDA's, Megatron's
    tracker): the dense twin's construction must not shift the job's random streams."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    tracker.set_states(states)


def _dense_twins(args: argparse.Namespace, config, vocab_size: int, dense_ffn: int) -> list:
    """This rank's chunks of the dense model at this job's layout, uninitialised: their sharded state dicts say
    which shard of each dense tensor this rank needs, under the dense checkpoint's keys."""
    dense_config = dataclasses.replace(
        config, num_moe_experts=None, moe_layer_freq=1, moe_ffn_hidden_size=None, ffn_hidden_size=dense_ffn,
        expert_model_parallel_size=1,
        perform_initialization=False,
    )
    with _random_state_kept():
        return build_model_chunks(args, dense_config, vocab_size)


def _full_ffn_request(twin_entry, stored: dict, layer: int, num_layers: int, directory: Path) -> dict:
    """ShardedTensors covering the whole of one layer's dense FFN matrix (every rank loads it all: the
    experts are not tensor-parallel). ``twin_entry`` is the dense twin's own (tensor-parallel) entry."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    parts = [twin_entry.key] if twin_entry.key in stored else [f"{twin_entry.key}_w", f"{twin_entry.key}_v"]
    request = {}
    for key in parts:
        if key not in stored:
            raise CheckpointError(f"{FLAG} {directory}: the dense checkpoint holds no {key}")
        shape = tuple(stored[key].global_shape)
        data = torch.empty(shape[-2:], dtype=stored[key].dtype, device=twin_entry.data.device)
        if len(shape) == 3:  # layers stacked on a leading axis (Megatron's homogeneous layout)
            if shape[0] != num_layers:
                raise CheckpointError(f"{FLAG} {directory}: {key} holds {shape[0]} layers, this job {num_layers}")
            request[key] = ShardedTensor.from_rank_offsets(key, data, (0, layer, num_layers), replica_id=0,
                                                           prepend_axis_num=1)
        elif len(shape) == 2:
            request[key] = ShardedTensor.from_rank_offsets(key, data, replica_id=0)
        else:
            raise CheckpointError(f"{FLAG} {directory}: {key} has shape {shape}, not a linear layer's weight")
    return request


def _whole(parts: dict) -> torch.Tensor:
    """One FFN matrix from what :func:`_full_ffn_request` loaded: the tensor, or its two halves (a gated unit's
    checkpoint saved with ``singleton_local_shards``: ``_w`` then ``_v``)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    (activation,), (linear,) = ([parts[key] for key in parts if key.endswith(end)] for end in ("_w", "_v"))
    return torch.cat([activation, linear])


def _sharding_metadata(directory: Path) -> dict:
    """The metadata the dense checkpoint was saved with (how its tensors are laid out), as ``load_checkpoint``
    builds it."""
    from megatron.core import dist_checkpointing

    from granular_moe.training.checkpoint import with_stored

    metadata = {"singleton_local_shards": False,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    return with_stored(metadata, dist_checkpointing.load_content_metadata(str(directory)))


def _load_shared(chunk, dense: dict, moe_layers: list, directory: Path) -> None:
    """Load the dense model's tensors (everything but the MoE layers' FFNs) into ``chunk``; an error naming the
    tensors when the two models do not hold the same ones."""
    own = chunk.state_dict()
    misplaced = [f"{key} {tuple(value.shape)}" + (f" (this job {tuple(own[key].shape)})" if key in own else "")
                 for key, value in dense.items()
                 if torch.is_tensor(value) and (key not in own or value.shape != own[key].shape)]
    if misplaced:
        raise CheckpointError(f"{FLAG} {directory}: the dense model's tensors do not fit this job's: "
                              f"{', '.join(misplaced[:5])}")
    missing, unexpected = chunk.load_state_dict(dense, strict=False)
    converted = {f"decoder.layers.{local}.mlp.{name}" for local, _, _ in moe_layers
                 for name in ("router.weight", "experts.weight1", "experts.weight2")}
    missing = [key for key in missing if key not in converted and not key.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{FLAG} {directory}: the dense checkpoint gives no value for {missing[:5]}"
                              + (f" and has no place for {unexpected[:5]}" if unexpected else ""))


def upcycled_chunks(args: argparse.Namespace, config, vocab_size: int) -> list:
    """This rank's model chunks (unwrapped ``GPTModel``s, as :func:`~granular_moe.training.model.build_model_chunks`
    builds them from ``args`` and ``config``) holding the dense checkpoint of ``args.moe_upcycle_from``, its
    MoE layers' FFNs cut into the experts (see the module's description).

    ``config`` is the job's ``TransformerConfig`` (fine-grained MoE values), ``vocab_size`` the tokenizer's.
    Collective over all ranks. Raises :class:`~granular_moe.training.checkpoint.CheckpointError` naming
    ``--moe-upcycle-from`` (and the flags at fault) for a checkpoint that is missing, damaged, of an MoE model,
    or of another architecture, and for expert-choice routing.

    Memory, while it runs, besides the model: the dense model's other tensors at this layout, and the whole
    dense FFN of each of this rank's MoE layers in the checkpoint's dtype (the experts are not
    tensor-parallel); the random generators are left as building the model leaves them.
    """
    from megatron.core import dist_checkpointing

    _check_job(args, config)
    directory = require_checkpoint(args.moe_upcycle_from, FLAG)
    saved = read_checkpoint(directory)
    dense_ffn = check_upcyclable(saved, args, config, vocab_size, directory)
    try:
        stored = dist_checkpointing.load_tensors_metadata(str(directory))
    except READ_ERRORS as error:
        raise CheckpointError(f"{FLAG} {directory}: its tensor index cannot be read ({error}); the checkpoint is "
                              f"damaged") from None
    with_experts = sorted(key for key in stored if ".mlp.router." in key or ".mlp.experts." in key)
    if with_experts:
        raise CheckpointError(f"{FLAG} {directory}: the checkpoint holds experts ({with_experts[0]}, ...); "
                              f"upcycling starts from a dense one (to continue an MoE run, pass --load instead)")
    granularity = args.moe_granularity

    chunks = build_model_chunks(args, config, vocab_size)
    twins = _dense_twins(args, config, vocab_size, dense_ffn)
    metadata = _sharding_metadata(directory)
    request, moe_layers = {}, []
    for index, (chunk, twin) in enumerate(zip(chunks, twins)):
        dense_entries = twin.sharded_state_dict(metadata=metadata)
        layers = _moe_layers(chunk)
        moe_layers.append(layers)
        for local, layer, _ in layers:
            prefix = f"decoder.layers.{local}.mlp."
            for name in ("linear_fc1", "linear_fc2"):
                entry = dense_entries[f"{prefix}{name}.weight"]
                request[f"ffn.{index}.{local}.{name}"] = _full_ffn_request(
                    entry, stored, layer, config.num_layers, directory)
            for key in [key for key in dense_entries if key.startswith(prefix)]:
                del dense_entries[key]  # the experts take the whole FFN, requested above
        request[f"chunk.{index}"] = dense_entries
    _check_keys_and_shapes(request, stored, directory)
    try:
        # Every rank asks for the whole FFN of its MoE layers: shards loaded by several ranks, which megatron-core's
        # access check (each shard loaded once as a main replica) would refuse.
        loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    except READ_ERRORS as error:
        raise CheckpointError(f"{FLAG} {directory} could not be read ({type(error).__name__}: "
                              f"{str(error).strip()[-300:]}); the checkpoint is damaged or incomplete") from None
    del request, twins

    for index, chunk in enumerate(chunks):
        _load_shared(chunk, loaded[f"chunk.{index}"], moe_layers[index], directory)
        for local, _, layer in moe_layers[index]:
            fc1, fc2 = (_whole(loaded.pop(f"ffn.{index}.{local}.{name}")) for name in ("linear_fc1", "linear_fc2"))
            experts, router = layer.mlp.experts, layer.mlp.router
            weight1, weight2 = upcycled_expert_weights(fc1, fc2, config, granularity, experts.global_expert_ids)
            del fc1, fc2
            with torch.no_grad():
                experts.weight1.copy_(weight1)
                experts.weight2.copy_(weight2)
                router.weight.copy_(upcycled_router_weight(router.weight, granularity))
    return chunks
