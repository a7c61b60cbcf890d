"""Compile every Triton kernel of the expert block for an H100/H200 (sm_90) without a GPU, at the README's
shapes with the tile table's choices, and report what each kernel takes: shared memory, registers and
register spills. Exits 1 when a kernel fails to compile, spills, or asks for more shared memory than an
sm_90 block gets.

    python benchmarks/kernel_resources.py [--gs 1,4,16,64,256] [--out DIR]

The expert block runs on CPU tensors with every kernel launch replaced by Triton's own launch-time
specialisation (argument alignment, integers equal to 1 or divisible by 16) and compilation for the
target, through Triton's bundled ptxas; no kernel runs. The index tensors come from the reference
routing, so the host code between launches sees valid metadata. Tile choices depend on the token count
only through rows per expert, which the table caps at 128, so the default 1,024 tokens compile the same
kernels as 16,384 (the printed tiles show it). Needs Triton with its NVIDIA backend; must run
without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources compiles the kernels: run it without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench_expert_block import add_shape_arguments, fill_shape_defaults  # noqa: E402
from granular_moe.dispatch import expert_order  # noqa: E402
from granular_moe.ops import reference  # noqa: E402
from granular_moe.ops.triton import grouped_gemm, movement, routing  # noqa: E402
from provenance import provenance  # noqa: E402

# H100 / H200: compute capability 9.0, 32-thread warps; 227 KiB of shared memory per block (opt-in).
TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024
DEFAULT_SHAPES = dict(tokens=1024, d_model=2048, d_ff=8192, experts=8, topk=1, gs="1,4,16,64,256")
TINY_SHAPES = dict(tokens=64, d_model=64, d_ff=256, experts=4, topk=1, gs="1,4")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPILOGUES = {str(grouped_gemm.ACTIVATE): "activate", str(grouped_gemm.STORE): "store",
             str(grouped_gemm.ACTIVATION_GRAD): "activation_grad"}


class OfflineDriver:
    """The part of Triton's driver that compilation asks for: a device id, a stream and the target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


@contextlib.contextmanager
def compile_only(compiled: list):
    """Every ``kernel[grid](...)`` compiles for :data:`TARGET` instead of launching; the kernels and their
    compile-time arguments are appended to ``compiled``."""
    launch, driver = JITFunction.run, triton.runtime.driver
    previous = driver._active  # None unless a driver was used: reset_active() would look for a GPU

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        constants = {k: EPILOGUES.get(str(v), v) for k, v in kwargs.items() if k.isupper()}
        constants |= {"num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages}
        compiled.append((self.fn.__name__, constants, kernel))
        return kernel

    driver.set_active(OfflineDriver())
    JITFunction.run = compile_instead
    try:
        yield
    finally:
        JITFunction.run = launch
        driver._active = previous


def resources(kernel) -> dict:
    """Shared memory from Triton's metadata; registers and spill bytes from ptxas -v on the kernel's PTX,
    with the options Triton's own ptxas call uses; whether its dots became Hopper wgmma and its loads
    asynchronous copies (software pipelining)."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        command = [get_ptxas(TARGET.arch).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(ptx),
                   "-o", str(Path(folder) / "kernel.cubin")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    ttgir = kernel.asm["ttgir"]
    return {"shared_bytes": kernel.metadata.shared, "registers": registers, "spill_bytes": spills,
            "wgmma": "warp_group_dot" in ttgir, "async_copy": "async_copy_global_to_local" in ttgir}


def expert_block_launches(tokens, d_model, d_expert, experts, topk, gated, dtype) -> list:
    """Compile the block's forward and backward: routing metadata, gathered grouped MLP, combine."""
    generator = torch.Generator().manual_seed(0)
    expert_index = torch.rand(tokens, experts, generator=generator).topk(topk, dim=1).indices.reshape(-1)
    token_offsets = torch.arange(0, tokens * topk + 1, topk)
    plan = reference.dispatch_plan(expert_index, token_offsets, experts)
    x = torch.zeros(tokens, d_model, dtype=dtype, requires_grad=True)
    weight1 = torch.zeros(experts, d_model, d_expert * (2 if gated else 1), dtype=dtype, requires_grad=True)
    weight2 = torch.zeros(experts, d_expert, d_model, dtype=dtype, requires_grad=True)
    gates = torch.zeros(tokens * topk, requires_grad=True)
    compiled = []
    with compile_only(compiled):
        routing.dispatch_plan(expert_index, token_offsets, experts)
        # as the layer runs it: the gates scale the activations, the combine is a plain sum
        rows = grouped_gemm.grouped_mlp(
            x, plan.tokens_per_expert, weight1, weight2, "silu" if gated else "gelu", gated, plan.source_token,
            expert_order(gates, plan.row_of_assignment),
        )
        out = movement.combine(rows, None, plan.row_of_assignment, token_offsets)
        out.backward(torch.zeros_like(out))
        # the other variants: a weighted combine, an ungated expert block, the permute
        weighted = movement.combine(rows.detach().requires_grad_(), gates, plan.row_of_assignment, token_offsets)
        weighted.backward(torch.zeros_like(weighted))
        plain = grouped_gemm.grouped_mlp(
            x, plan.tokens_per_expert, weight1, weight2, "silu" if gated else "gelu", gated, plan.source_token
        )
        plain.backward(torch.zeros_like(plain))
        movement.permute(x.detach().requires_grad_(), plan.source_token).backward(torch.zeros(rows.shape, dtype=dtype))
    return compiled


def check(args) -> list:
    rows = []
    base_hidden = args.d_ff
    for dtype_name in args.dtypes.split(","):
        for g in (int(g) for g in args.gs.split(",")):
            for gated in (False, True):
                shape = dict(tokens=args.tokens, d_model=args.d_model, d_expert=base_hidden // g,
                             experts=args.experts * g, topk=args.topk * g, gated=gated)
                try:
                    launches = expert_block_launches(**shape, dtype=DTYPES[dtype_name])
                except Exception as error:  # a kernel that does not compile is a finding, reported per shape
                    rows.append({"dtype": dtype_name, "G": g, **shape, "kernel": "-", "error": repr(error)[:500],
                                 "passed": False})
                    continue
                seen = set()
                for name, constants, kernel in launches:
                    if kernel.hash in seen:  # the same binary (same constants, strides and alignments)
                        continue
                    seen.add(kernel.hash)
                    usage = resources(kernel)
                    passed = usage["spill_bytes"] == 0 and usage["shared_bytes"] <= SHARED_MEMORY_LIMIT
                    rows.append({"dtype": dtype_name, "G": g, **shape, "kernel": name,
                                 "constants": {k: str(v) for k, v in constants.items()}, **usage, "passed": passed})
    return rows


def tile_label(constants: dict) -> str:
    sizes = [constants[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_ROWS", "BLOCK_H", "BLOCK")
             if k in constants]
    epilogue = f" {constants['EPILOGUE']}" if "EPILOGUE" in constants else ""
    if str(constants.get("HAS_PROBS")) == "True":  # the gates scale the activation (and get their gradient)
        epilogue += " +gates"
    return "x".join(sizes) + f" w{constants['num_warps']} s{constants['num_stages']}{epilogue}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--dtypes", default="bf16", help=f"comma separated, of {', '.join(DTYPES)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for kernel_resources.json")
    args = parser.parse_args(argv)
    fill_shape_defaults(args, DEFAULT_SHAPES, TINY_SHAPES)
    rows = check(args)
    print(f"Triton {triton.__version__} kernels compiled for sm_90 (H100/H200), shared memory limit "
          f"{SHARED_MEMORY_LIMIT // 1024} KiB; tokens {args.tokens}, d_model {args.d_model}, d_ff {args.d_ff}, "
          f"E={args.experts} top-{args.topk} before G")
    print("| dtype | G | d_expert | gated | kernel | tiles | shared KiB | registers | spill bytes | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['dtype']} | {r['G']} | {r['d_expert']} | {r['gated']} | compile error: {r['error']} |")
            continue
        print(f"| {r['dtype']} | {r['G']} | {r['d_expert']} | {r['gated']} | {r['kernel']} | "
              f"{tile_label(r['constants'])} | {r['shared_bytes'] / 1024:.1f} | {r['registers']} | "
              f"{r['spill_bytes']} | {'yes' if r['passed'] else 'NO'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = provenance() | {"target": "sm_90", "triton": triton.__version__, "shared_memory_limit": SHARED_MEMORY_LIMIT,
                           **{k: getattr(args, k) for k in ("tokens", "d_model", "d_ff", "experts", "topk", "gs")}}
    (out / "kernel_resources.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    failed = [r for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} kernel configurations compile without spills within the limit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
