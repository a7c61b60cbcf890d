"""Arguments of the main pretraining job, named as Megatron-LM names them, plus the plugin's own.

``--config FILE.yaml`` supplies defaults (keys are flag names with or without dashes); flags on the command
line override it. :func:`parse_args` returns fine-grained MoE values (see
:mod:`granular_moe.megatron.arguments`).
"""

from __future__ import annotations

import argparse
import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from granular_moe.config import BALANCE_TYPES, DROP_POLICIES, GranularMoEConfigError
from granular_moe.scores import SCORE_FUNCTIONS
from granular_moe.megatron.arguments import add_granular_moe_args
from granular_moe.training.tokenizer import DEFAULT_VOCAB_SIZE


def moe_layer_freq_type(value):
    """Megatron's ``--moe-layer-freq``: an int N (one MoE layer every N) or a list expression such as
    ``"([1]*3+[0])*2"``."""
    if isinstance(value, (int, list)):
        return value
    value = str(value).strip()
    if "[" not in value:
        return int(value)
    pattern = _evaluate_list_expression(value)
    if not all(entry in (0, 1) for entry in pattern):
        raise argparse.ArgumentTypeError(f"--moe-layer-freq pattern must hold 0s and 1s, got {pattern}")
    return pattern


def _evaluate_list_expression(text: str) -> list:
    """Evaluate list literals combined with ``+`` and ``*`` (nothing else)."""
    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.List):
            return [evaluate(element) for element in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise argparse.ArgumentTypeError(f"--moe-layer-freq: cannot evaluate {text!r}")

    result = evaluate(ast.parse(text, mode="eval"))
    if not isinstance(result, list):
        raise argparse.ArgumentTypeError(f"--moe-layer-freq: {text!r} is not a list")
    return result


RECOMPUTE_GRANULARITIES = ("full", "selective")
# megatron-core 0.19's selective recompute modules that apply to the main job's models (gdn_norm_out belongs to a
# layer type it does not build)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_moe",
        description="Pretrain a GPT with granular MoE on megatron-core.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, help="YAML file of defaults (e.g. configs/moe_small.yaml)")

    model = parser.add_argument_group("model (Megatron-LM names)")
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden (SwiGLU: 8/3 x, to 64)")
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--seq-length", type=int, default=64)
    model.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    model.add_argument("--swiglu", action="store_true")
    model.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    model.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute")
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--rotary-base", type=int, default=10000, help="rope's base period")
    model.add_argument("--qk-layernorm", action="store_true", help="a norm on each head's queries and keys")
    model.add_argument("--qk-layernorm-across-heads", action="store_true",
                       help="with --qk-layernorm: RMS-normalise each token's whole query and key projections (all "
                       "heads together, OLMoE's q_norm / k_norm) instead of each head (TP 1; not a Megatron-LM flag)")
    model.add_argument("--add-qkv-bias", action="store_true",
                       help="biases on the query, key and value projections only (Qwen2, GLM-4.5)")
    model.add_argument("--rotary-percent", type=float, default=1.0,
                       help="the fraction of each head rope rotates (its first part; GLM-4.5's partial_rotary_factor)")
    model.add_argument("--group-query-attention", action="store_true")
    model.add_argument("--num-query-groups", type=int, default=None,
                       help="key/value heads with --group-query-attention")
    model.add_argument("--kv-channels", type=int, default=None, help="per-head width (default hidden / heads)")
    model.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of every LayerNorm / RMSNorm")
    model.add_argument("--multi-latent-attention", action="store_true",
                       help="multi-head latent attention (DeepSeek-V2/V3's MLA, megatron-core's MLASelfAttention)")
    model.add_argument("--q-lora-rank", type=int, default=None,
                       help="MLA: rank of the query's low-rank projection (unset: a full query projection)")
    model.add_argument("--kv-lora-rank", type=int, default=32, help="MLA: rank of the key/value latent")
    model.add_argument("--qk-head-dim", type=int, default=128, help="MLA: per-head query/key width without rope")
    model.add_argument("--qk-pos-emb-head-dim", type=int, default=64,
                       help="MLA: per-head query/key width that rope rotates")
    model.add_argument("--v-head-dim", type=int, default=128, help="MLA: per-head value width")
    model.add_argument("--disable-bias-linear", action="store_true",
                       help="accepted for Megatron compatibility; this job's only linear biases are --add-qkv-bias's")
    model.add_argument("--hidden-dropout", type=float, default=0.0)
    model.add_argument("--attention-dropout", type=float, default=0.0)
    model.add_argument("--init-method-std", type=float, default=0.02)

    moe = parser.add_argument_group("MoE (Megatron-LM names)")
    moe.add_argument("--num-experts", type=int, default=None, help="base experts E; unset or 0: a dense model")
    moe.add_argument("--moe-router-topk", type=int, default=2, help="base top-k")
    moe.add_argument(
        "--moe-ffn-hidden-size", type=int, default=None, help="base expert FFN size (default --ffn-hidden-size)"
    )
    moe.add_argument("--moe-layer-freq", type=moe_layer_freq_type, default=1)
    moe.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=[0.0],
                     help="one coefficient per --moe-router-load-balancing-type")
    moe.add_argument("--moe-z-loss-coeff", type=float, default=None)
    moe.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="unset: dropless")
    moe.add_argument("--moe-token-drop-policy", choices=DROP_POLICIES, default="probs")
    moe.add_argument("--moe-router-load-balancing-type", nargs="+", choices=BALANCE_TYPES, default=["aux_loss"],
                     help="one or several of aux_loss (micro-batch), seq_aux_loss (per sequence), global_aux_loss "
                     "(global batch), none")
    moe.add_argument("--moe-router-score-function", choices=SCORE_FUNCTIONS, default="softmax")
    moe.add_argument("--moe-router-pre-softmax", action="store_true",
                     help="softmax over all experts before top-k, gates not renormalised (top-1 always)")
    moe.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    moe.add_argument("--moe-router-enable-expert-bias", action="store_true",
                     help="aux-loss-free balancing: a per-expert bias on the selection scores (sigmoid scores)")
    moe.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    moe.add_argument("--moe-router-num-groups", type=int, default=None, help="expert groups of group-limited routing")
    moe.add_argument("--moe-router-group-topk", type=int, default=None, help="groups each token may use")
    moe.add_argument("--moe-router-dtype", choices=("fp32", "fp64"), default=None)
    moe.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                     help="a shared expert (megatron-core's SharedExpertMLP) of this FFN size; --moe-granularity "
                     "leaves it as given")
    moe.add_argument("--moe-shared-expert-gate", action="store_true", help="a sigmoid gate on the shared expert")
    add_granular_moe_args(parser)

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--expert-model-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                          help="interleaved 1F1B: this many layers per model chunk (PP > 2)")
    parallel.add_argument("--use-distributed-optimizer", action="store_true",
                          help="shard the optimizer state over data-parallel ranks (experts: expert-data-parallel)")
    parallel.add_argument("--overlap-grad-reduce", action="store_true",
                          help="reduce gradient buckets while the backward runs (GPU)")
    parallel.add_argument("--overlap-param-gather", action="store_true",
                          help="with --use-distributed-optimizer: gather updated parameters during the next forward")
    parallel.add_argument("--ddp-bucket-size", type=int, default=None, help="gradient bucket size (elements)")
    parallel.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                          help="default: nccl with GPUs, gloo without")
    parallel.add_argument("--distributed-timeout-minutes", type=int, default=10)

    training = parser.add_argument_group("training")
    training.add_argument("--micro-batch-size", type=int, default=8)
    training.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    training.add_argument("--train-iters", type=int, default=200)
    training.add_argument("--lr", type=float, default=3e-3)
    training.add_argument("--min-lr", type=float, default=3e-4)
    training.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    training.add_argument("--lr-warmup-iters", type=int, default=0)
    training.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate the warmup starts from")
    training.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    training.add_argument("--weight-decay", type=float, default=0.1)
    training.add_argument("--clip-grad", type=float, default=1.0)
    training.add_argument("--adam-beta1", type=float, default=0.9)
    training.add_argument("--adam-beta2", type=float, default=0.95)
    training.add_argument("--adam-eps", type=float, default=1e-8)
    training.add_argument("--seed", type=int, default=1234)
    training.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                          action="store_false", help="skip the check of every step's loss and gradients for NaN")
    precision = training.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", default=None,
                           help="bf16 weights, fp32 main weights in the optimizer (the default with a GPU)")
    precision.add_argument("--fp32", action="store_true", help="fp32 throughout (the default without a GPU)")

    memory = parser.add_argument_group("activation recompute (megatron-core's)")
    memory.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None,
                        help="full: whole transformer layers (--recompute-method, --recompute-num-layers); "
                             "selective: the --recompute-modules")
    memory.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    memory.add_argument("--recompute-num-layers", type=int, default=None)
    memory.add_argument("--recompute-modules", nargs="*", choices=RECOMPUTE_MODULES, default=None,
                        help="with --recompute-granularity selective (default core_attn); moe: the whole MoE layer "
                             "(keeps its input only), moe_act: the experts' activation (what the granular experts "
                             "always do), shared_experts: the shared expert")

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", type=Path, default=None,
                      help="prefix of a megatron-core indexed dataset (.bin/.idx); default: the embedded corpus")
    data.add_argument("--tokenizer-model", type=Path, default=None, help="sentencepiece model for --data-path")
    data.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                      help="vocabulary of the embedded corpus's tokenizer")
    data.add_argument("--corpus-max-bytes", type=int, default=None,
                      help="use at most this much of the embedded corpus's source (default: all of it)")
    data.add_argument("--split", default="969,30,1", help="train,valid,test weights")

    evaluation = parser.add_argument_group("evaluation and logging")
    evaluation.add_argument("--eval-interval", type=int, default=50)
    evaluation.add_argument("--eval-iters", type=int, default=4)
    evaluation.add_argument("--log-interval", type=int, default=10)
    evaluation.add_argument("--tensorboard-dir", type=Path, default=None)
    evaluation.add_argument(
        "--log-jsonl", type=Path, default=None, help="JSON-lines metrics (default: <save>/metrics.jsonl)"
    )

    checkpoint = parser.add_argument_group("checkpointing")
    checkpoint.add_argument("--save", type=Path, default=Path("runs/pretrain_gpt_moe"))
    checkpoint.add_argument("--load", type=Path, default=None,
                            help="resume from the newest checkpoint here (an error if there is none)")
    checkpoint.add_argument("--resume-if-exists", action="store_true",
                            help="with --load: start from scratch when it holds no checkpoint yet (requeued jobs)")
    checkpoint.add_argument("--finetune", action="store_true",
                            help="load the weights only, from iteration 0 (no optimizer, scheduler or RNG state)")
    checkpoint.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer and scheduler")
    checkpoint.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    integrity = checkpoint.add_mutually_exclusive_group()
    integrity.add_argument("--verify-integrity", dest="verify_integrity", action="store_true", default=True,
                           help="Megatron-LM's flag: every save records the SHA-256 of its files (integrity.json) and "
                           "--load / --moe-upcycle-from are checked against them (the default here)")
    integrity.add_argument("--no-verify-integrity", dest="verify_integrity", action="store_false",
                           help="load --load / --moe-upcycle-from without checking their files against the SHA-256 "
                           "digests each save records (saves still record them)")
    checkpoint.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist",
                            help="Megatron-LM's distributed checkpoint format (the one this job writes)")
    checkpoint.add_argument("--save-interval", type=int, default=100)
    checkpoint.add_argument("--moe-upcycle-from", type=Path, default=None,
                            help="start from a dense checkpoint of the same model, its FFNs cut into the experts")
    return parser


def _yaml_value(action: argparse.Action, key, value, path: Path):
    """A config file's value as the flag's parser would give it; an error naming the key and the file when it
    is not of the flag's type."""
    if value is None:
        return None
    flag = action.option_strings[0]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise GranularMoEConfigError(f"--config {path}: {key!r} ({flag}) must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        single = argparse.Action(action.option_strings, action.dest, type=action.type)
        return [_yaml_value(single, key, entry, path) for entry in values]
    if action.type is None or (action.type is moe_layer_freq_type and isinstance(value, list)):
        return value
    kinds = {int: "an integer", float: "a number", Path: "a path"}
    wrong_kind = isinstance(value, bool) or (action.type is int and isinstance(value, float)) or (
        action.type in (int, float) and not isinstance(value, (int, float, str)))
    try:
        if wrong_kind:
            raise ValueError
        return action.type(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        kind = kinds.get(action.type, f"a valid {flag} value")
        detail = f" ({error})" if isinstance(error, argparse.ArgumentTypeError) else ""
        raise GranularMoEConfigError(
            f"--config {path}: {key!r} ({flag}) must be {kind}, got {value!r}{detail}") from None


def _yaml_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    try:
        entries = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise GranularMoEConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise GranularMoEConfigError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(entries, dict):
        raise GranularMoEConfigError(f"--config {path}: expected 'flag: value' lines, got {type(entries).__name__}")
    known = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in entries.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest == "config":
            raise GranularMoEConfigError(f"--config {path}: unknown setting {key!r}")
        action = known[dest]
        value = _yaml_value(action, key, value, path)
        for entry in value if isinstance(value, list) and action.nargs in ("+", "*") else [value]:
            if action.choices is not None and entry is not None and entry not in action.choices:
                raise GranularMoEConfigError(
                    f"--config {path}: {action.option_strings[0]} {entry!r} is not valid; valid values: "
                    f"{', '.join(str(choice) for choice in action.choices)}"
                )
        defaults[dest] = value
    for group in parser._mutually_exclusive_groups:
        chosen = [a.option_strings[0] for a in group._group_actions if defaults.get(a.dest, a.default) not in
                  (a.default, None, False)]
        if len(chosen) > 1:
            raise GranularMoEConfigError(f"--config {path}: {' and '.join(chosen)} exclude each other; set one")
    return defaults


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the main job's flags (``--config`` YAML first, command line on top); every check that needs no
    process group is made here, before any work."""
    parser = build_parser()
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--config", type=Path)
    config_path = pre_parser.parse_known_args(argv)[0].config
    if config_path is not None:
        parser.set_defaults(**_yaml_defaults(parser, config_path))
    # The values as given (before --moe-granularity scales the MoE sizes), from the command line or the YAML
    check_values(argparse.ArgumentParser.parse_known_args(parser, argv)[0])
    args = parser.parse_args(argv)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.bf16 is None:  # Megatron-LM's bf16 recipe wherever a GPU is present
        import torch

        args.bf16 = torch.cuda.is_available() and not args.fp32
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):  # one value: as Megatron-LM keeps it
        value = getattr(args, name)
        if isinstance(value, list) and len(value) == 1:
            setattr(args, name, value[0])
    check_schedule(args)
    check_moe_flags(args)
    check_recompute_flags(args)
    return args


def check_recompute_flags(args: argparse.Namespace) -> None:
    """megatron-core's rules for activation recompute, checked by flag before any work."""
    granularity, modules = args.recompute_granularity, args.recompute_modules
    if granularity != "selective" and modules:
        raise GranularMoEConfigError("--recompute-modules needs --recompute-granularity selective")
    if granularity == "full":
        if args.recompute_method is None or not args.recompute_num_layers or args.recompute_num_layers < 1:
            raise GranularMoEConfigError(
                "--recompute-granularity full needs --recompute-method (uniform, block) and --recompute-num-layers "
                ">= 1 (layers per checkpointed group with uniform, per pipeline stage with block)")
        if args.recompute_num_layers > args.num_layers:
            raise GranularMoEConfigError(
                f"--recompute-num-layers {args.recompute_num_layers} is above --num-layers {args.num_layers}")
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        raise GranularMoEConfigError("--recompute-method and --recompute-num-layers go with --recompute-granularity "
                                     "full")
    needs = {"moe": bool(args.num_experts), "moe_act": bool(args.num_experts),
             "shared_experts": bool(args.num_experts and args.moe_shared_expert_intermediate_size),
             "mla_up_proj": args.multi_latent_attention}
    wanting = {"moe": "--num-experts", "moe_act": "--num-experts",
               "shared_experts": "--moe-shared-expert-intermediate-size", "mla_up_proj": "--multi-latent-attention"}
    for module in modules or ():
        if not needs.get(module, True):
            raise GranularMoEConfigError(f"--recompute-modules {module} needs {wanting[module]}")


def check_moe_flags(args: argparse.Namespace) -> None:
    if isinstance(args.moe_layer_freq, list) and len(args.moe_layer_freq) != args.num_layers:
        raise GranularMoEConfigError(
            f"--moe-layer-freq lists {len(args.moe_layer_freq)} layers, --num-layers is {args.num_layers}: "
            "give one 0/1 entry per layer"
        )
    factor = args.moe_expert_capacity_factor
    if factor is not None and not factor > 0:
        raise GranularMoEConfigError(
            f"--moe-expert-capacity-factor must be > 0, got {factor:g}; leave it unset for dropless routing"
        )
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise GranularMoEConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    if args.multi_latent_attention and args.position_embedding_type != "rope":
        raise GranularMoEConfigError(
            f"--multi-latent-attention needs --position-embedding-type rope (got {args.position_embedding_type})")
    if args.qk_layernorm_across_heads and not (args.qk_layernorm and args.normalization == "RMSNorm"):
        raise GranularMoEConfigError("--qk-layernorm-across-heads needs --qk-layernorm and --normalization RMSNorm (it "
                                     "RMS-normalises the whole query and key projections)")
    if args.qk_layernorm_across_heads and (args.tensor_model_parallel_size != 1 or args.multi_latent_attention):
        raise GranularMoEConfigError(
            "--qk-layernorm-across-heads needs --tensor-model-parallel-size 1 and standard attention (its norm spans "
            f"every head; got TP {args.tensor_model_parallel_size}"
            + (", --multi-latent-attention)" if args.multi_latent_attention else ")"))
    if args.add_qkv_bias and args.multi_latent_attention:
        raise GranularMoEConfigError("--add-qkv-bias goes with standard attention, not --multi-latent-attention")
    if args.rotary_percent != 1.0 and (args.position_embedding_type != "rope" or args.multi_latent_attention):
        raise GranularMoEConfigError(f"--rotary-percent {args.rotary_percent:g} needs --position-embedding-type rope "
                                     "and standard attention (multi-latent attention has --qk-pos-emb-head-dim)")
    if args.multi_latent_attention and args.group_query_attention:
        raise GranularMoEConfigError("--multi-latent-attention and --group-query-attention exclude each other: MLA "
                                     "compresses keys and values into one latent instead")


def check_inputs(args: argparse.Namespace) -> None:
    """The files the flags name exist and open: ``--data-path`` (.bin/.idx) and ``--tokenizer-model``, the
    checkpoints of ``--load`` (unless ``--resume-if-exists``) and ``--moe-upcycle-from``. Called by the launcher
    before any process starts, and by the job."""
    from granular_moe.training.checkpoint import find_checkpoint, require_checkpoint
    from granular_moe.training.data import check_data_files

    check_data_files(args)
    if args.load is not None and not args.resume_if_exists:
        require_checkpoint(args.load)
    if args.resume_if_exists:
        if args.load is None:
            raise GranularMoEConfigError("--resume-if-exists needs --load (the folder to resume from when it has a "
                                         "checkpoint)")
        if not Path(args.load).exists() and Path(args.load).resolve() != Path(args.save).resolve():
            raise GranularMoEConfigError(
                f"--load {args.load}: no such folder (a typo?); with --resume-if-exists a --load other than --save "
                f"({args.save}) must exist; to start from scratch, drop --load and --resume-if-exists")
        find_checkpoint(args.load)  # a tracker that names no checkpoint is an error here too
    if args.moe_upcycle_from is not None:
        if not args.num_experts:
            raise GranularMoEConfigError("--moe-upcycle-from needs an MoE model: set --num-experts")
        require_checkpoint(args.moe_upcycle_from, "--moe-upcycle-from")


def check_schedule(args: argparse.Namespace) -> None:
    """Iteration counts, intervals and the learning-rate schedule Megatron-LM would also refuse."""
    for flag in ("--train-iters", "--eval-interval", "--log-interval", "--save-interval", "--lr-decay-iters"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            raise GranularMoEConfigError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        raise GranularMoEConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must lie in 0..--lr-decay-iters - 1 "
            f"(--lr-decay-iters {args.lr_decay_iters}, which defaults to --train-iters)"
        )
    if not 0 <= args.min_lr <= args.lr:
        raise GranularMoEConfigError(f"--min-lr {args.min_lr:g} must lie in 0..--lr {args.lr:g}")


@dataclass(frozen=True)
class ValueRange:
    """The values a numeric flag may take: from ``lowest`` to ``highest`` (None: no bound), each bound
    included unless excluded."""

    lowest: float
    highest: float | None = None
    lowest_excluded: bool = False
    highest_excluded: bool = False

    def problem(self, flag: str, value) -> str | None:
        """What is wrong with ``value`` for ``flag`` (None: nothing)."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        low = value <= self.lowest if self.lowest_excluded else value < self.lowest
        high = self.highest is not None and (value >= self.highest if self.highest_excluded else value > self.highest)
        if not (low or high):
            return None
        if self.highest is None:
            return f"{flag} must be {'>' if self.lowest_excluded else '>='} {self.lowest}, got {value}"
        return (f"{flag} must lie in {'(' if self.lowest_excluded else '['}{self.lowest}, {self.highest}"
                f"{')' if self.highest_excluded else ']'}, got {value}")


# What each numeric flag may be, checked alike on the command line and in --config (check_values). The
# iteration counts and intervals are checked by check_schedule, --moe-expert-capacity-factor by check_moe_flags,
# the parallel sizes and --moe-ranks-per-node by the layout (granular_moe.training.layout).
VALUE_RANGES = {
    **dict.fromkeys((
        "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--seq-length",
        "--max-position-embeddings", "--rotary-base", "--num-query-groups", "--kv-channels", "--q-lora-rank",
        "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim", "--v-head-dim", "--moe-router-topk",
        "--moe-ffn-hidden-size", "--moe-router-num-groups", "--moe-router-group-topk",
        "--moe-shared-expert-intermediate-size", "--moe-granularity", "--ddp-bucket-size",
        "--distributed-timeout-minutes", "--micro-batch-size", "--global-batch-size", "--vocab-size",
        "--corpus-max-bytes"), ValueRange(1)),
    **dict.fromkeys((
        "--num-experts", "--eval-iters", "--seed", "--lr", "--lr-warmup-init", "--weight-decay", "--clip-grad",
        "--init-method-std", "--moe-aux-loss-coeff", "--moe-z-loss-coeff", "--moe-router-bias-update-rate"),
        ValueRange(0)),
    **dict.fromkeys(("--hidden-dropout", "--attention-dropout", "--adam-beta1", "--adam-beta2"),
                    ValueRange(0, 1, highest_excluded=True)),
    **dict.fromkeys(("--norm-epsilon", "--adam-eps", "--moe-router-topk-scaling-factor"),
                    ValueRange(0, lowest_excluded=True)),
    "--rotary-percent": ValueRange(0, 1, lowest_excluded=True),
}


def check_values(args: argparse.Namespace) -> None:
    """Every numeric flag within its range (:data:`VALUE_RANGES`), whether it came from the command line or
    from ``--config``: one error naming each flag out of range, before any work."""
    problems = []
    for flag, allowed in VALUE_RANGES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        entries = [entry for entry in (value if isinstance(value, list) else [value])
                   if entry is not None and not isinstance(entry, bool)]
        problem = next((p for p in (allowed.problem(flag, entry) for entry in entries) if p is not None), None)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise GranularMoEConfigError("; ".join(problems))
