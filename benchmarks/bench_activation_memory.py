"""Activation memory of one MoE layer per granularity G: bytes kept for the backward per token.

For G in 1, 2, 4, ..., 64 (a base MoE of E experts of width d_ff, top-k, made fine-grained: E*G experts of
width d_ff/G, top-k*G; SwiGLU experts by default), one process, one forward of the layer on T tokens:

* ``ours`` (torch kernels), and with megatron-core's selective recompute ``+moe_act`` and ``+moe``;
* ``ours_triton``: the Triton kernels (on a GPU at the main shapes; on a CPU under ``TRITON_INTERPRET=1`` at
  the small ``--triton-*`` shapes, G up to 16, where the interpreter finishes in minutes);
* ``megatron``: megatron-core's ``MoELayer`` with its alltoall dispatcher and local ``SequentialMLP`` (and
  ``megatron_te``, its ``TEGroupedMLP``, where Transformer Engine imports);
* ``dense``: megatron-core's ``MLP`` of the same active width (k * d_ff).

Bytes kept for the backward: every tensor autograd saves during the forward
(``torch.autograd.graph.saved_tensors_hooks``), each storage once, the parameters and the layer's input left
out (:class:`granular_moe.memory.SavedForBackward`). On a GPU also ``torch.cuda.max_memory_allocated`` above
what parameters and input hold, around forward + backward. Every layer has the same balance loss (aux 1e-2).
fp32 and bf16 (bf16 parameters, as under megatron-core's Float16Module; the router stays fp32).

    python benchmarks/bench_activation_memory.py --out benchmarks/results        # d 1024, d_ff 4096, T 256
    python benchmarks/bench_activation_memory.py --tiny --out /tmp/memory         # seconds

Prints the tables and writes ``activation_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from granular_moe.memory import SavedForBackward  # noqa: E402
from provenance import provenance  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULTS = dict(d_model=1024, d_ff=4096, experts=8, topk=2, tokens=256, gs="1,2,4,8,16,32,64", dtypes="fp32,bf16",
                triton_d_model=128, triton_d_ff=512, triton_tokens=32, triton_gs="1,2,4,8,16")
TINY = dict(d_model=64, d_ff=512, experts=4, topk=2, tokens=32, gs="1,4,16", dtypes="fp32",
            triton_d_model=32, triton_d_ff=128, triton_tokens=8, triton_gs="1,4")
COLUMNS = ("ours", "ours+moe_act", "ours+moe", "ours_triton", "megatron", "megatron_te", "dense")


def start_world() -> None:
    """A one-process gloo world with megatron-core's parallel state (its layers need it) and the CPU shims."""
    from megatron.core import parallel_state, tensor_parallel

    from granular_moe.megatron.cpu_shims import apply_cpu_shims

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if ON_CUDA else "gloo", rank=0, world_size=1)
    apply_cpu_shims()
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def transformer_config(shape: dict, granularity: int, dtype: torch.dtype, **extra):
    """The base MoE (or, with ``ffn`` only, the dense MLP) of ``shape`` made fine-grained by ``granularity``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from granular_moe.config import apply_granularity

    moe = dict(num_moe_experts=shape["experts"], moe_router_topk=shape["topk"], moe_aux_loss_coeff=1e-2,
               moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32")
    config = TransformerConfig(
        num_layers=1, hidden_size=shape["d_model"], num_attention_heads=8, ffn_hidden_size=shape["d_ff"],
        add_bias_linear=False, gated_linear_unit=shape["gated"], activation_func=F.silu if shape["gated"] else F.gelu,
        use_cpu_initialization=not ON_CUDA, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0, **(moe if granularity else {}), **extra)
    return apply_granularity(config, granularity) if granularity else config


def build(column: str, shape: dict, granularity: int, dtype: torch.dtype):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from granular_moe import GranularMoELayer

    device = "cuda" if ON_CUDA else "cpu"
    if column.startswith("ours"):
        extra = {}
        if "+" in column:
            extra = dict(recompute_granularity="selective", recompute_modules=[column.split("+")[1]],
                         moe_grouped_gemm=True)
        kernels = "triton" if column == "ours_triton" else "torch"
        return GranularMoELayer(transformer_config(shape, granularity, dtype, **extra), layer_number=1,
                                kernels=kernels).to(device)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    if column == "dense":
        from megatron.core.models.backends import LocalSpecProvider
        from megatron.core.transformer.mlp import MLP, MLPSubmodules

        local = LocalSpecProvider()
        config = transformer_config(dict(shape, d_ff=shape["topk"] * shape["d_ff"]), 0, dtype)
        submodules = MLPSubmodules(linear_fc1=local.column_parallel_linear(), linear_fc2=local.row_parallel_linear())
        return MLP(config, submodules, tp_group=groups.tp).to(device)
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    config = transformer_config(shape, granularity, dtype, moe_grouped_gemm=column == "megatron_te")
    if column == "megatron_te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        from megatron.core.models.backends import LocalSpecProvider

        backend = LocalSpecProvider()
    builder = get_moe_module_spec_for_backend(backend, num_experts=config.num_moe_experts,
                                              moe_grouped_gemm=column == "megatron_te")
    return builder(config=config, layer_number=1, pg_collection=groups).to(device)


def measure(column: str, shape: dict, granularity: int, dtype: torch.dtype) -> dict:
    """Bytes kept for the backward per token (and on a GPU the peak above parameters and input), the largest
    kept tensors, and the forward + backward time."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    torch.manual_seed(0)
    layer = build(column, shape, granularity, dtype)
    layer.train()
    tokens = shape["tokens"]
    x = torch.randn(tokens, 1, shape["d_model"], dtype=dtype, device="cuda" if ON_CUDA else "cpu",
                    requires_grad=True)
    clear_aux_losses_tracker()
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with SavedForBackward(exclude=[x, *layer.parameters()]) as saved:
        out, _ = layer(x)
    out.float().square().sum().backward()
    if ON_CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"column": column, "dtype": str(dtype).removeprefix("torch."), "G": granularity, **shape,
           "bytes_per_token": saved.nbytes / tokens, "seconds": seconds,
           "kept": [[list(t.shape), str(t.dtype).removeprefix("torch."), t.nbytes / tokens] for t in saved.tensors[:8]]}
    if ON_CUDA:
        row["cuda_peak_bytes_per_token"] = (torch.cuda.max_memory_allocated() - before) / tokens
    return row


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return ON_CUDA


def run(args) -> list:
    rows = []
    shape = dict(d_model=args.d_model, d_ff=args.d_ff, experts=args.experts, topk=args.topk, tokens=args.tokens,
                 gated=not args.no_gated)
    columns = [c for c in COLUMNS if c != "megatron_te" or transformer_engine_available()]
    for dtype_name in args.dtypes.split(","):
        for g in (int(g) for g in args.gs.split(",")):
            for column in columns:
                if column == "ours_triton" and not ON_CUDA:
                    continue  # the interpreter runs the small shapes below
                if column == "dense" and g != 1:
                    continue
                rows.append(measure(column, shape, g, DTYPES[dtype_name]))
                print(f"  {dtype_name} G={g} {column}: {rows[-1]['bytes_per_token']:,.0f} B/token", flush=True)
    if not ON_CUDA and args.triton_gs:
        small = dict(shape, d_model=args.triton_d_model, d_ff=args.triton_d_ff, tokens=args.triton_tokens)
        for g in (int(g) for g in args.triton_gs.split(",")):
            for column in ("ours", "ours_triton", "megatron"):
                rows.append(measure(column, small, g, torch.float32) | {"small": True})
                print(f"  small fp32 G={g} {column}: {rows[-1]['bytes_per_token']:,.0f} B/token", flush=True)
    return rows


def table(rows: list, small: bool, dtype: str) -> list[str]:
    chosen = [r for r in rows if r.get("small", False) == small and r["dtype"] == dtype]
    if not chosen:
        return []
    present = [c for c in COLUMNS if any(r["column"] == c for r in chosen)]
    by = {(r["column"], r["G"]): r for r in chosen}
    first = chosen[0]
    lines = [f"{dtype}, d_model {first['d_model']}, d_ff {first['d_ff']}, E {first['experts']} top-{first['topk']} "
             f"before G, {'SwiGLU' if first['gated'] else 'GELU'}, {first['tokens']} tokens: bytes kept per token",
             "| G | " + " | ".join(present) + " | ours / megatron | ours / ours at G 1 |",
             "|---" * (len(present) + 3) + "|"]
    gs = sorted({r["G"] for r in chosen})
    base = by.get(("ours", gs[0]))
    for g in gs:
        cells = [f"{by[(c, g)]['bytes_per_token']:,.0f}" if (c, g) in by else "" for c in present]
        ours, megatron = by.get(("ours", g)), by.get(("megatron", g))
        ratio = f"{ours['bytes_per_token'] / megatron['bytes_per_token']:.2f}" if ours and megatron else ""
        growth = f"{ours['bytes_per_token'] / base['bytes_per_token']:.3f}" if ours and base else ""
        lines.append(f"| {g} | " + " | ".join(cells) + f" | {ratio} | {growth} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in DEFAULTS:
        parser.add_argument("--" + name.replace("_", "-"), type=type(DEFAULTS[name]), default=None)
    parser.add_argument("--no-gated", action="store_true", help="GELU experts instead of SwiGLU")
    parser.add_argument("--tiny", action="store_true", help="small shapes that run in seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for activation_memory.json")
    args = parser.parse_args(argv)
    for name, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    start_world()
    rows = run(args)
    for small in (False, True):
        for dtype in ("float32", "bfloat16"):
            lines = table(rows, small, dtype)
            if lines:
                print("\n" + "\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "activation_memory.json").write_text(json.dumps({"info": provenance(), "rows": rows}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
