"""PNG figures of the planner's predictions (``granular-moe plan --plots DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from granular_moe.scaling.law import MOE_E64, ScalingLaw
from granular_moe.scaling.optimal import (
    GRANULARITIES,
    compute_optimal,
    dense_compute_optimal,
    flops_to_match,
    optimal_for_granularity,
)
from granular_moe.scaling.wallclock import StepTimeTable, plan_wallclock

LOSS_VS_GRANULARITY = "scaling_loss_vs_granularity.png"
LOSS_VS_BUDGET = "scaling_loss_vs_budget.png"
LOSS_VS_TIME = "scaling_loss_vs_time.png"


def plot_loss_vs_granularity(
    path: Path, budgets: Sequence[float] = (1e19, 1e21, 1e23, 1e25), law: ScalingLaw = MOE_E64
) -> Path:
    """Compute-optimal loss at each fixed ``G``, one line per budget; the best ``G`` of each is marked."""
    figure = Figure(figsize=(7.5, 4), dpi=120)
    axes = figure.subplots()
    for flops in budgets:
        losses = [optimal_for_granularity(flops, g, law).loss for g in GRANULARITIES]
        line, = axes.plot(GRANULARITIES, losses, marker="o", label=f"{flops:.0e} FLOPs")
        best = int(np.argmin(losses))
        axes.plot(GRANULARITIES[best], losses[best], marker="*", markersize=14, color=line.get_color())
    axes.set_xscale("log", base=2)
    axes.set_xlabel("granularity G")
    axes.set_ylabel("predicted loss (compute-optimal N, D)")
    axes.set_title(f"Loss vs granularity ({law.name}); * = best G", fontsize=10)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_loss_vs_budget(path: Path, law: ScalingLaw = MOE_E64, low: float = 1e18, high: float = 1e26,
                        points: int = 17) -> Path:
    """(a) compute-optimal loss of dense, ``G = 1`` and best-``G`` MoE against the budget; (b) the budget dense
    and ``G = 1`` need to match best-``G`` (the paper's Figure 1)."""
    budgets = np.logspace(np.log10(low), np.log10(high), points)
    best = [compute_optimal(f, law) for f in budgets]
    standard = [optimal_for_granularity(f, 1, law) for f in budgets]
    dense = [dense_compute_optimal(f) for f in budgets]
    standard_needed = [flops_to_match(o.loss, lambda f: optimal_for_granularity(f, 1, law), o.flops) for o in best]
    dense_needed = [flops_to_match(o.loss, dense_compute_optimal, o.flops) for o in best]

    figure = Figure(figsize=(11, 4), dpi=120)
    loss_axes, ratio_axes = figure.subplots(1, 2)
    loss_axes.plot(budgets, [o.loss for o in dense], label="dense Transformer")
    loss_axes.plot(budgets, [o.loss for o in standard], label="MoE, G = 1")
    loss_axes.plot(budgets, [o.loss for o in best], label="MoE, best G", color="black")
    for optimum in best:
        loss_axes.annotate(str(optimum.granularity), (optimum.flops, optimum.loss), fontsize=7,
                           textcoords="offset points", xytext=(0, -11), ha="center")
    loss_axes.set_xscale("log")
    loss_axes.set_xlabel("training FLOPs")
    loss_axes.set_ylabel("predicted loss")
    loss_axes.set_title("(a) compute-optimal loss (numbers: best G)", fontsize=10)
    loss_axes.legend(fontsize=8)
    loss_axes.grid(alpha=0.3)
    ratio_axes.plot(budgets, np.array(dense_needed) / budgets, label="dense Transformer")
    ratio_axes.plot(budgets, np.array(standard_needed) / budgets, label="MoE, G = 1")
    ratio_axes.set_xscale("log")
    ratio_axes.set_yscale("log")
    ratio_axes.set_xlabel("training FLOPs of best-G MoE")
    ratio_axes.set_ylabel("x FLOPs needed for the same loss")
    ratio_axes.set_title("(b) compute multiplier to match best-G MoE", fontsize=10)
    ratio_axes.legend(fontsize=8)
    ratio_axes.grid(alpha=0.3, which="both")
    figure.suptitle(f"Krajewski et al. 2024 law ({law.name}), paper FLOPs model", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_loss_vs_time(path: Path, tables: Sequence[StepTimeTable], max_gpu_hours: float, points: int = 40) -> Path:
    """Predicted loss against device-hours for every measured (model, ``G``): loss against time, not FLOPs."""
    hours = np.logspace(np.log10(max_gpu_hours) - 2, np.log10(max_gpu_hours), points)
    curves: dict[tuple[str, int], list[float]] = {}
    for budget in hours:
        for option in plan_wallclock(float(budget), tables):
            curves.setdefault((option.table.path, option.granularity), []).append(option.loss)
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.subplots()
    for (table_path, granularity), losses in sorted(curves.items()):
        label = f"G = {granularity}" + (f" ({Path(table_path).name})" if len(tables) > 1 else "")
        axes.plot(hours, losses, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("device-hours")
    axes.set_ylabel("predicted loss")
    axes.set_title("Loss vs time from measured step times", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path
