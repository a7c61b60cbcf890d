"""How evenly each load-balancing method spreads the tokens: the embedded default (configs/cpu_default.yaml,
16 experts of 64, top-4) trained for a few hundred steps with each method, through
``launch_scripts/pretrain_gpt_moe.sh``, the same seed and data for every method.

Methods: ``aux_loss`` (Switch, per micro-batch), ``seq_aux_loss`` (per sequence), ``global_aux_loss`` (global
batch), ``expert_bias`` (aux-loss-free: sigmoid scores steered by the expert bias, no loss; megatron-core
allows the bias with sigmoid scores only) and ``none`` (softmax, no loss). Reported per method: the load
imbalance (the busiest expert's load over the mean load, per MoE layer, averaged over the last quarter of
the logged intervals) and the final validation loss.

Outputs under ``--out``: ``balance.json`` (every curve) and ``balance.png`` (imbalance over the steps, per
method, layers averaged).

    python benchmarks/bench_balance.py --out benchmarks/results/balance
    python benchmarks/bench_balance.py --out runs/balance --train-iters 20 --lr-warmup-iters 2   # a quick check

Flags the script does not know go to every training run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from granularity_sweep import train  # noqa: E402
from provenance import provenance  # noqa: E402

COEFFICIENT = "1e-2"
METHODS = {
    "aux_loss": ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", COEFFICIENT],
    "seq_aux_loss": ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", COEFFICIENT],
    "global_aux_loss": ["--moe-router-load-balancing-type", "global_aux_loss", "--moe-aux-loss-coeff", COEFFICIENT],
    "expert_bias": ["--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0",
                    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"],
    "none": ["--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0"],
}


def summarize(records: list[dict]) -> dict:
    """Per-layer imbalance averaged over the last quarter of the logged intervals, its curve (layers
    averaged) and the last validation loss."""
    logged = [r for r in records if "moe" in r]
    tail = logged[-max(1, len(logged) // 4):]
    layers = sorted(tail[0]["moe"])
    per_layer = {layer: statistics.mean(r["moe"][layer]["load_imbalance"] for r in tail) for layer in layers}
    curve = [(r["iteration"], statistics.mean(r["moe"][layer]["load_imbalance"] for layer in layers))
             for r in logged]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    return {"imbalance": per_layer, "curve": curve, "valid_loss": valid[-1] if valid else None,
            "train_loss": logged[-1]["loss"]}


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for method, result in results.items():
        steps, values = zip(*result["curve"])
        axes.plot(steps, values, label=method)
    axes.set_xlabel("iteration")
    axes.set_ylabel("load imbalance (busiest expert / mean, layers averaged)")
    axes.set_yscale("log")
    axes.legend()
    axes.set_title("Load balancing methods on the embedded default")
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu_default.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    known, extra = parser.parse_known_args(argv)
    base = ["--config", known.config, "--train-iters", "400", "--log-interval", "20", "--eval-interval", "200",
            "--lr-warmup-iters", "20", *extra]
    known.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in known.methods.split(","):
        records = train(base + METHODS[method], known.seed, known.out / method, known.nproc)
        results[method] = summarize(records)
    print(f"{'method':<16} {'imbalance per layer (last quarter)':<40} {'valid loss':>10} {'train loss':>10}")
    for method, result in results.items():
        layers = ", ".join(f"{value:.2f}" for value in result["imbalance"].values())
        valid = f"{result['valid_loss']:.4f}" if result["valid_loss"] is not None else "-"
        print(f"{method:<16} {layers:<40} {valid:>10} {result['train_loss']:>10.4f}")
    info = provenance() | {"command": " ".join(["python", "benchmarks/bench_balance.py", *(argv or sys.argv[1:])]),
                           "methods": METHODS, "base_flags": base}
    (known.out / "balance.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    plot(results, known.out / "balance.png")
    print(f"written: {known.out / 'balance.json'}, {known.out / 'balance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
