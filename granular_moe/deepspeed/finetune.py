"""Fine-tune a Hugging Face MoE model (Qwen3-MoE, Mixtral, DeepSeek-V3) with DeepSpeed ZeRO and expert parallelism,
its MoE blocks replaced by GranularMoE (:func:`~granular_moe.deepspeed.replace_moe_blocks`), and save the result as a
Hugging Face folder again (:func:`~granular_moe.deepspeed.save_hf`). One process per rank, under torchrun::

    bash launch_scripts/deepspeed_finetune_hf_moe.sh [--nproc-per-node N] [flags below]
    torchrun --nproc-per-node N -m granular_moe.deepspeed.finetune [flags below]

Without ``--model`` a tiny randomly initialised model of ``--arch`` (byte-level, 256 tokens) is built; with
``--model DIR`` the model and its tokenizer are loaded from ``DIR`` (``from_pretrained``, no download). The text is
``--data FILE`` or, by default, some of the Python standard library's source. Each rank reads its own random windows;
the loss printed is the global batch's mean. ``--zero-stage 3`` is refused: DeepSpeed does not run its MoE layers
(GranularMoE is one) at ZeRO 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from granular_moe.parallel_layout import divisors

ARCHITECTURES = ("qwen3_moe", "mixtral", "deepseek_v3")
ZERO_STAGES = (0, 1, 2)
BYTE_VOCAB = 256


class FinetuneError(ValueError):
    """A flag value the fine-tuning cannot run with; the message names the flag and the valid values."""


def tiny_model(arch: str, vocab_size: int = BYTE_VOCAB, seed: int = 0):
    """A tiny randomly initialised ``transformers`` model of ``arch`` (2 layers, hidden 64, 8 experts of 64, top-2;
    DeepSeek-V3: a dense first layer, 2 expert groups, a shared expert)."""
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64,
                                                  num_key_value_heads=2, head_dim=16, num_experts=8,
                                                  norm_topk_prob=True, router_aux_loss_coef=0.01))
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, intermediate_size=64, num_key_value_heads=2, head_dim=16,
                                                num_local_experts=8, router_aux_loss_coef=0.01))
    if arch == "deepseek_v3":
        return DeepseekV3ForCausalLM(DeepseekV3Config(
            **common, intermediate_size=128, moe_intermediate_size=64, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
            q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    raise FinetuneError(f"--arch {arch!r} is not valid; valid values: {', '.join(ARCHITECTURES)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m granular_moe.deepspeed.finetune",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder (default: a tiny random --arch model)")
    parser.add_argument("--arch", default="qwen3_moe",
                        help=f"the tiny model's architecture: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--data", type=Path, help="a text file (default: Python standard-library source)")
    parser.add_argument("--output", type=Path, default=Path("runs/deepspeed_finetune/hf"),
                        help="where the fine-tuned Hugging Face folder goes")
    parser.add_argument("--granularity", type=int, default=2, help="cut every expert into G (default 2)")
    parser.add_argument("--ep-size", type=int, help="expert-parallel ranks (default: all)")
    parser.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage: 0, 1 or 2 (default 2)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-loss-coeff", type=float,
                        help="times the MoE layers' l_aux in the loss (default: the config's router_aux_loss_coef, "
                             "else 0)")
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed's bf16 mode")
    parser.add_argument("--kernels", default="auto", help="auto (Triton on CUDA, else torch) or torch")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def check_flags(args, world_size: int) -> None:
    """Refuse flag values the run cannot use, each by its flag, before anything is built."""
    if args.zero_stage not in ZERO_STAGES:
        raise FinetuneError(f"--zero-stage {args.zero_stage} is not valid; valid values: 0, 1, 2 (DeepSpeed does not "
                            f"run its MoE layers, which GranularMoE is, at ZeRO 3)")
    if args.model is None and args.arch not in ARCHITECTURES:
        raise FinetuneError(f"--arch {args.arch!r} is not valid; valid values: {', '.join(ARCHITECTURES)}")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise FinetuneError(f"--model {args.model}: no config.json there (a Hugging Face model folder is needed)")
    if args.data is not None and not args.data.is_file():
        raise FinetuneError(f"--data {args.data}: no such file")
    for flag in ("steps", "micro_batch_size", "gradient_accumulation_steps", "seq_length", "granularity"):
        if getattr(args, flag) < 1:
            raise FinetuneError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ep_size is not None and (args.ep_size < 1 or world_size % args.ep_size):
        raise FinetuneError(f"--ep-size {args.ep_size} does not divide the {world_size} processes; valid values: "
                            f"{divisors(world_size)}")


def load_tokens(args, tokenizer) -> torch.Tensor:
    """The text as token ids (bytes without a tokenizer)."""
    if args.data is not None:
        text = args.data.read_text(encoding="utf-8", errors="replace")
    else:
        from granular_moe.training.corpus import select_stdlib_documents

        text = "\n".join(document for _, document in select_stdlib_documents(max_bytes=2_000_000))
    if tokenizer is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def batches(tokens: torch.Tensor, args, rank: int, step: int, micro: int) -> torch.Tensor:
    """This rank's micro-batch ``micro`` of step ``step``: random windows of ``--seq-length`` tokens."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 10_007 + micro * 101 + rank)
    starts = torch.randint(0, tokens.numel() - args.seq_length, (args.micro_batch_size,), generator=generator)
    return torch.stack([tokens[s: s + args.seq_length] for s in starts.tolist()])


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = _world()
    try:
        check_flags(args, world_size)
    except FinetuneError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    return run(args, rank, world_size)


def run(args, rank: int, world_size: int) -> int:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from tqdm import tqdm

    from granular_moe.config import GranularMoEConfigError
    from granular_moe.deepspeed import moe_aux_loss, replace_moe_blocks, save_hf, update_expert_bias
    from granular_moe.deepspeed.groups import ensure_deepspeed_comm

    ensure_deepspeed_comm()
    tokenizer = None
    if args.model is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(args.model),
                                                     dtype=torch.bfloat16 if args.bf16 else torch.float32)
        if any((args.model / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    else:
        model = tiny_model(args.arch, seed=args.seed)
    ep_size = args.ep_size or world_size
    try:
        replace_moe_blocks(model, ep_size=ep_size, granularity=args.granularity, kernels=args.kernels)
    except GranularMoEConfigError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    coefficient = args.aux_loss_coeff
    if coefficient is None:
        coefficient = getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0
    tokens = load_tokens(args, tokenizer)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.zero_stage}, "steps_per_print": 10 ** 9}
    if args.bf16:
        config["bf16"] = {"enabled": True}
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if rank == 0:
        experts = [m for m in model.modules() if hasattr(m, "deepspeed_moe")]
        print(f"{type(model).__name__}: {len(experts)} MoE blocks -> GranularMoE, {experts[0].num_experts} experts "
              f"(granularity {args.granularity}), top-{experts[0].topk}, EP {ep_size} x expert-DP "
              f"{world_size // ep_size}, ZeRO {args.zero_stage}{', bf16' if args.bf16 else ''}", flush=True)
    progress = tqdm(range(args.steps), disable=rank != 0, desc="fine-tuning", file=sys.stdout)
    started, device = time.time(), engine.device
    for step in progress:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(args.gradient_accumulation_steps):
            ids = batches(tokens, args, rank, step, micro).to(device)
            output = engine(input_ids=ids, labels=ids)
            loss = output.loss + coefficient * moe_aux_loss(engine.module)
            engine.backward(loss)
            total += output.loss.detach().double()
            if engine.is_gradient_accumulation_boundary():
                update_expert_bias(engine)
            engine.step()
        dist.all_reduce(total)
        mean = total.item() / (world_size * args.gradient_accumulation_steps)
        progress.set_postfix(loss=f"{mean:.4f}")
        if rank == 0 and (step == 0 or (step + 1) % max(1, args.steps // 10) == 0):
            progress.write(f"step {step + 1}/{args.steps} loss {mean:.4f}")
    saved = save_hf(engine.module, args.output)
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(args.output))
        print(f"saved the fine-tuned model as a Hugging Face folder: {saved} ({time.time() - started:.1f} s of "
              f"training)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
