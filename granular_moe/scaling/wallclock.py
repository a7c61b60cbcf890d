"""Wall-clock-aware choice of granularity: the loss each ``G`` reaches in a time budget, from measured step
times (``benchmarks/bench_step_time.py``) instead of the paper's FLOPs model.

A larger ``G`` costs more per step (routing, token shuffle, many small GEMMs), so in a fixed time it sees
fewer tokens: ``D(G) = seconds x tokens/s(G)``. With the model size ``N`` fixed (granularity does not change
it), the planner predicts ``L(N, D(G), G)`` with the paper's law and picks the ``G`` of lowest loss: loss
against time rather than FLOPs. A step-time file measures one model on one parallel layout;
give several to compare model sizes too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from granular_moe.scaling.errors import ThroughputFileError, require_positive
from granular_moe.scaling.law import ScalingLaw, moe_law
from granular_moe.scaling.megatron_plan import MegatronPlan
from granular_moe.scaling.params import ModelShape, count_parameters

STEP_TIME_FORMAT = "granular-moe-step-time/1"
MODEL_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_experts", "moe_router_topk",
    "seq_length", "micro_batch_size", "vocab_size", "swiglu",
)


@dataclass(frozen=True)
class StepTimeTable:
    """Measured step times of one model for several granularities (one step-time file)."""

    path: str
    device: str
    world_size: int
    model: dict
    step_time_s: dict[int, float]  # granularity -> seconds per optimizer step
    tokens_per_step: int

    def tokens_per_second(self, granularity: int) -> float:
        return self.tokens_per_step / self.step_time_s[granularity]

    @property
    def expansion_rate(self) -> int:
        """``E = num_experts / top-k``: total expert parameters over active ones (the paper's expansion rate)."""
        experts, topk = self.model["num_experts"], self.model["moe_router_topk"]
        if experts % topk:
            raise ThroughputFileError(
                f"{self.path}: --num-experts {experts} is not a multiple of --moe-router-topk {topk}: the "
                "expansion rate E = experts / top-k must be a whole number"
            )
        return experts // topk

    @property
    def law_params(self) -> int:
        """The law's ``N`` of the measured model (the same for every ``G``)."""
        model = self.model
        shape = ModelShape(
            num_layers=model["num_layers"], hidden_size=model["hidden_size"],
            num_attention_heads=model["num_attention_heads"], ffn_hidden_size=model["ffn_hidden_size"],
            vocab_size=model["vocab_size"], num_experts=model["num_experts"],
            moe_router_topk=model["moe_router_topk"], swiglu=model["swiglu"],
        )
        return count_parameters(shape).law


def load_step_time_table(path: str | Path) -> StepTimeTable:
    """Read and check a step-time file written by ``benchmarks/bench_step_time.py``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ThroughputFileError(f"--throughput-file {path}: cannot read it as JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != STEP_TIME_FORMAT:
        raise ThroughputFileError(
            f"--throughput-file {path}: not a step-time file (format must be {STEP_TIME_FORMAT!r}; write one with "
            "benchmarks/bench_step_time.py)"
        )
    if data.get("target") != "gpt":
        raise ThroughputFileError(
            f"--throughput-file {path} times {data.get('target')!r}; the wall-clock planner needs whole-model step "
            "times: rerun benchmarks/bench_step_time.py with --target gpt"
        )
    model = data.get("model", {})
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise ThroughputFileError(f"--throughput-file {path}: model lacks {', '.join(missing)}")
    step_times = {}
    for row in data.get("measurements", []):
        try:
            granularity, seconds = int(row["granularity"]), float(row["step_time_s"])
        except (KeyError, TypeError, ValueError):
            raise ThroughputFileError(
                f"--throughput-file {path}: each measurement needs granularity and step_time_s, got {row!r}"
            ) from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise ThroughputFileError(f"--throughput-file {path}: step_time_s of G={granularity} is {seconds!r}")
        step_times[granularity] = seconds
    if not step_times:
        raise ThroughputFileError(f"--throughput-file {path}: no measurements")
    world_size = int(data.get("world_size", 1))
    return StepTimeTable(
        path=str(path),
        device=str(data.get("machine", {}).get("device", "unknown")),
        world_size=world_size,
        model=model,
        step_time_s=dict(sorted(step_times.items())),
        tokens_per_step=model["micro_batch_size"] * model["seq_length"] * world_size,
    )


@dataclass(frozen=True)
class WallClockOption:
    """What one measured (model, ``G``) reaches in the time budget."""

    table: StepTimeTable
    granularity: int
    law: ScalingLaw
    tokens: float
    loss: float

    @property
    def step_time_s(self) -> float:
        return self.table.step_time_s[self.granularity]

    def megatron_plan(self) -> MegatronPlan:
        """The job: the measured model at this ``G`` for as many whole iterations as the budget's tokens."""
        model = self.table.model
        global_batch = model["micro_batch_size"] * self.table.world_size
        return MegatronPlan(
            num_layers=model["num_layers"],
            hidden_size=model["hidden_size"],
            num_attention_heads=model["num_attention_heads"],
            ffn_hidden_size=model["ffn_hidden_size"],
            num_experts=model["num_experts"],
            moe_router_topk=model["moe_router_topk"],
            moe_granularity=self.granularity,
            seq_length=model["seq_length"],
            micro_batch_size=model["micro_batch_size"],
            global_batch_size=global_batch,
            train_iters=math.floor(self.tokens / (global_batch * model["seq_length"])),
            swiglu=bool(model["swiglu"]),
        )


def plan_wallclock(gpu_hours: float, tables: Sequence[StepTimeTable]) -> list[WallClockOption]:
    """Every measured (model, ``G``) with the tokens and predicted loss it reaches in ``gpu_hours`` device-hours
    (spread over the measurement's ``world_size`` devices), best first."""
    gpu_hours = require_positive(gpu_hours, "time budget (--gpu-hours)")
    if not tables:
        raise ThroughputFileError("--gpu-hours needs at least one --throughput-file")
    options = []
    for table in tables:
        law = moe_law(table.expansion_rate)
        seconds = gpu_hours * 3600 / table.world_size
        for granularity in table.step_time_s:
            tokens = seconds * table.tokens_per_second(granularity)
            options.append(
                WallClockOption(table, granularity, law, tokens, law.loss(table.law_params, tokens, granularity))
            )
    return sorted(options, key=lambda option: option.loss)
