"""granular-moe: fine-grained Mixture-of-Experts layers for Megatron-core and DeepSpeed."""

from granular_moe.stack import check_stack

__version__ = "0.2.0"
check_stack()

_LAZY = {
    "GranularMoELayer": "granular_moe.layer",
    "apply_granularity": "granular_moe.config",
    "granular_shape": "granular_moe.config",
    "GranularMoEConfigError": "granular_moe.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    # Lazy: `import granular_moe` (the CLI, the planner) does not pay for importing megatron-core.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'granular_moe' has no attribute {name!r}")
