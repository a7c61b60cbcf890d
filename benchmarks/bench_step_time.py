"""Step time of a megatron-core GPT with granular MoE (or of the MoE layer alone) for G = 1, 2, 4, ..., 64.

Writes the step-time JSON that ``granular-moe plan --gpu-hours H --throughput-file FILE`` reads::

    python benchmarks/bench_step_time.py --output step_times.json                # GPU: the paper's 64x25M model
    python benchmarks/bench_step_time.py --device cpu --granularities 1,2,4      # CPU: tiny sizes

A step is forward + backward of the language-model loss (``--optimizer``: plus an AdamW step) on random
tokens. Sizes are Megatron-LM's flags with base MoE values (``--num-experts E --moe-router-topk k``);
``--moe-granularity G`` makes them fine-grained exactly as in the main job. Defaults: on a GPU the paper's
"64 x 25M" model (d_model 512, 8 layers, 8 heads, E = 64, top-1; Krajewski et al. 2024, Table 3) in bf16 with
2048-token sequences; on a CPU a tiny fp32 model. One process, one device (``world_size`` 1 in the file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from provenance import provenance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {
    "cuda": dict(hidden_size=512, num_layers=8, num_attention_heads=8, ffn_hidden_size=2048, num_experts=64,
                 moe_router_topk=1, seq_length=2048, micro_batch_size=8, vocab_size=50304, dtype="bf16",
                 granularities="1,2,4,8,16,32,64"),
    "cpu": dict(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=256, num_experts=16,
                moe_router_topk=1, seq_length=64, micro_batch_size=2, vocab_size=512, dtype="fp32",
                granularities="1,2,4,8"),
}


def granularity_list(text: str) -> list[int]:
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--target", choices=("gpt", "layer"), default="gpt",
                        help="gpt: the whole model (what the wall-clock planner needs); layer: the MoE layer alone")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--granularities", type=granularity_list,
                        help="comma-separated G (default: 1..64 on a GPU, 1..8 on a CPU)")
    for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "num_experts",
                 "moe_router_topk", "seq_length", "micro_batch_size", "vocab_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help="default: by device (see the module doc)")
    parser.add_argument("--swiglu", action="store_true")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--moe-router-type", choices=("token_choice", "expert_choice"), default="token_choice")
    parser.add_argument("--moe-kernels", choices=("auto", "torch"), default="auto")
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step in each timed step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", type=Path, default=Path("step_times.json"))
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if isinstance(args.granularities, str):
        args.granularities = granularity_list(args.granularities)
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("--iters must be >= 1 and --warmup >= 0")
    return args


def init_distributed(device: str) -> None:
    """One-rank process group and megatron-core parallel state (kept if the caller already set them up)."""
    from megatron.core import parallel_state, tensor_parallel

    from granular_moe.megatron.cpu_shims import apply_cpu_shims

    if device == "cuda":
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    apply_cpu_shims()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def transformer_config(args: argparse.Namespace, granularity: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from granular_moe import apply_granularity

    dtype = DTYPES[args.dtype]
    base = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_topk == 1,  # Megatron checks the base top-k; ours ignores it
        gated_linear_unit=args.swiglu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=args.device == "cpu",
    )
    return apply_granularity(base, granularity)


def build_step(args: argparse.Namespace, granularity: int):
    """A zero-argument function running one training step, and the model it trains."""
    from megatron.core.models.gpt import GPTModel

    from granular_moe import GranularMoELayer
    from granular_moe.megatron import get_gpt_decoder_block_spec

    config = transformer_config(args, granularity)
    device = torch.device(args.device)
    batch, seq = args.micro_batch_size, args.seq_length
    generator = torch.Generator().manual_seed(args.seed)
    if args.target == "gpt":
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, router_type=args.moe_router_type,
                                          kernels=args.moe_kernels)
        model = GPTModel(config, spec, args.vocab_size, seq).to(device)
        tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=generator).to(device)
        positions = torch.arange(seq, device=device).expand(batch, seq)
        causal = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(1)

        def loss_fn():
            return model(tokens[:, :-1], positions, causal, labels=tokens[:, 1:]).float().mean()
    else:
        model = GranularMoELayer(config, router_type=args.moe_router_type, kernels=args.moe_kernels).to(device)
        hidden = torch.randn(seq, batch, args.hidden_size, generator=generator).to(device, DTYPES[args.dtype])

        def loss_fn():
            return model(hidden)[0].float().square().mean()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if args.optimizer else None

    def step():
        loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step, model


def time_steps(step, args: argparse.Namespace) -> list[float]:
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def parameter_counts(args: argparse.Namespace, granularity: int) -> dict:
    from granular_moe.scaling.params import ModelShape, count_parameters

    counts = count_parameters(ModelShape(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size, num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk, moe_granularity=granularity, swiglu=args.swiglu,
        max_position_embeddings=args.seq_length,
    ))
    return {"total": counts.total, "active": counts.active, "law": counts.law, "router": counts.router}


def main(argv: list[str] | None = None) -> dict:
    args = resolve_args(build_parser().parse_args(argv))
    import megatron.core

    from granular_moe.config import GranularMoEConfigError
    from granular_moe.scaling.wallclock import STEP_TIME_FORMAT

    init_distributed(args.device)
    measurements = []
    tokens_per_step = args.micro_batch_size * args.seq_length
    try:  # every G's configuration before any timing
        for granularity in args.granularities:
            transformer_config(args, granularity)
    except GranularMoEConfigError as error:
        raise SystemExit(f"bench_step_time: error: {error}") from None
    for granularity in args.granularities:
        torch.manual_seed(args.seed)
        step, model = build_step(args, granularity)
        times = time_steps(step, args)
        median = statistics.median(times)
        measurements.append({
            "granularity": granularity,
            "step_time_s": median,
            "step_times_s": times,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / median,
            "params": parameter_counts(args, granularity),
        })
        print(f"G={granularity:>3}  step {median * 1e3:9.2f} ms  {tokens_per_step / median:12.1f} tokens/s", flush=True)
        del step, model
    result = {
        "format": STEP_TIME_FORMAT,
        "target": args.target,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": provenance(),
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "world_size": 1,
        "dtype": args.dtype,
        "step": "forward+backward" + ("+adamw" if args.optimizer else ""),
        "warmup": args.warmup,
        "iters": args.iters,
        "model": {
            "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads, "ffn_hidden_size": args.ffn_hidden_size,
            "num_experts": args.num_experts, "moe_router_topk": args.moe_router_topk,
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
            "vocab_size": args.vocab_size, "swiglu": args.swiglu,
            "moe_router_type": args.moe_router_type, "moe_kernels": args.moe_kernels,
        },
        "measurements": measurements,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
