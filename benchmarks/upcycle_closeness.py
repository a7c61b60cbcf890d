"""How close an upcycled granular MoE model is to the dense model it came from, at step 0.

The main job trains a small dense GPT (GELU, then SwiGLU) on the embedded corpus and saves it; for each
(base experts E, base top-k, granularity G) the MoE model is built from that checkpoint exactly as
``--moe-upcycle-from`` builds it (:func:`granular_moe.training.upcycle.upcycled_chunks`), and both models run
the same validation batches. Reported per setting: the largest absolute logit difference, relative to the
dense model's largest logit, the relative Frobenius norm of the difference, the share of positions where
the top token agrees, and the two losses. A ReLU row per setting (the same weights, ReLU experts in both
models: the case the weight scale is exact for) checks the conversion itself; its differences are float32
rounding.

Outputs under ``--out``: ``upcycle_closeness.json`` (settings, rows, provenance) and the dense checkpoints.

    python benchmarks/upcycle_closeness.py --out runs/upcycle_closeness
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from granular_moe.megatron.cpu_shims import apply_cpu_shims  # noqa: E402
from granular_moe.parallel import destroy_model_parallel  # noqa: E402
from granular_moe.training.arguments import parse_args  # noqa: E402
from granular_moe.training.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from granular_moe.training.data import build_data, eval_batches  # noqa: E402
from granular_moe.training.engine import build_engine  # noqa: E402
from granular_moe.training.model import padded_vocab_size, transformer_config_from_args  # noqa: E402
from granular_moe.training.pretrain import pretrain  # noqa: E402
from granular_moe.training.upcycle import moe_activation_scale, upcycled_chunks  # noqa: E402
from provenance import provenance  # noqa: E402

# (base experts E, base top-k, granularity G)
SETTINGS = [(4, 1, 1), (4, 2, 1), (4, 1, 2), (4, 2, 2), (4, 1, 4), (4, 2, 4), (4, 2, 8)]
ACTIVATIONS = {"gelu": [], "swiglu": ["--swiglu"]}


def model_flags(options) -> list[str]:
    return ["--num-layers", str(options.num_layers), "--hidden-size", str(options.hidden_size),
            "--num-attention-heads", "4", "--seq-length", str(options.seq_length),
            "--micro-batch-size", str(options.micro_batch_size), "--corpus-max-bytes", str(options.corpus_max_bytes),
            "--seed", str(options.seed), "--fp32"]


def job_args(flags: list[str], vocab_size: int):
    args = parse_args(flags)
    args.global_batch_size = args.micro_batch_size
    args.padded_vocab_size = padded_vocab_size(vocab_size, 1)
    return args


def with_relu(config):
    return dataclasses.replace(config, activation_func=F.relu)


@torch.no_grad()
def run(model, batches):
    """Logits and masked mean loss of each batch."""
    model.eval()
    results = []
    for batch in batches:
        seq = batch["tokens"].shape[1]
        mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
        logits = model(batch["tokens"], batch["position_ids"], mask)
        losses = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        loss = float((losses * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
        results.append((logits.float(), loss))
    return results


def compare(dense, moe) -> dict:
    difference = torch.cat([(m - d).flatten() for (d, _), (m, _) in zip(dense, moe)])
    reference = torch.cat([d.flatten() for d, _ in dense])
    agree = torch.cat([(d.argmax(-1) == m.argmax(-1)).flatten() for (d, _), (m, _) in zip(dense, moe)])
    dense_loss = sum(loss for _, loss in dense) / len(dense)
    moe_loss = sum(loss for _, loss in moe) / len(moe)
    max_abs = float(difference.abs().max())
    return {
        "max_abs_logit_diff": max_abs,
        "max_abs_logit_diff_rel": max_abs / float(reference.abs().max()),
        "rel_frobenius": float(difference.norm() / reference.norm()),
        "top1_agreement": float(agree.float().mean()),
        "dense_loss": dense_loss,
        "moe_loss": moe_loss,
        "loss_diff": moe_loss - dense_loss,
        "loss_diff_rel": (moe_loss - dense_loss) / dense_loss,
    }


def dense_model(directory: Path, flags: list[str], vocab_size: int, relu: bool):
    args = job_args(flags, vocab_size)
    config = transformer_config_from_args(args)
    engine = build_engine(args, with_relu(config) if relu else config, vocab_size)
    load_checkpoint(find_checkpoint(directory), engine, args, load_optimizer=False, load_rng=False)
    return engine.modules[0]


def measure(options) -> list[dict]:
    from megatron.core import tensor_parallel

    rows = []
    for activation, extra in ACTIVATIONS.items():
        flags = model_flags(options) + extra
        directory = options.out / f"dense_{activation}"
        destroy_model_parallel()
        record = pretrain(parse_args(flags + [
            "--train-iters", str(options.train_iters), "--log-interval", str(options.train_iters),
            "--eval-interval", str(options.train_iters), "--eval-iters", "1", "--save", str(directory),
            "--save-interval", str(options.train_iters)]))
        print(f"dense {activation}: {options.train_iters} iterations, loss {record['loss']:.3f}", flush=True)
        data = build_data(job_args(flags + ["--eval-iters", str(options.eval_batches), "--train-iters", "1"], 0), 1,
                          corpus_max_bytes=options.corpus_max_bytes)
        vocab_size = data.tokenizer.vocab_size
        batches = list(eval_batches(data.valid, options.micro_batch_size))[: options.eval_batches]
        for relu in (False, True):
            dense = run(dense_model(directory, flags, vocab_size, relu), batches)
            for experts, topk, granularity in SETTINGS:
                moe_flags = ["--num-experts", str(experts), "--moe-router-topk", str(topk), "--moe-granularity",
                             str(granularity), "--moe-upcycle-from", str(directory)]
                args = job_args(flags + moe_flags, vocab_size)
                config = transformer_config_from_args(args)
                torch.manual_seed(options.seed)
                tensor_parallel.model_parallel_cuda_manual_seed(options.seed)
                (model,) = upcycled_chunks(args, with_relu(config) if relu else config, vocab_size)
                row = {"activation": f"{activation} (relu check)" if relu else activation, "experts": experts,
                       "topk": topk, "granularity": granularity,
                       "activation_scale": moe_activation_scale(config, granularity),
                       "renormalised": config.moe_router_topk > 1, **compare(dense, run(model, batches))}
                rows.append(row)
                print(table_line(row), flush=True)
    return rows


HEADER = (f"{'activation':<20} {'E':>2} {'k':>2} {'G':>2} {'scale':>5} {'max|dlogit|':>11} {'rel':>8} "
          f"{'rel fro':>8} {'top1 agr':>8} {'dense loss':>10} {'moe loss':>9} {'dloss':>9}")


def table_line(row: dict) -> str:
    return (f"{row['activation']:<20} {row['experts']:>2} {row['topk']:>2} {row['granularity']:>2} "
            f"{row['activation_scale']:>5.1f} {row['max_abs_logit_diff']:>11.3e} {row['max_abs_logit_diff_rel']:>8.2e} "
            f"{row['rel_frobenius']:>8.2e} {row['top1_agreement']:>8.4f} {row['dense_loss']:>10.4f} "
            f"{row['moe_loss']:>9.4f} {row['loss_diff']:>+9.2e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/upcycle_closeness"))
    parser.add_argument("--train-iters", type=int, default=100, help="training iterations of the dense models")
    parser.add_argument("--eval-batches", type=int, default=4, help="validation micro-batches compared")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--corpus-max-bytes", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=1234)
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    apply_cpu_shims()
    try:
        rows = measure(options)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
    print()
    print(HEADER)
    for row in rows:
        print(table_line(row))
    result = {"settings": {key: (str(value) if isinstance(value, Path) else value)
                           for key, value in vars(options).items()},
              "rows": rows, "provenance": provenance()}
    (options.out / "upcycle_closeness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {options.out / 'upcycle_closeness.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
