"""AdamW with Megatron's weight-decay rule and learning-rate schedule."""

from __future__ import annotations

import argparse
import math

import torch


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D parameters), as in Megatron-LM."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() > 1 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
    )


def learning_rate(iteration: int, args: argparse.Namespace) -> float:
    """Megatron-LM's schedule shapes: linear warmup to ``--lr`` over ``--lr-warmup-iters``, then
    ``--lr-decay-style`` down to ``--min-lr`` at ``--lr-decay-iters``, constant after. ``iteration`` counts
    from 0 and the rate is the one after its step (``iteration + 1``): Megatron-LM evaluates it before the
    step, so its first warmup step trains at learning rate 0 and its schedule runs one step behind this."""
    step = iteration + 1
    if args.lr_warmup_iters and step <= args.lr_warmup_iters:
        return args.lr * step / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return args.lr
    span = max(args.lr_decay_iters - args.lr_warmup_iters, 1)
    progress = min(max(step - args.lr_warmup_iters, 0) / span, 1.0)
    if args.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.min_lr + (args.lr - args.min_lr) * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
