"""Granularity sweep on the real stack: the same GPT trained with granular MoE at each G and as its dense
counterpart, for several seeds, through ``launch_scripts/pretrain_gpt_moe.sh``.

Every variant of a seed uses that seed for initialisation and data order, and sees the same tokens. MoE
is in every layer. Before training, the script prints each variant's parameters (total, active, all
experts, active experts, router) and refuses a sweep whose MoE variants differ in expert or in active
non-router parameters: only the router grows with G (``E*G*h`` per layer), and that is printed. The dense
counterpart has an FFN of ``k x d_expert`` (the active expert width).

Outputs under ``--out``: ``sweep.json`` (parameters, per-run curves, final validation losses, step times),
``final_loss_vs_granularity.png`` (mean and spread over seeds, dense as a band), ``loss_vs_tokens.png``
and ``loss_vs_time.png`` (validation loss against seconds spent in training steps).

    python benchmarks/granularity_sweep.py --config configs/sweep_cpu.yaml --out runs/sweep_cpu
    python benchmarks/granularity_sweep.py --config configs/sweep_gpu.yaml --out runs/sweep_gpu

Flags the script does not know go to every training run (e.g. ``--train-iters 2 --lr-warmup-iters 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from granular_moe.config import GranularMoEConfigError  # noqa: E402
from granular_moe.scaling.params import count_parameters, shape_from_args  # noqa: E402
from granular_moe.training.arguments import parse_args  # noqa: E402
from granular_moe.training.metrics import read_records  # noqa: E402
from provenance import provenance  # noqa: E402

LAUNCHER = ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"
# Inherited from a surrounding distributed job, these would make every run join its rendezvous; each run of
# the sweep is a one-node job of its own (torchrun --standalone, on a free port).
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                        "GROUP_RANK", "NODE_RANK", "NNODES")


class SweepMismatchError(GranularMoEConfigError):
    """Variants of a sweep that do not hold the same expert or active parameters."""


def variant_argv(base: list[str], granularity: int | None) -> list[str]:
    """Trainer flags of one variant: ``--moe-granularity G``, or (None) the dense counterpart."""
    if granularity is not None:
        return base + ["--moe-granularity", str(granularity)]
    args = parse_args(base)
    active_width = args.moe_router_topk * args.moe_ffn_hidden_size  # base values: granularity 1
    return base + ["--num-experts", "0", "--ffn-hidden-size", str(active_width)]


def variant_name(granularity: int | None) -> str:
    return "dense" if granularity is None else f"G{granularity}"


def parameter_table(base: list[str], granularities: list[int]) -> dict[str, dict]:
    """Parameter counts of every variant; raises :class:`SweepMismatchError` when the MoE variants
    differ in expert or active non-router parameters, or the dense one in active non-router ones."""
    table = {}
    for granularity in [*granularities, None]:
        args = parse_args(variant_argv(base, granularity))
        counts = count_parameters(shape_from_args(args))
        table[variant_name(granularity)] = {
            "experts": args.num_experts or 0,
            "topk": args.moe_router_topk if args.num_experts else 0,
            "expert_hidden": args.moe_ffn_hidden_size if args.num_experts else args.ffn_hidden_size,
            "total": counts.total,
            "active": counts.active,
            "active_without_router": counts.active - counts.router,
            "expert_parameters": counts.experts,
            "active_expert_parameters": counts.active_experts,
            "router": counts.router,
        }
    moe = {name: row for name, row in table.items() if name != "dense"}
    for key in ("expert_parameters", "active_without_router"):
        values = {row[key] for row in moe.values()}
        if len(values) > 1:
            per_variant = {name: row[key] for name, row in moe.items()}
            raise SweepMismatchError(f"the sweep's MoE variants differ in {key}: {per_variant}")
    reference = next(iter(moe.values()))["active_without_router"]
    if table["dense"]["active_without_router"] != reference:
        raise SweepMismatchError(
            f"the dense counterpart has {table['dense']['active_without_router']} active parameters, the MoE "
            f"variants {reference} (router excluded)"
        )
    return table


def print_parameters(table: dict) -> None:
    print("| variant | experts | top-k | expert hidden | total | active | active w/o router | all experts | router |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in table.items():
        print(
            f"| {name} | {row['experts']} | {row['topk']} | {row['expert_hidden']} | {row['total']:,} | "
            f"{row['active']:,} | {row['active_without_router']:,} | {row['expert_parameters']:,} | "
            f"{row['router']:,} |",
            flush=True,
        )


def train(argv: list[str], seed: int, run_dir: Path, nproc: int) -> list[dict]:
    """One training run through the launch script; returns its metrics records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = ["bash", str(LAUNCHER), *argv, "--seed", str(seed), "--save", str(run_dir),
               "--save-interval", "1000000000"]
    environment = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS_VARIABLES}
    environment["NPROC_PER_NODE"] = str(nproc)
    environment["PYTHON"] = sys.executable  # the launcher runs this interpreter, activated or not
    with open(run_dir / "train.log", "w") as log:
        result = subprocess.run(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        tail = "".join((run_dir / "train.log").read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"training run failed ({' '.join(command)}); the end of {run_dir / 'train.log'}:\n{tail}")
    return read_records(run_dir / "metrics.jsonl")


def summarize(runs: dict, table: dict) -> dict:
    summary = {}
    for name, seeds in runs.items():
        finals = [[r for r in records if "valid_loss" in r][-1]["valid_loss"] for records in seeds.values()]
        last_train = [[r for r in records if "loss" in r][-1] for records in seeds.values()]
        step_seconds = [record["train_seconds"] / record["iteration"] for record in last_train]
        summary[name] = {
            **table[name],
            "final_valid_loss": finals,
            "final_valid_loss_mean": statistics.mean(finals),
            "final_valid_loss_spread": max(finals) - min(finals),
            "final_train_loss_mean": statistics.mean(record["loss"] for record in last_train),
            "seconds_per_step": statistics.mean(step_seconds),
        }
    return summary


def plot(runs: dict, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = [name for name in summary if name != "dense"]
    granularities = [int(name[1:]) for name in moe]
    figure, axes = plt.subplots(figsize=(6, 4))
    for g, name in zip(granularities, moe):
        axes.plot(
            [g] * len(summary[name]["final_valid_loss"]), summary[name]["final_valid_loss"], "o", color="C0", alpha=0.5
        )
    axes.plot(
        granularities, [summary[n]["final_valid_loss_mean"] for n in moe], "-", color="C0", label="granular MoE (mean)"
    )
    if "dense" in summary:
        dense = summary["dense"]["final_valid_loss"]
        axes.axhspan(min(dense), max(dense), color="C1", alpha=0.3, label="dense (seed range)")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("granularity G")
    axes.set_ylabel("final validation loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "final_loss_vs_granularity.png", dpi=120)
    plt.close(figure)

    for x_key, filename, label in (("tokens", "loss_vs_tokens.png", "tokens"),
                                   ("train_seconds", "loss_vs_time.png", "seconds in training steps")):
        figure, axes = plt.subplots(figsize=(6, 4))
        for index, (name, seeds) in enumerate(runs.items()):
            for seed_index, records in enumerate(seeds.values()):
                valid = [r for r in records if "valid_loss" in r]
                axes.plot([r[x_key] for r in valid], [r["valid_loss"] for r in valid], "-", color=f"C{index}",
                          alpha=0.8, label=name if seed_index == 0 else None)
        axes.set_xlabel(label)
        axes.set_ylabel("validation loss")
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=120)
        plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="main-job YAML of the base MoE (G = 1)")
    parser.add_argument("--granularities", default="1,2,4,8,16")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--nproc", type=int, default=2, help="training processes per run (GPUs, or gloo ranks)")
    parser.add_argument("--out", type=Path, required=True)
    args, trainer_flags = parser.parse_known_args(argv)
    base = ["--config", str(args.config), *trainer_flags]
    granularities = [int(g) for g in args.granularities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        table = parameter_table(base, granularities)
    except GranularMoEConfigError as error:
        print(f"granularity_sweep: error: {error}", file=sys.stderr)
        return 2
    print_parameters(table)
    # taken before training: the commit and machine the runs came from
    info = provenance() | {"command": " ".join(["python", "benchmarks/granularity_sweep.py", *(argv or sys.argv[1:])]),
                           "nproc": args.nproc, "seeds": seeds}

    runs = {}
    for granularity in [*granularities, None]:
        name = variant_name(granularity)
        runs[name] = {}
        for seed in seeds:
            print(f"granularity_sweep: training {name}, seed {seed}", flush=True)
            runs[name][seed] = train(variant_argv(base, granularity), seed, args.out / f"{name}_seed{seed}", args.nproc)
    summary = summarize(runs, table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({"info": info, "summary": summary, "runs": runs}, indent=1))
    plot(runs, summary, args.out)
    print("| variant | final validation loss (mean) | seeds | spread | final training loss (mean) | s/step |")
    print("|---|---|---|---|---|---|")
    for name, row in summary.items():
        losses = ", ".join(f"{v:.4f}" for v in row["final_valid_loss"])
        print(f"| {name} | {row['final_valid_loss_mean']:.4f} | {losses} | {row['final_valid_loss_spread']:.4f} | "
              f"{row['final_train_loss_mean']:.4f} | {row['seconds_per_step']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
