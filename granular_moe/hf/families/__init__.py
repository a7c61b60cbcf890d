"""The Hugging Face families ``export-hf`` writes and ``import-hf`` reads, one module each: what the family
represents (every other option refused by its main-job flag), its ``config.json`` from the job's flags and
the job's flags from it, and its weight mappings (:mod:`granular_moe.hf.mappings`).

``--target auto`` tries them in this order and takes the first that represents the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture (``model_type`` ``name``)."""

    name: str
    title: str
    architecture: str
    export_problems: Callable[[Any], list[str]]  # the job's flags it cannot represent, each named
    config: Callable[[Any, int, dict, str], Any]  # (args, vocab_size, special ids, dtype) -> transformers config
    import_problems: Callable[[Any], list[str]]  # config.json fields the job cannot build, each named
    flags: Callable[[Any], list]  # the job's model flags of a config.json
    mappings: Callable[[Any, int], list]  # (args, vocab_size) -> mappings in checkpoint order


def _registry() -> dict[str, Family]:
    from granular_moe.hf.families import deepseek_v3, glm4_moe, mixtral, olmoe, qwen2_moe, qwen3_moe

    families = [qwen3_moe.FAMILY, deepseek_v3.FAMILY, mixtral.FAMILY, qwen2_moe.FAMILY, olmoe.FAMILY, glm4_moe.FAMILY]
    return {family.name: family for family in families}


FAMILIES: dict[str, Family] = _registry()
