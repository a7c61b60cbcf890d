"""Fine-grained MoE for DeepSpeed users: :class:`GranularMoE`, a drop-in for ``deepspeed.moe.layer.MoE`` trained by
``deepspeed.initialize``; :func:`replace_moe_blocks` puts it in Hugging Face Qwen3-MoE, Mixtral and DeepSeek-V3
models and :func:`save_hf` writes such a model back as a Hugging Face folder; :func:`update_expert_bias` is the
aux-loss-free balancing step."""

_LAZY = {
    "GranularMoE": "granular_moe.deepspeed.layer",
    "update_expert_bias": "granular_moe.deepspeed.expert_bias",
    "replace_moe_blocks": "granular_moe.deepspeed.hf_blocks",
    "moe_aux_loss": "granular_moe.deepspeed.hf_blocks",
    "UnsupportedMoEBlockError": "granular_moe.deepspeed.hf_blocks",
    "save_hf": "granular_moe.deepspeed.hf_save",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    # Lazy: importing the package does not import DeepSpeed, megatron-core or transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'granular_moe.deepspeed' has no attribute {name!r}")
