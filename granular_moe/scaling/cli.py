"""``granular-moe plan``: compute-optimal or wall-clock-optimal fine-grained MoE, as Megatron-LM flags.

    granular-moe plan --flops 1e21                        # best (N, D, G) for a FLOPs budget
    granular-moe plan --active-params 1e9                 # the budget a model size is optimal for
    granular-moe plan --gpu-hours 1000 --throughput-file step_times.json   # best G from measured step times
    granular-moe plan --plots benchmarks/results          # PNGs of the law's predictions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from granular_moe.config import GranularMoEConfigError
from granular_moe.scaling.errors import ImpossibleConstraintsError, ScalingInputError
from granular_moe.scaling.law import MOE_LAWS, outside_fitted_range, moe_law
from granular_moe.scaling.megatron_plan import PAPER_GLOBAL_BATCH_SIZE, PAPER_SEQ_LENGTH, MegatronPlan, realize
from granular_moe.scaling.optimal import (
    GRANULARITIES,
    budget_for_active_params,
    compute_optimal,
    dense_compute_optimal,
    flops_to_match,
    optimal_for_granularity,
)
from granular_moe.scaling.wallclock import load_step_time_table, plan_wallclock


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granular-moe plan",
        description="Plan a fine-grained MoE run with the scaling law of Krajewski et al. 2024 (arXiv 2402.07871).",
        allow_abbrev=False,
    )
    budget = parser.add_argument_group("budget (one of)")
    budget.add_argument("--flops", type=float, help="training FLOPs budget (the paper's FLOPs model, Eq. 10)")
    budget.add_argument("--active-params", type=float,
                        help="model size (12 d_model^2 n_blocks active parameters): the budget it is optimal for")
    budget.add_argument("--gpu-hours", type=float,
                        help="device-hours; needs --throughput-file (measured step times)")
    parser.add_argument("--throughput-file", type=Path, action="append", default=[],
                        help="step-time JSON of benchmarks/bench_step_time.py (repeat to compare models)")
    law = parser.add_argument_group("model family and constraints")
    law.add_argument("--expansion-rate", type=int, default=None,
                     help="E, experts at G=1 with one active per token (default 64; with --gpu-hours: from the "
                     f"file); fitted: {', '.join(map(str, MOE_LAWS))}")
    law.add_argument("--granularities", type=_int_list, default=list(GRANULARITIES),
                     help="candidate G, powers of two (default 1,2,...,256 as the authors' solver)")
    law.add_argument("--max-params", type=float, help="cap on the law's N (total non-embedding parameters)")
    law.add_argument("--max-tokens", type=float, help="cap on training tokens (the data you have)")
    job = parser.add_argument_group("job")
    job.add_argument("--seq-length", type=int, default=PAPER_SEQ_LENGTH)
    job.add_argument("--global-batch-size", type=int, default=PAPER_GLOBAL_BATCH_SIZE)
    job.add_argument("--micro-batch-size", type=int, default=1)
    job.add_argument("--yaml", type=Path, help="also write the plan as a --config YAML for the main job")
    parser.add_argument("--plots", type=Path, help="write PNGs of the law's predictions into this folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except GranularMoEConfigError as error:
        print(f"granular-moe plan: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    budgets = [flag for flag, value in (("--flops", args.flops), ("--active-params", args.active_params),
                                        ("--gpu-hours", args.gpu_hours)) if value is not None]
    if len(budgets) > 1:
        raise ScalingInputError(f"give one budget, not {' and '.join(budgets)}")
    if not budgets and args.plots is None:
        raise ScalingInputError("give a budget: --flops, --active-params or --gpu-hours (or --plots DIR)")
    if args.throughput_file and args.gpu_hours is None:
        raise ScalingInputError("--throughput-file goes with --gpu-hours")
    if args.gpu_hours is not None:
        given = [flag for flag, value in (("--expansion-rate", args.expansion_rate), ("--max-params", args.max_params),
                                          ("--max-tokens", args.max_tokens)) if value is not None]
        if given:
            raise ScalingInputError(f"{', '.join(given)}: not used with --gpu-hours (it plans the measured model)")
    law = moe_law(64 if args.expansion_rate is None else args.expansion_rate)
    plan = None
    if args.gpu_hours is not None:
        plan = _wallclock(args)
    elif budgets:
        plan = _compute_optimal(args, law)
    if plan is not None and args.yaml is not None:
        args.yaml.write_text(plan.yaml_text())
        print(f"\nwrote {args.yaml} (run: granular-moe pretrain --config {args.yaml})")
    if args.plots is not None:
        _write_plots(args, law)
    return 0


def _compute_optimal(args, law) -> MegatronPlan:
    constraints = dict(max_params=args.max_params, max_tokens=args.max_tokens)
    if args.flops is not None:
        best = compute_optimal(args.flops, law, args.granularities, **constraints)
        print(f"Compute-optimal fine-grained MoE for {best.flops:.3g} FLOPs")
    else:
        if args.max_params is not None or args.max_tokens is not None:
            raise ScalingInputError("--active-params fixes the model: --max-params / --max-tokens do not apply")
        best = budget_for_active_params(args.active_params, law, args.granularities)
        print(
            f"Budget for which {args.active_params:.3g} active parameters are compute-optimal: {best.flops:.3g} FLOPs"
        )
    print(f"law: {law.source}")
    realized = realize(best, args.seq_length, args.global_batch_size, args.micro_batch_size, **constraints)
    job = realized.megatron
    rows = [
        ("granularity G", best.granularity, job.moe_granularity),
        ("layers", f"{best.architecture.n_blocks:.2f}", job.num_layers),
        ("d_model", f"{best.architecture.d_model:.0f}", job.hidden_size),
        ("params N (law)", f"{best.params:.4g}", f"{realized.architecture.params:.4g}"),
        ("active N_act", f"{best.active_params:.4g}", f"{realized.architecture.active_params:.4g}"),
        ("tokens D", f"{best.tokens:.4g}", f"{job.tokens:.4g}"),
        ("FLOPs", f"{best.flops:.4g}", f"{realized.flops:.4g}"),
        ("predicted loss", f"{best.loss:.4f}", f"{realized.loss:.4f}"),
    ]
    print(f"\n{'':<16}{'optimum':>14}{'planned job':>14}")
    for name, optimum, planned in rows:
        print(f"{name:<16}{optimum!s:>14}{planned!s:>14}")
    for constraint in best.active_constraints:
        print(f"constraint reached: {constraint}")
    print(f"\nAt {best.flops:.3g} FLOPs, against the best G's loss {best.loss:.4f}:")
    baselines = (
        ("MoE, G = 1", lambda f: optimal_for_granularity(f, 1, law, **constraints)),
        ("dense", lambda f: dense_compute_optimal(f, **constraints)),
    )
    for name, solve in baselines:
        loss = solve(best.flops).loss
        try:
            needed = f"needs {flops_to_match(best.loss, solve, best.flops) / best.flops:.2f}x the FLOPs to match"
        except ImpossibleConstraintsError:
            needed = "cannot match it within the constraints"
        print(f"  {name:<11} loss {loss:.4f} ({loss - best.loss:+.4f}); {needed}")
    for note in outside_fitted_range(best.params, best.tokens):
        print(f"note: {note}")
    print("\nMegatron-LM arguments (granular-moe pretrain or Megatron-LM with the plugin):")
    print(" ".join(job.megatron_args()))
    return job


def _wallclock(args) -> MegatronPlan:
    if not args.throughput_file:
        raise ScalingInputError("--gpu-hours needs --throughput-file (write one with benchmarks/bench_step_time.py)")
    tables = [load_step_time_table(path) for path in args.throughput_file]
    options = plan_wallclock(args.gpu_hours, tables)
    best = options[0]
    print(f"Wall-clock plan for {args.gpu_hours:g} device-hours from measured step times")
    for table in tables:
        model = table.model
        print(f"\n{table.path}: {table.device}, {table.world_size} device(s); {model['num_layers']} layers, d_model "
              f"{model['hidden_size']}, {model['num_experts']} experts top-{model['moe_router_topk']}, "
              f"N = {table.law_params:.4g}; law: {moe_law(table.expansion_rate).name}")
        rows = [option for option in options if option.table is table]
        reference = next((option for option in rows if option.granularity == 1), None)
        print(f"  {'G':>4}{'step (s)':>12}{'tokens/s':>12}{'tokens D':>12}{'loss':>9}{'vs G=1':>9}")
        for option in sorted(rows, key=lambda option: option.granularity):
            delta = f"{option.loss - reference.loss:+.4f}" if reference else "-"
            mark = "  <- best" if option is best else ""
            print(
                f"  {option.granularity:>4}{option.step_time_s:>12.4g}"
                f"{table.tokens_per_second(option.granularity):>12.4g}{option.tokens:>12.4g}{option.loss:>9.4f}{delta:>9}{mark}"
            )
    for note in outside_fitted_range(best.table.law_params, best.tokens):
        print(f"note: {note}")
    job = best.megatron_plan()
    if job.train_iters < 1:
        raise ImpossibleConstraintsError(
            f"--gpu-hours {args.gpu_hours:g} does not buy one iteration of {best.table.path}'s model "
            f"at G={best.granularity}"
        )
    print(f"\nBest: G = {best.granularity} ({best.table.path}), predicted loss {best.loss:.4f}")
    print("Megatron-LM arguments:")
    print(" ".join(job.megatron_args()))
    return job


def _write_plots(args, law) -> None:
    from granular_moe.scaling import plots  # matplotlib: only when asked

    args.plots.mkdir(parents=True, exist_ok=True)
    written = [
        plots.plot_loss_vs_granularity(args.plots / plots.LOSS_VS_GRANULARITY, law=law),
        plots.plot_loss_vs_budget(args.plots / plots.LOSS_VS_BUDGET, law=law),
    ]
    if args.gpu_hours is not None:
        tables = [load_step_time_table(path) for path in args.throughput_file]
        written.append(plots.plot_loss_vs_time(args.plots / plots.LOSS_VS_TIME, tables, args.gpu_hours))
    print("\nwrote " + ", ".join(str(path) for path in written))
