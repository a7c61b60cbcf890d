"""Megatron-LM core_v0.19.0's own pretrain_gpt.py __main__ on this CPU, for the tests that run a checkout
(MEGATRON_LM_DIR): the scripts those tests run as processes import this module.

:func:`run_pretrain_gpt` runs pretrain_gpt.py patched or through the no-patch wrapper with ``pretrain``
replaced by the script's own; :func:`build_model` is what such a ``pretrain`` starts with: the model Megatron-LM's
GPTModelBuilder builds from the config pretrain_gpt.py made, in a one-process gloo group.
"""

import os
import runpy
import sys


def build_model(full_config, cpu_checkpointing: bool = False):
    """Megatron-LM's model of ``full_config``, built on the CPU. ``cpu_checkpointing``: Megatron-LM's
    checkpointing needs a GPU; it gets the CPU torch megatron-core's modules get from the shims, and reads the
    CPU generator where it reads the CUDA one (not saved: the scripts pass --no-save-rng)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    from granular_moe.megatron.cpu_shims import TorchOnCpu, apply_cpu_shims
    from granular_moe.training.distributed import distributed_env

    if cpu_checkpointing:
        from megatron.training import checkpointing

        checkpointing.torch = TorchOnCpu()
        torch.cuda.get_rng_state = torch.get_rng_state
    dist.init_process_group("gloo", init_method=distributed_env().init_method, rank=0, world_size=1)
    apply_cpu_shims()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model_config = full_config.model
    return model_config.get_builder_cls()(model_config).build_model(
        ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)


def run_pretrain_gpt(mode: str, checkout: str, first: str, flags: list, pretrain) -> None:
    """pretrain_gpt.py's __main__ with ``flags`` and ``pretrain`` in place of Megatron-LM's: ``mode``
    ``patched`` runs the patched pretrain_gpt.py in ``first`` (the checkout itself, or a folder holding a
    patched copy), ``wrapper`` runs the checkout's unpatched one through granular-moe's wrapper."""
    import megatron.training

    from granular_moe.megatron import megatron_lm

    megatron.training.pretrain = pretrain
    if mode == "patched":
        sys.path[:0] = [first, checkout]
        sys.argv = [os.path.join(first, "pretrain_gpt.py"), *flags]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        megatron_lm.main(["--megatron-lm-dir", checkout, *flags])
