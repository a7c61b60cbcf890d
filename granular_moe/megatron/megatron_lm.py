"""Granular MoE in Megatron-LM's own ``pretrain_gpt.py``, with or without patching the checkout.

No patch::

    python -m granular_moe.megatron.megatron_lm --megatron-lm-dir PATH [pretrain_gpt.py flags]
    (or MEGATRON_LM_DIR=PATH), under torchrun, srun (one task per GPU) or mpirun

runs the checkout's ``pretrain_gpt.py`` as ``__main__``, unchanged but for two things: its ``pretrain`` call
gets the plugin's flags (``--moe-granularity``, ``--moe-router-type``, ``--moe-kernels``) added to its
``extra_args_provider`` (ModelOpt's, when present), and its model builder (``gpt_builders.gpt_builder``)
gets the granular decoder block spec where it would take megatron-core's MoE spec. The patch in
``patches/`` makes the same two changes in the checkout's files, calling :func:`granular_moe_args_provider`
and :func:`granular_moe_decoder_block_spec`.

Limits: ``--spec MODULE NAME`` bypasses the builder's spec choice (Megatron-LM imports a ready object there,
so no config-dependent spec can come through it); multi-token prediction layers (``--mtp-num-layers``),
``--use-legacy-models`` and ``--experimental-attention-variant`` keep Megatron's own layers.
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


def granular_moe_args_provider(extra_args_provider: ArgsProvider | None = None) -> ArgsProvider:
    """An ``extra_args_provider`` for Megatron-LM's ``pretrain``: ``extra_args_provider``'s flags, then the
    plugin's (once: a patched checkout run through the wrapper does not add them twice)."""

    def provide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        if "--moe-granularity" not in parser._option_string_actions:
            parser = add_granular_moe_args(parser)
        return parser

    return provide


def granular_moe_decoder_block_spec(args: argparse.Namespace, config, use_transformer_engine: bool, **megatron_kwargs):
    """The decoder block spec ``gpt_builders.gpt_builder`` takes for MoE models, with granular MoE layers.

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
        expert_groups_from_megatron()
    return get_gpt_decoder_block_spec(
        config, use_transformer_engine, router_type=getattr(args, "moe_router_type", "token_choice"),
        kernels=getattr(args, "moe_kernels", "auto"), **megatron_kwargs,
    )


def use_granular_moe_spec(gpt_builders) -> None:
    """Make a Megatron-LM ``gpt_builders`` module build granular MoE: its ``gpt_builder`` looks
    ``get_gpt_decoder_block_spec`` up in the module's globals, which now hold the granular spec."""
    from megatron.training import get_args

    def get_gpt_decoder_block_spec(config, use_transformer_engine, **megatron_kwargs):
        return granular_moe_decoder_block_spec(get_args(), config, use_transformer_engine, **megatron_kwargs)

    gpt_builders.get_gpt_decoder_block_spec = get_gpt_decoder_block_spec


def with_granular_moe_args(pretrain: Callable) -> Callable:
    """Megatron-LM's ``pretrain`` with the plugin's flags composed into its ``extra_args_provider``."""
    signature = inspect.signature(pretrain)
    if "extra_args_provider" not in signature.parameters:
        raise GranularMoEConfigError(
            "this Megatron-LM's pretrain() takes no extra_args_provider; use Megatron-LM core_v0.16.1"
        )

    @functools.wraps(pretrain)
    def pretrain_with_granular_moe(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["extra_args_provider"] = granular_moe_args_provider(bound.arguments.get("extra_args_provider"))
        return pretrain(*bound.args, **bound.kwargs)

    return pretrain_with_granular_moe


def check_checkout(checkout: Path) -> Path:
    """``checkout`` if it is a Megatron-LM tree with ``pretrain_gpt.py`` and ``gpt_builders.py`` whose
    megatron-core major.minor version is the installed one (the installed megatron-core is used)."""
    missing = [name for name in ("pretrain_gpt.py", "gpt_builders.py") if not (checkout / name).is_file()]
    if missing:
        raise GranularMoEConfigError(
            f"--megatron-lm-dir / MEGATRON_LM_DIR {checkout} is not a Megatron-LM checkout (no {', '.join(missing)}); "
            "check out core_v0.16.1"
        )
    package_info = checkout / "megatron" / "core" / "package_info.py"
    if package_info.is_file():
        from megatron.core import package_info as installed

        text = package_info.read_text()
        found = tuple(int(re.search(rf"^{name} = (\d+)", text, re.M).group(1)) for name in ("MAJOR", "MINOR"))
        if found != (int(installed.MAJOR), int(installed.MINOR)):
            raise GranularMoEConfigError(
                f"{checkout} holds megatron-core {found[0]}.{found[1]}, but {installed.__version__} is installed "
                "and is the one used: check out core_v0.16.1 or install the matching megatron-core"
            )
    return checkout


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``<checkout>/pretrain_gpt.py`` as ``__main__`` with granular MoE (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m granular_moe.megatron.megatron_lm", add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--megatron-lm-dir", type=Path, default=os.environ.get("MEGATRON_LM_DIR") or None)
    known, megatron_argv = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if known.megatron_lm_dir is None:
        raise GranularMoEConfigError("pass --megatron-lm-dir PATH (or set MEGATRON_LM_DIR): a Megatron-LM "
                                     "core_v0.16.1 checkout")
    checkout = check_checkout(known.megatron_lm_dir.resolve())
    from granular_moe.training.launch import distributed_env

    # Megatron-LM reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*: provide them under srun or mpirun too.
    distributed_env().export()
    sys.path.insert(0, str(checkout))
    training = importlib.import_module("megatron.training")
    use_granular_moe_spec(importlib.import_module("gpt_builders"))
    training.pretrain = with_granular_moe_args(training.pretrain)
    sys.argv = [str(checkout / "pretrain_gpt.py"), *megatron_argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GranularMoEConfigError as error:
        print(f"granular-moe megatron-lm: error: {error}", file=sys.stderr)
        sys.exit(2)
