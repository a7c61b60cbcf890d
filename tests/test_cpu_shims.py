"""The CPU shims: each needed without a GPU (megatron-core fails there without it), each inert with one."""

import importlib
import inspect
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from granular_moe.megatron.cpu_shims import CUDA_LITERAL_MODULES


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_shims_change_nothing_on_a_gpu_build():
    out = run_python(
        """
        import torch
        torch.cuda.is_available = lambda: True   # what a GPU build reports
        from megatron.core.optimizer import clip_grads, optimizer
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.tensor_parallel import random
        from granular_moe.megatron.cpu_shims import CUDA_LITERAL_MODULES, apply_cpu_shims, cpu_shims_applied
        import importlib
        def state():
            cuda = [getattr(torch.cuda, name) for name in ("current_device", "synchronize", "Stream", "Event",
                                                          "current_stream", "default_stream", "stream")]
            modules = [importlib.import_module(name).torch for name in CUDA_LITERAL_MODULES]
            readers = [DistributedOptimizer.__init__, optimizer.Float16OptimizerWithFloat16Params.__init__,
                       clip_grads.clip_grad_by_total_norm_fp32, optimizer.clip_grad_by_total_norm_fp32]
            return cuda + modules + readers + [torch.Tensor.cuda, torch.Tensor.type, random.CudaRNGStatesTracker,
                                               random._CUDA_RNG_STATE_TRACKER, random._get_cuda_rng_state,
                                               random._set_cuda_rng_state]
        before = state()
        applied = apply_cpu_shims()
        print(applied, cpu_shims_applied(), all(a is b for a, b in zip(before, state())), len(before))
        """
    )
    assert out.split()[:3] == ["False", "False", "True"]
    assert int(out.split()[3]) == 7 + len(CUDA_LITERAL_MODULES) + 4 + 6


def test_megatron_needs_the_shims_on_this_cpu():
    assert not torch.cuda.is_available()
    out = run_python(
        """
        import torch
        from megatron.core import tensor_parallel
        from megatron.core.optimizer import clip_grads
        from megatron.core.utils import GlobalMemoryBuffer
        seed = lambda: tensor_parallel.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        calls = [("buffer", lambda: GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")), ("seed", seed),
                 ("literal", lambda: clip_grads.torch.zeros(1, device="cuda")),
                 ("stream", lambda: torch.cuda.Stream()), ("synchronize", torch.cuda.synchronize),
                 ("cuda", lambda: torch.ones(1).cuda()),
                 ("checkpoint",
                  lambda: tensor_parallel.checkpoint(torch.sin, False, torch.ones(2, requires_grad=True)))]
        for label, call in calls:
            try:
                call(); print(label, "ok")
            except (AssertionError, RuntimeError):
                print(label, "fails")
        from granular_moe.megatron.cpu_shims import apply_cpu_shims
        assert apply_cpu_shims() and apply_cpu_shims()  # idempotent
        print(tuple(GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").shape))
        print(clip_grads.torch.zeros(2, device="cuda").device, clip_grads.torch.zeros(2).device)
        x = torch.ones(3)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
        print(x.cuda() is x, torch.cuda.current_device())
        tensor_parallel.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        outside = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(3)
        assert torch.equal(outside, torch.get_rng_state())   # fork restores the outer stream
        with tracker.fork():
            b = torch.rand(3)
        print("fork", bool(not torch.equal(a, b)))   # the forked stream advances
        def dropped(t):   # dropout in the tracker's stream: the backward's second run draws the same mask
            with tracker.fork():
                return torch.nn.functional.dropout(t, 0.5) * t
        x = torch.randn(64, requires_grad=True)
        out = tensor_parallel.checkpoint(dropped, False, x)
        out.sum().backward()
        mask = out.detach() != 0
        print("recompute", bool(torch.equal(x.grad, torch.where(mask, 4 * x.detach(), 0.0))))
        """
    )
    lines = out.splitlines()
    assert lines[:7] == [f"{label} fails" for label in ("buffer", "seed", "literal", "stream", "synchronize", "cuda",
                                                        "checkpoint")]
    assert lines[7:] == ["(2, 3)", "cpu cpu", "True cpu", "fork True", "recompute True"]


@pytest.mark.parametrize("module", CUDA_LITERAL_MODULES)
def test_each_module_given_a_cpu_torch_allocates_on_a_literal_cuda_device(module):
    source = inspect.getsource(importlib.import_module(module))
    assert re.search(r"""device=["']cuda["']""", source), f"{module} no longer allocates on device='cuda'"


def test_optimizers_see_cuda_type_names_only_while_they_check_them():
    out = run_python(
        """
        import torch
        from megatron.core.optimizer import clip_grads
        from granular_moe.megatron.cpu_shims import apply_cpu_shims
        params = [torch.nn.Parameter(torch.ones(4))]
        params[0].grad = torch.full((4,), 2.0)
        try:
            clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0); print("fails not")
        except AssertionError:
            print("clip fails")
        apply_cpu_shims()
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
        print(params[0].grad.tolist(), params[0].type(), torch.ones(1).type(torch.float64).dtype)
        """
    )
    lines = out.splitlines()
    assert lines[0] == "clip fails"
    grads, type_name, converted = lines[1].rsplit(" ", 2)
    assert eval(grads) == pytest.approx([2.0 / (4.0 + 1e-6)] * 4)  # clipped as megatron-core clips
    assert (type_name, converted) == ("torch.FloatTensor", "torch.float64")  # restored after the call


def test_rotary_embeddings_stay_on_the_cpu():
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
        emb = rope.get_emb(4)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        expected = torch.outer(torch.arange(4, dtype=torch.float32), inv_freq)
        print(list(emb.shape), emb.device.type, rope.inv_freq.device.type, torch.allclose(emb[:, 0, 0, :4], expected))
        """
    )
    assert out.splitlines() == ["fails", "[4, 1, 1, 8] cpu cpu True"]
