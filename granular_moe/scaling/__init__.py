"""Scaling-law planner for fine-grained MoE (Krajewski et al. 2024, arXiv 2402.07871).

* :mod:`~granular_moe.scaling.law`: the fitted laws ``L(N, D, G)`` (Table 1, Table 8) and the dense law.
* :mod:`~granular_moe.scaling.flops`: the paper's architecture family and FLOPs model (Eq. 10, Appendix E).
* :mod:`~granular_moe.scaling.optimal`: compute-optimal ``(N, D, G)`` for a budget (Section 6.2).
* :mod:`~granular_moe.scaling.megatron_plan`: a plan as whole layers and iterations, Megatron flags, YAML.
* :mod:`~granular_moe.scaling.wallclock`: the best ``G`` for a time budget from measured step times.
* :mod:`~granular_moe.scaling.params`: exact parameter counts of megatron-core GPTs with granular MoE.
* :mod:`~granular_moe.scaling.plots`: PNGs; :mod:`~granular_moe.scaling.cli`: ``granular-moe plan``.
"""

from granular_moe.scaling.errors import ImpossibleConstraintsError, ScalingInputError, ThroughputFileError
from granular_moe.scaling.flops import PaperArchitecture
from granular_moe.scaling.law import DENSE, MOE_E16, MOE_E64, ScalingLaw, moe_law
from granular_moe.scaling.megatron_plan import MegatronPlan, realize
from granular_moe.scaling.optimal import (
    ComputeOptimum,
    budget_for_active_params,
    compute_optimal,
    dense_compute_optimal,
    optimal_for_granularity,
)
from granular_moe.scaling.params import ModelShape, ParameterCount, count_parameters, shape_from_args
from granular_moe.scaling.wallclock import StepTimeTable, load_step_time_table, plan_wallclock

__all__ = [
    "DENSE", "MOE_E16", "MOE_E64", "ComputeOptimum", "ImpossibleConstraintsError", "MegatronPlan", "ModelShape",
    "PaperArchitecture", "ParameterCount", "ScalingInputError", "ScalingLaw", "StepTimeTable", "ThroughputFileError",
    "budget_for_active_params", "compute_optimal", "count_parameters", "dense_compute_optimal", "load_step_time_table",
    "moe_law", "optimal_for_granularity", "plan_wallclock", "realize", "shape_from_args",
]
