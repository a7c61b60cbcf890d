"""The CPU shims: needed without a GPU, inert with one."""

import subprocess
import sys
import textwrap

import torch


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_shims_change_nothing_on_a_gpu_build():
    out = run_python(
        """
        import torch
        torch.cuda.is_available = lambda: True   # what a GPU build reports
        from megatron.core import utils
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.models.common.language_module.language_module import LanguageModule
        from megatron.core.tensor_parallel import layers, mappings, random
        def megatron_state():
            return (utils.GlobalMemoryBuffer.get_tensor, random.CudaRNGStatesTracker,
                    random._CUDA_RNG_STATE_TRACKER, LanguageModule.setup_embeddings_and_output_layer, torch.Tensor.cuda,
                    RotaryEmbedding.get_emb, torch.cuda.current_device, mappings._gather_along_first_dim,
                    mappings._gather_along_last_dim, mappings._reduce_scatter_along_first_dim,
                    layers.LinearWithGradAccumulationAndAsyncCommunication.backward)
        before = megatron_state()
        from granular_moe.megatron.cpu_shims import apply_cpu_shims, cpu_shims_applied
        applied = apply_cpu_shims()
        print(applied, cpu_shims_applied(), all(a is b for a, b in zip(before, megatron_state())))
        """
    )
    assert out.split() == ["False", "False", "True"]


def test_megatron_needs_the_shims_on_this_cpu():
    assert not torch.cuda.is_available()
    out = run_python(
        """
        import torch
        from megatron.core import tensor_parallel
        from megatron.core.utils import GlobalMemoryBuffer
        seed = lambda: tensor_parallel.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        for label, call in [("buffer", lambda: GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")),
                            ("seed", seed)]:
            try:
                call(); print(label, "ok")
            except (AssertionError, RuntimeError):
                print(label, "fails")
        from granular_moe.megatron.cpu_shims import apply_cpu_shims
        assert apply_cpu_shims()
        print(tuple(GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").shape))
        tensor_parallel.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        outside = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(3)
        assert torch.equal(outside, torch.get_rng_state())   # fork restores the outer stream
        with tracker.fork():
            b = torch.rand(3)
        print("fork", bool(not torch.equal(a, b)))   # the forked stream advances
        """
    )
    assert out.split("\n")[:4] == ["buffer fails", "seed fails", "(2, 3)", "fork True"]


def test_rotary_embeddings_need_the_shim_and_stay_on_the_cpu():
    out = run_python(
        """
        import torch
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
        try:
            rope.get_emb(4); print("ok")
        except (AssertionError, RuntimeError):
            print("fails")
        from granular_moe.megatron.cpu_shims import apply_cpu_shims
        assert apply_cpu_shims()
        current_device = torch.cuda.current_device
        emb = rope.get_emb(4)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        expected = torch.outer(torch.arange(4, dtype=torch.float32), inv_freq)
        print(list(emb.shape), emb.device.type, rope.inv_freq.device.type,
              torch.allclose(emb[:, 0, 0, :4], expected), torch.cuda.current_device is current_device)
        """
    )
    assert out.splitlines() == ["fails", "[4, 1, 1, 8] cpu cpu True True"]
