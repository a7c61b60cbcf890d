"""``granular-moe COMMAND ...``: the package's command line, one module per command."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "export-hf": ("granular_moe.hf.export", "write a checkpoint as a Hugging Face model (Qwen3-MoE, DeepSeek-V3, "
                  "Mixtral, Qwen2-MoE, OLMoE, GLM-4.5)"),
    "import-hf": ("granular_moe.hf.import_hf", "write a Hugging Face model of those families as a checkpoint"),
    "plan": ("granular_moe.scaling.cli", "compute- or wall-clock-optimal (N, D, G) and its Megatron flags"),
    "preprocess": ("granular_moe.training.data", "train a sentencepiece tokenizer and write an indexed dataset"),
    "pretrain": ("granular_moe.training.pretrain", "pretrain a GPT with granular MoE (the main job)"),
    "verify-hf": ("granular_moe.hf.verify", "compare a checkpoint and a Hugging Face model layer by layer"),
    "verify-checkpoint": ("granular_moe.training.verify_checkpoint",
                          "check a checkpoint's files against their SHA-256 digests and its pickles' types"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<17} {summary}" for name, (_, summary) in COMMANDS.items())
        print(f"usage: granular-moe COMMAND [ARGS]\n\ncommands:\n{listing}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
