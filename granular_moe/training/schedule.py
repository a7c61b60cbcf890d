"""Forward and backward over a step's micro-batches on this rank's pipeline stage.

Pipeline schedule: all forwards, then all backwards in reverse order (GPipe), with activations and their
gradients passed between neighbouring stages by point-to-point sends. Each micro-batch's loss is its
masked token mean divided by the number of micro-batches; Megatron's ``MoEAuxLossAutoScaler`` gets the
same scale, so router losses are averaged like the main loss on every stage.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp_min(1)


class PipelineStage:
    """This rank's place in the pipeline and the shape of what crosses between stages."""

    def __init__(self, config, seq_length: int, micro_batch_size: int, device: torch.device):
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        self.single = self.first and self.last
        local_seq = seq_length // config.tensor_model_parallel_size if config.sequence_parallel else seq_length
        self.activation_shape = (local_seq, micro_batch_size, config.hidden_size)
        self.dtype = config.pipeline_dtype
        self.device = device
        self.causal_mask = torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)

    def receive(self, source: int) -> torch.Tensor:
        tensor = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        dist.recv(tensor, src=source)
        return tensor

    def send(self, tensor: torch.Tensor, destination: int) -> None:
        dist.send(tensor.detach().to(self.dtype).contiguous(), dst=destination)


def _to(batch: dict, device: torch.device) -> dict:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def forward_backward(
    model,
    micro_batches: list,
    stage: PipelineStage,
    *,
    forward_only: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """Run the micro-batches through this stage (and back, unless ``forward_only``).

    Returns the mean of the micro-batch losses on the last stage, None elsewhere.
    """
    count = len(micro_batches)
    if not forward_only:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / count, device=stage.device))
    previous = None if stage.first else parallel_state.get_pipeline_model_parallel_prev_rank()
    following = None if stage.last else parallel_state.get_pipeline_model_parallel_next_rank()
    autocast = (
        torch.autocast(stage.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    grad_mode = torch.no_grad() if forward_only else nullcontext()
    inputs, outputs, losses = [], [], []
    with grad_mode:
        for batch in micro_batches:
            batch = _to(batch, stage.device)
            received = None
            if not stage.first:
                received = stage.receive(previous).requires_grad_(not forward_only)
                model.set_input_tensor(received)
            with autocast:
                output = model(
                    batch["tokens"] if stage.first else None,
                    batch["position_ids"],
                    stage.causal_mask,
                    labels=batch["labels"] if stage.last else None,
                )
            if stage.last:
                loss = masked_mean(output.float(), batch["loss_mask"])
                losses.append(loss.detach())
                output = loss / count
            else:
                stage.send(output, following)
            inputs.append(received)
            outputs.append(output)
    if not forward_only:
        for received, output in zip(reversed(inputs), reversed(outputs)):
            if stage.last:
                output.backward()
            else:
                grad = stage.receive(following)
                torch.autograd.backward(output, grad.to(output.dtype))
            if received is not None:
                stage.send(received.grad, previous)
    return torch.stack(losses).mean() if stage.last else None
