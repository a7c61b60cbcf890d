"""Where the main job's metrics go: the console, a JSON-lines file, TensorBoard, and a loss plot; and the
per-MoE-layer statistics collected over a logging interval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from granular_moe.layer import GranularMoELayer


class MoELayerStatistics:
    """Sums each MoE layer's routing statistics over the training forwards of a logging interval, on the
    device: nothing is read back to the host until :meth:`collect` (a logging step)."""

    def __init__(self, modules: list):
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, GranularMoELayer)]
        for layer in self.layers:
            layer.register_forward_hook(self._record)
        self.sums: dict = {}

    def _record(self, layer, inputs, output) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        stats = layer.stats
        aux = stats.load_balancing_loss
        # [forwards, dropped, aux, z, load per expert...] in fp64 on the layer's device
        values = torch.cat([
            torch.stack([
                torch.ones((), dtype=torch.float64, device=stats.z_loss.device),
                stats.dropped.double(),
                aux.detach().double() if aux is not None else torch.full_like(stats.z_loss, float("nan")).double(),
                stats.z_loss.double(),
            ]),
            stats.tokens_per_expert.double(),
        ])
        total = self.sums.get(layer.layer_number)
        self.sums[layer.layer_number] = values if total is None else total + values

    def collect(self) -> dict:
        """Per layer (on global rank 0): mean aux and z loss (unscaled), dropped assignments per step's
        forwards, and load imbalance (busiest expert over the mean). Collective; resets the sums."""
        contributes = self.layers and (
            parallel_state.get_tensor_model_parallel_rank() == 0 or self.layers[0].config.sequence_parallel
        )
        local = {number: values.cpu() for number, values in self.sums.items()} if contributes else {}
        self.sums = {}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged: dict = {}
        for rank_sums in gathered:
            for number, values in rank_sums.items():
                merged[number] = values if number not in merged else merged[number] + values
        summary = {}
        for number in sorted(merged):
            forwards, dropped, aux, z = merged[number][:4].tolist()
            load = merged[number][4:]
            forwards = max(forwards, 1)
            summary[f"layer_{number}"] = {
                "load_balancing_loss": aux / forwards,
                "z_loss": z / forwards,
                "dropped": int(dropped),
                "load_imbalance": float(load.max() / load.mean()) if load.numel() and load.mean() > 0 else 0.0,
            }
        return summary


class MetricsLog:
    """Console lines, a JSON-lines file and TensorBoard scalars, written by global rank 0."""

    def __init__(self, jsonl: Path, tensorboard_dir: Optional[Path]):
        self.active = dist.get_rank() == 0
        self.jsonl = Path(jsonl)
        self.writer = None
        if self.active:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict, console: str) -> None:
        if not self.active:
            return
        print(console, flush=True)
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["iteration"]
            for name, value in _flatten(record).items():
                if name != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def read_records(jsonl: Path) -> list[dict]:
    """The records of a metrics file, the last one of each (kind, iteration) kept: a run resumed from a
    checkpoint repeats the iterations after it, and the later records are the ones that count."""
    latest = {}
    for line in Path(jsonl).read_text().splitlines():
        record = json.loads(line)
        latest[("valid_loss" in record, record["iteration"])] = record
    return [latest[key] for key in sorted(latest, key=lambda key: (key[1], key[0]))]


def plot_losses(jsonl: Path, png: Path) -> None:
    """Training and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(jsonl)
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
    if valid:
        axes.plot([r["tokens"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation")
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
