"""Granular MoE in Megatron-LM's own ``pretrain_gpt.py`` (``core_v0.19.0``), with or without patching the
checkout.

No patch::

    python -m granular_moe.megatron.megatron_lm --megatron-lm-dir PATH [pretrain_gpt.py flags]
    (or MEGATRON_LM_DIR=PATH), under torchrun, srun (one task per GPU) or mpirun

runs the checkout's ``pretrain_gpt.py`` as ``__main__``, unchanged but for two things: its
``parse_and_validate_args`` gets the plugin's flags (``--moe-granularity``, ``--moe-router-type``,
``--moe-kernels``) added to its ``extra_args_provider`` (ModelOpt's, when present), and the model config
``gpt_config_from_args`` returns gets the granular decoder block spec (:func:`with_granular_moe_spec`). The
patch in ``patches/core_v0.19.0/`` makes the same two changes in ``pretrain_gpt.py``, calling
:func:`granular_moe_args_provider` and :func:`with_granular_moe_spec`.

What cannot carry the granular layer is refused by name, before the model is built: ``--spec MODULE NAME``
(Megatron-LM imports a ready object there, while the MoE positions depend on the config), multi-token
prediction (``--mtp-num-layers``: its layers are Megatron's own), ``--experimental-attention-variant``,
``--transformer-impl inference_optimized`` and a restored ModelOpt state.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import re
import runpy
import sys
from pathlib import Path
from typing import Callable, Sequence

from granular_moe.config import GranularMoEConfigError
from granular_moe.megatron.arguments import add_granular_moe_args

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
MEGATRON_LM_TAG = "core_v0.19.0"


def granular_moe_args_provider(extra_args_provider: ArgsProvider | None = None) -> ArgsProvider:
    """An ``extra_args_provider`` for Megatron-LM's ``parse_and_validate_args``: ``extra_args_provider``'s
    flags, then the plugin's (once: a patched checkout run through the wrapper does not add them twice)."""

    def provide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        if "--moe-granularity" not in parser._option_string_actions:
            parser = add_granular_moe_args(parser)
        return parser

    return provide


def granular_moe_decoder_block_spec(args: argparse.Namespace, config, use_transformer_engine: bool, **megatron_kwargs):
    """The decoder block spec Megatron-LM takes for MoE models, with granular MoE layers.

    ``--moe-router-type`` and ``--moe-kernels`` come from ``args`` (their defaults where the job did not add
    the plugin's flags, e.g. a Megatron-LM tool that only loads a model); ``megatron_kwargs`` are
    megatron-core's (``normalization``, ``qk_l2_norm``, ``vp_stage``, ``pp_rank``).
    """
    from megatron.core import parallel_state

    from granular_moe.megatron.spec import get_gpt_decoder_block_spec
    from granular_moe.parallel import expert_groups_from_megatron

    # Megatron-LM's initialize made megatron-core's groups; every rank builds its model here, so this is
    # where DeepSpeed's expert groups join them (collective, once).
    if parallel_state.model_parallel_is_initialized():
        expert_groups_from_megatron(getattr(args, "moe_ranks_per_node", None))
    return get_gpt_decoder_block_spec(
        config, use_transformer_engine, router_type=getattr(args, "moe_router_type", "token_choice"),
        kernels=getattr(args, "moe_kernels", "auto"), **megatron_kwargs,
    )


def _granular_layer_spec(args: argparse.Namespace, model_config, vp_stage=None):
    """``GPTModelConfig.transformer_layer_spec`` as a function of the model config (Megatron-LM's
    ``GPTModelBuilder`` calls it with ``vp_stage`` on every rank)."""
    transformer = model_config.transformer
    return granular_moe_decoder_block_spec(
        args, transformer, use_transformer_engine=transformer.transformer_impl == "transformer_engine",
        normalization=transformer.normalization, qk_l2_norm=transformer.qk_l2_norm, vp_stage=vp_stage,
    )


def with_granular_moe_spec(model_config, args: argparse.Namespace):
    """Give Megatron-LM's ``GPTModelConfig`` (from ``gpt_config_from_args``) the granular decoder block spec
    when the job has experts; returns ``model_config``. Idempotent.

    Refuses, naming the flag, what would build a model without the granular layer.
    """
    if not getattr(args, "num_experts", None):
        return model_config
    current = model_config.transformer_layer_spec
    if isinstance(current, functools.partial) and current.func is _granular_layer_spec:
        return model_config
    transformer = model_config.transformer
    blockers = {
        "--spec (Megatron-LM imports a ready spec there; the granular spec depends on the config)":
            getattr(args, "spec", None) is not None or current is not None,
        "--mtp-num-layers (multi-token prediction layers are Megatron's own MoE layers)":
            bool(transformer.mtp_num_layers),
        "--experimental-attention-variant": transformer.experimental_attention_variant is not None,
        "--transformer-impl inference_optimized": transformer.transformer_impl == "inference_optimized",
        "a restored ModelOpt state (--restore-modelopt-state)": bool(getattr(model_config, "restore_modelopt_state",
                                                                            False)),
    }
    refused = [flag for flag, present in blockers.items() if present]
    if refused:
        raise GranularMoEConfigError(
            "granular MoE cannot be placed in this Megatron-LM job with " + "; ".join(refused) + ": drop it"
        )
    model_config.transformer_layer_spec = functools.partial(_granular_layer_spec, args)
    return model_config


def _with_provider(parse_and_validate_args: Callable) -> Callable:
    """Megatron-LM's ``parse_and_validate_args`` with the plugin's flags composed into its
    ``extra_args_provider``."""
    signature = inspect.signature(parse_and_validate_args)
    if "extra_args_provider" not in signature.parameters:
        raise GranularMoEConfigError(
            f"this Megatron-LM's parse_and_validate_args() takes no extra_args_provider; "
            f"use Megatron-LM {MEGATRON_LM_TAG}"
        )

    @functools.wraps(parse_and_validate_args)
    def parse_with_granular_moe(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["extra_args_provider"] = granular_moe_args_provider(bound.arguments.get("extra_args_provider"))
        return parse_and_validate_args(*bound.args, **bound.kwargs)

    return parse_with_granular_moe


def _with_spec(gpt_config_from_args: Callable) -> Callable:
    """Megatron-LM's ``gpt_config_from_args`` whose config carries the granular spec."""

    @functools.wraps(gpt_config_from_args)
    def config_with_granular_moe(args, *rest, **kwargs):
        return with_granular_moe_spec(gpt_config_from_args(args, *rest, **kwargs), args)

    return config_with_granular_moe


def check_checkout(checkout: Path) -> Path:
    """``checkout`` if it is a Megatron-LM tree with ``pretrain_gpt.py`` whose megatron-core major.minor
    version is the installed one (the installed megatron-core is used)."""
    needed = ("pretrain_gpt.py", "megatron/training/argument_utils.py")
    missing = [name for name in needed if not (checkout / name).is_file()]
    if missing:
        raise GranularMoEConfigError(
            f"--megatron-lm-dir / MEGATRON_LM_DIR {checkout} is not a Megatron-LM {MEGATRON_LM_TAG} checkout "
            f"(no {', '.join(missing)})"
        )
    package_info = checkout / "megatron" / "core" / "package_info.py"
    if package_info.is_file():
        from megatron.core import package_info as installed

        text = package_info.read_text()
        found = tuple(int(re.search(rf"^{name} = (\d+)", text, re.M).group(1)) for name in ("MAJOR", "MINOR"))
        if found != (int(installed.MAJOR), int(installed.MINOR)):
            raise GranularMoEConfigError(
                f"{checkout} holds megatron-core {found[0]}.{found[1]}, but {installed.__version__} is installed "
                f"and is the one used: check out Megatron-LM {MEGATRON_LM_TAG} or install the matching megatron-core"
            )
    return checkout


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``<checkout>/pretrain_gpt.py`` as ``__main__`` with granular MoE (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m granular_moe.megatron.megatron_lm", add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--megatron-lm-dir", type=Path, default=os.environ.get("MEGATRON_LM_DIR") or None)
    known, megatron_argv = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if known.megatron_lm_dir is None:
        raise GranularMoEConfigError(f"pass --megatron-lm-dir PATH (or set MEGATRON_LM_DIR): a Megatron-LM "
                                     f"{MEGATRON_LM_TAG} checkout")
    checkout = check_checkout(known.megatron_lm_dir.resolve())
    from granular_moe.training.launch import distributed_env

    # Megatron-LM reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*: provide them under srun or mpirun too.
    distributed_env().export()
    sys.path.insert(0, str(checkout))
    arguments = importlib.import_module("megatron.training.arguments")
    argument_utils = importlib.import_module("megatron.training.argument_utils")
    # pretrain_gpt.py imports both by name: replace them in their modules before it runs
    arguments.parse_and_validate_args = _with_provider(arguments.parse_and_validate_args)
    argument_utils.gpt_config_from_args = _with_spec(argument_utils.gpt_config_from_args)
    sys.argv = [str(checkout / "pretrain_gpt.py"), *megatron_argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GranularMoEConfigError as error:
        print(f"granular-moe megatron-lm: error: {error}", file=sys.stderr)
        sys.exit(2)
