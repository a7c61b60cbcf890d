"""The Hugging Face targets: which family represents the job's model, its ``config.json`` from the job's
flags, and the job's flags of a ``transformers`` config.

A target represents a model when ``transformers``' modelling code computes what megatron-core computes, to
fp32 rounding. What it cannot represent is refused before anything is written, every problem at once, each
named by its main-job flag and value (:class:`HfExportError`); ``import-hf`` refuses the ``config.json``
fields the job cannot build the same way (:class:`HfImportError`). The families themselves live in
:mod:`granular_moe.hf.families`.
"""

from __future__ import annotations

import argparse

from granular_moe.config import GranularMoEConfigError
from granular_moe.hf.families import FAMILIES, Family

TARGETS = tuple(FAMILIES)
TARGET_NAMES = {name: family.title for name, family in FAMILIES.items()}


class HfConversionError(GranularMoEConfigError):
    """A model that cannot be converted between the main job and a Hugging Face target."""


class HfExportError(HfConversionError):
    """The checkpoint's model cannot be written as the target: the message names every option the target
    cannot represent (its main-job flag, its value, the target). Raised before anything is written."""


class HfImportError(HfConversionError):
    """The Hugging Face model cannot be built by the main job: the message names every ``config.json`` field
    it cannot represent. Raised before anything is written."""


def family(target: str) -> Family:
    if target not in FAMILIES:
        raise HfExportError(f"--target {target!r} is not valid; valid values: auto, {', '.join(TARGETS)}")
    return FAMILIES[target]


def export_problems(args, target: str) -> list[str]:
    """What ``target`` cannot represent of the model the (checkpoint's) flags ``args`` describe."""
    return family(target).export_problems(args)


def choose_target(args, requested: str = "auto") -> str:
    """The target to write: ``requested``, checked, or with ``auto`` the first target that represents the
    model. Raises :class:`HfExportError` naming every problem (with ``auto``, every target's)."""
    if requested != "auto":
        problems = export_problems(args, requested)
        if problems:
            raise HfExportError(f"cannot export as {requested} ({TARGET_NAMES[requested]}):\n  - "
                                + "\n  - ".join(problems))
        return requested
    reasons = {}
    for target in TARGETS:
        reasons[target] = export_problems(args, target)
        if not reasons[target]:
            return target
    lines = ["no Hugging Face target represents this model (--target auto):"]
    for target, problems in reasons.items():
        lines.append(f"  {target} ({TARGET_NAMES[target]}):")
        lines += [f"    - {problem}" for problem in problems]
    raise HfExportError("\n".join(lines))


def hf_config(args, target: str, vocab_size: int, special_ids: dict, dtype: str):
    """The ``transformers`` config of the model ``args`` describe (checked by :func:`choose_target`)."""
    return family(target).config(args, vocab_size, special_ids, dtype)


def import_family(config) -> Family:
    """The family of a ``transformers`` config; :class:`HfImportError` naming every field the job cannot
    represent (or the model type it does not read)."""
    model_type = config.model_type
    if model_type not in FAMILIES:
        raise HfImportError(f"cannot import this {model_type} model:\n  - model_type {model_type!r}: import-hf reads "
                            f"{', '.join(TARGETS)}")
    problems = FAMILIES[model_type].import_problems(config)
    if problems:
        raise HfImportError(f"cannot import this {model_type} model:\n  - " + "\n  - ".join(problems))
    return FAMILIES[model_type]


def flags_from_hf(config) -> list[str]:
    """The main job's model flags for the ``transformers`` config (granularity 1: the config's experts are
    the job's experts). Raises :class:`HfImportError` naming every field the job cannot represent."""
    return [str(flag) for flag in import_family(config).flags(config)]


def parse_model_flags(flags: list[str]) -> argparse.Namespace:
    """The main job's namespace for ``flags`` (fp32, one process), as :func:`parse_args` gives it."""
    from granular_moe.training.arguments import parse_args

    return parse_args(flags + ["--fp32"])
