"""Declarative weight mappings: one group of the job's tensors (its megatron-core model's state-dict names at
TP = PP = EP = 1) and the Hugging Face checkpoint tensors made from them, both ways.

A family lists its mappings in checkpoint order (:mod:`granular_moe.hf.families`); the conversions work a
mapping at a time, so what one holds is one group (at most one layer's experts), never the model:

- :class:`Same`: one tensor as it is (the embedding and output layer keep the tokenizer's rows of the
  padded vocabulary; a fixed Hugging Face dtype where the target stores one, e.g. an fp32 expert bias);
- :class:`Zeros`: a Hugging Face tensor the job has no counterpart of, written as zeros (export only);
- :class:`QKV`: megatron-core's fused ``linear_qkv`` (per key/value group: its query heads, its key head, its
  value head) as ``q_proj / k_proj / v_proj``, weights or biases;
- :class:`Gated`: a gated MLP's ``linear_fc1`` (``[gate; up]``, the activation on the first half) and
  ``linear_fc2`` as ``gate_proj / up_proj / down_proj`` (or another family's names for them);
- :class:`Experts`: the granular layer's ``weight1 [E, hidden, 2 n]`` and ``weight2 [E, n, hidden]`` as each
  routed expert's ``[out, in]`` projections, under its own id.

Shapes are given per dimension as ``(size, the config.json keys it comes from)``, so a tensor of the wrong
shape is named with the keys to check. Nothing here allocates until a conversion runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

Shape = tuple[tuple[int, str], ...]


def dim(size: int, key: str) -> tuple[int, str]:
    return int(size), key


def sizes(shape: Shape) -> tuple[int, ...]:
    return tuple(size for size, _ in shape)


def shape_text(shape: Shape) -> str:
    return "[" + ", ".join(f"{key} {size:,}" for size, key in shape) + "]"


class Mapping:
    """One group of the job's tensors (``megatron``) and the Hugging Face tensors made from them."""

    megatron: tuple[str, ...] = ()
    layer: Optional[int] = None  # the decoder layer it belongs to (None: embedding, final norm, output layer)

    def hf_shapes(self) -> dict[str, Shape]:
        """Every Hugging Face tensor of the group, in checkpoint order, with its shape."""
        raise NotImplementedError

    def hf_dtype(self, name: str) -> Optional[torch.dtype]:
        """The dtype the target stores ``name`` in whatever the export's (None: the export's)."""
        return None

    def to_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The group's Hugging Face tensors from its megatron-core ones."""
        raise NotImplementedError

    def to_megatron(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The group's megatron-core tensors from its Hugging Face ones."""
        raise NotImplementedError

    # sizes without naming every tensor (a routed expert's tensors stand for all of them)
    def largest(self) -> tuple[str, Shape, int]:
        """The group's largest Hugging Face tensor: its name, shape and how many such tensors the group has."""
        name, shape = max(self.hf_shapes().items(), key=lambda item: math.prod(sizes(item[1])))
        return name, shape, 1

    def hf_numel(self) -> int:
        return sum(math.prod(sizes(shape)) for shape in self.hf_shapes().values())


@dataclass(frozen=True)
class Same(Mapping):
    """One tensor as it is; ``rows``: the Hugging Face tensor keeps the first rows of the job's (the padded
    vocabulary), the job's gets ``padded_rows`` back, the rest zero."""

    source: str
    hf: str
    shape: Shape
    layer: Optional[int] = None
    padded_rows: Optional[int] = None
    dtype: Optional[torch.dtype] = None

    @property
    def megatron(self) -> tuple[str, ...]:
        return (self.source,)

    def hf_shapes(self) -> dict[str, Shape]:
        return {self.hf: self.shape}

    def hf_dtype(self, name: str) -> Optional[torch.dtype]:
        return self.dtype

    def to_hf(self, tensors):
        tensor = tensors[self.source]
        return {self.hf: tensor[: self.shape[0][0]] if self.padded_rows is not None else tensor}

    def to_megatron(self, tensors):
        tensor = tensors[self.hf]
        if self.padded_rows is not None and self.padded_rows != tensor.shape[0]:
            full = tensor.new_zeros((self.padded_rows, *tensor.shape[1:]))
            full[: tensor.shape[0]] = tensor
            tensor = full
        return {self.source: tensor}


@dataclass(frozen=True)
class Zeros(Mapping):
    """A Hugging Face tensor the job's model has no counterpart of: zeros (DeepSeek's expert bias without
    ``--moe-router-enable-expert-bias``)."""

    hf: str
    shape: Shape
    dtype: torch.dtype
    layer: Optional[int] = None

    def hf_shapes(self) -> dict[str, Shape]:
        return {self.hf: self.shape}

    def hf_dtype(self, name: str) -> Optional[torch.dtype]:
        return self.dtype

    def to_hf(self, tensors):
        return {self.hf: torch.zeros(sizes(self.shape), dtype=self.dtype)}

    def to_megatron(self, tensors):
        return {}


@dataclass(frozen=True)
class QKV(Mapping):
    """megatron-core's fused ``linear_qkv`` weight (or bias) as the target's ``q_proj / k_proj / v_proj``."""

    source: str
    prefix: str  # "model.layers.L.self_attn."
    heads: int
    groups: int
    head_dim: int
    hidden: tuple[int, str]
    layer: Optional[int] = None
    bias: bool = False

    @property
    def megatron(self) -> tuple[str, ...]:
        return (self.source,)

    def _names(self) -> tuple[str, str, str]:
        suffix = "bias" if self.bias else "weight"
        return tuple(f"{self.prefix}{p}_proj.{suffix}" for p in "qkv")

    def hf_shapes(self) -> dict[str, Shape]:
        queries = dim(self.heads * self.head_dim, "num_attention_heads x head_dim")
        keys = dim(self.groups * self.head_dim, "num_key_value_heads x head_dim")
        tail = () if self.bias else (self.hidden,)
        q, k, v = self._names()
        return {q: (queries, *tail), k: (keys, *tail), v: (keys, *tail)}

    def to_hf(self, tensors):
        fused = tensors[self.source]
        per_group = fused.reshape(self.groups, (self.heads // self.groups + 2) * self.head_dim, *fused.shape[1:])
        q, k, v = torch.split(per_group, [self.heads // self.groups * self.head_dim, self.head_dim, self.head_dim],
                              dim=1)
        tail = fused.shape[1:]
        names = self._names()
        return {names[0]: q.reshape(self.heads * self.head_dim, *tail),
                names[1]: k.reshape(self.groups * self.head_dim, *tail),
                names[2]: v.reshape(self.groups * self.head_dim, *tail)}

    def to_megatron(self, tensors):
        q, k, v = (tensors[name] for name in self._names())
        tail = q.shape[1:]
        per_group = self.heads // self.groups * self.head_dim
        joined = torch.cat([q.reshape(self.groups, per_group, *tail), k.reshape(self.groups, self.head_dim, *tail),
                            v.reshape(self.groups, self.head_dim, *tail)], dim=1)
        return {self.source: joined.reshape(-1, *tail)}


def _gated_shapes(names: tuple[str, str, str], width: tuple[int, str], hidden: tuple[int, str]) -> dict[str, Shape]:
    """A gated MLP's ``gate / up / down`` projections, ``[out, in]``."""
    gate, up, down = names
    return {gate: (width, hidden), up: (width, hidden), down: (hidden, width)}


@dataclass(frozen=True)
class Gated(Mapping):
    """A gated MLP: ``linear_fc1`` (``[gate; up]``) and ``linear_fc2`` as ``gate / up / down`` projections."""

    fc1: str
    fc2: str
    prefix: str  # "model.layers.L.mlp."
    width: tuple[int, str]
    hidden: tuple[int, str]
    layer: Optional[int] = None
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @property
    def megatron(self) -> tuple[str, ...]:
        return (self.fc1, self.fc2)

    def _hf(self) -> tuple[str, str, str]:
        return tuple(f"{self.prefix}{name}.weight" for name in self.names)

    def hf_shapes(self) -> dict[str, Shape]:
        return _gated_shapes(self._hf(), self.width, self.hidden)

    def to_hf(self, tensors):
        gate, up = tensors[self.fc1].chunk(2, dim=0)
        names = self._hf()
        return {names[0]: gate, names[1]: up, names[2]: tensors[self.fc2]}

    def to_megatron(self, tensors):
        gate, up, down = (tensors[name] for name in self._hf())
        return {self.fc1: torch.cat([gate, up], dim=0), self.fc2: down}


@dataclass(frozen=True)
class Experts(Mapping):
    """The granular layer's routed experts (``weight1 [E, hidden, 2 n]``: the gate then the up half,
    ``weight2 [E, n, hidden]``) as each expert's ``[out, in]`` projections: ``{prefix}{e}.{gate, up,
    down}.weight``, in expert order."""

    weight1: str
    weight2: str
    prefix: str  # "model.layers.L.mlp.experts."
    count: tuple[int, str]
    width: tuple[int, str]
    hidden: tuple[int, str]
    layer: Optional[int] = None
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @property
    def megatron(self) -> tuple[str, ...]:
        return (self.weight1, self.weight2)

    def _hf(self, expert: int) -> tuple[str, str, str]:
        return tuple(f"{self.prefix}{expert}.{name}.weight" for name in self.names)

    def hf_shapes(self) -> dict[str, Shape]:
        shapes = {}
        for expert in range(self.count[0]):
            shapes.update(_gated_shapes(self._hf(expert), self.width, self.hidden))
        return shapes

    def largest(self) -> tuple[str, Shape, int]:
        return self._hf(0)[0], (self.width, self.hidden), 3 * self.count[0]

    def hf_numel(self) -> int:
        return 3 * self.count[0] * self.width[0] * self.hidden[0]

    def to_hf(self, tensors):
        weight1, weight2 = tensors[self.weight1], tensors[self.weight2]
        out = {}
        for expert in range(self.count[0]):
            gate, up = weight1[expert].t().chunk(2, dim=0)
            names = self._hf(expert)
            out.update({names[0]: gate, names[1]: up, names[2]: weight2[expert].t()})
        return out

    def to_megatron(self, tensors):
        ones, twos = [], []
        for expert in range(self.count[0]):
            gate, up, down = (tensors[name] for name in self._hf(expert))
            ones.append(torch.cat([gate, up], dim=0).t())
            twos.append(down.t())
        return {self.weight1: torch.stack(ones), self.weight2: torch.stack(twos)}


def hf_shapes(mappings: list[Mapping]) -> dict[str, Shape]:
    """Every Hugging Face tensor of ``mappings``, in checkpoint order."""
    shapes = {}
    for mapping in mappings:
        shapes.update(mapping.hf_shapes())
    return shapes


def to_hf(state: dict[str, torch.Tensor], mappings: list[Mapping]) -> dict[str, torch.Tensor]:
    """The whole Hugging Face checkpoint from a whole state dict (the plain reference of the streaming export)."""
    out = {}
    for mapping in mappings:
        out.update(mapping.to_hf({name: state[name] for name in mapping.megatron}))
    return out


def to_megatron(tensors: dict[str, torch.Tensor], mappings: list[Mapping]) -> dict[str, torch.Tensor]:
    """The whole state dict from the whole Hugging Face checkpoint (the plain reference of the streaming
    import)."""
    out = {}
    for mapping in mappings:
        out.update(mapping.to_megatron({name: tensors[name] for name in mapping.hf_shapes()}))
    return out
