"""One training step of the main job's engine (megatron-core's DDP, optimizer and pipeline schedules) on gloo
processes equals the single-process step: data, expert and pipeline parallelism (1F1B, and interleaved 1F1B
on three stages), the distributed optimizer; tensor parallelism with and without sequence parallelism."""

import re

import pytest
import torch

from distributed import run_distributed
from granular_moe.training.arguments import parse_args

VOCAB, SEQ, MICRO, MICRO_BATCHES = 64, 16, 2, 4
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
         "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--micro-batch-size", str(MICRO),
         "--global-batch-size", str(MICRO * MICRO_BATCHES), "--moe-aux-loss-coeff", "0.1",
         "--moe-z-loss-coeff", "0.01", "--seed", "3", "--clip-grad", "0", "--train-iters", "10"]


def micro_batches(count=MICRO_BATCHES):
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (count, MICRO, SEQ + 1), generator=generator)
    mask = (torch.rand(count, MICRO, SEQ, generator=generator) > 0.1).float()
    return [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": m, "position_ids": torch.arange(SEQ).expand(MICRO, SEQ)}
        for t, m in zip(tokens, mask)
    ]


def global_name(name: str, layer_offset: int) -> str:
    """A chunk's parameter name in the single-chunk model (layers renumbered; the last stage's copy of the
    tied embedding is the embedding)."""
    name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    return "embedding.word_embeddings.weight" if name == "output_layer.weight" else name


def engine_step(flags, state=None, steps=1):
    """Build this rank's engine (weights from ``state`` when given), take ``steps`` training steps on this
    data-parallel rank's micro-batches; the losses, every parameter's reduced gradient (of the last step) by
    global name, and the routers' expert biases."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from granular_moe.parallel import initialize_model_parallel
    from granular_moe.training.engine import build_engine, train_step
    from granular_moe.training.layout import check_layout
    from granular_moe.training.model import build_model_chunks, transformer_config_from_args

    args = parse_args(MODEL + flags)
    layout = check_layout(args, torch.distributed.get_world_size())
    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.expert_model_parallel_size, virtual_pipeline=layout.virtual_pipeline,
                              ranks_per_node=layout.ranks_per_node)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    config = transformer_config_from_args(args)
    chunks = build_model_chunks(args, config, VOCAB)
    offsets = [get_transformer_layer_offset(config, vp_stage=chunk.vp_stage) for chunk in chunks]
    if state is not None:
        with torch.no_grad():
            for chunk, offset in zip(chunks, offsets):
                for name, param in chunk.named_parameters():
                    full = state[global_name(name, offset)]
                    if name.endswith(("experts.weight1", "experts.weight2")):
                        full = full[chunk.get_submodule(name.rsplit(".", 1)[0]).global_expert_ids]
                    param.copy_(full)
    initial = {} if state is not None else {
        global_name(n, offset): p.detach().clone() for chunk, offset in zip(chunks, offsets)
        for n, p in chunk.named_parameters()}
    engine = build_engine(args, config, VOCAB, chunks)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = micro_batches(args.global_batch_size // MICRO)[dp_rank::dp_size]
    losses = [train_step(engine, batches, torch.device("cpu")).loss for _ in range(steps)]
    grads, after, expert_ids = {}, {}, {}
    for chunk, offset in zip(engine.modules, offsets):
        for name, param in chunk.named_parameters():
            grads[global_name(name, offset)] = param.main_grad.clone()
            after[global_name(name, offset)] = param.detach().clone()
        expert_ids.update({global_name(n, offset): m.global_expert_ids for n, m in chunk.named_modules()
                           if hasattr(m, "global_expert_ids")})
    biases = {global_name(n, offset): b.clone() for chunk, offset in zip(engine.modules, offsets)
              for n, b in chunk.named_buffers() if n.endswith("expert_bias")}
    # all-to-all levels of the first MoE layer's dispatcher
    levels = 0
    dispatcher = next((m.dispatcher for chunk in engine.modules for m in chunk.modules() if hasattr(m, "dispatcher")),
                      None)
    while dispatcher is not None and hasattr(dispatcher, "inner"):
        levels, dispatcher = levels + 1, dispatcher.inner
    return {"loss": losses[-1], "losses": losses, "biases": biases, "grads": grads, "after": after,
            "all_to_all_levels": levels,
            "expert_ids": expert_ids, "weights": initial,
            "marked": {n for chunk in engine.modules for n, p in chunk.named_parameters()
                       if getattr(p, "sequence_parallel", False)}}


def parallel_worker(rank, world_size, flags, state, steps=1):
    return engine_step(flags, state, steps)


@pytest.mark.parametrize("world, flags", [
    (2, []),  # data parallel 2
    (2, ["--expert-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (3, ["--num-layers", "6", "--global-batch-size", str(6 * MICRO), "--pipeline-model-parallel-size", "3",
         "--num-layers-per-virtual-pipeline-stage", "1"]),
], ids=["dp2", "ep2", "pp2-1f1b", "pp3-interleaved"])
def test_parallel_step_equals_single_process(world, flags):
    six_layers = "--num-layers" in flags
    [single] = run_distributed(parallel_worker, 1, flags[:4] if six_layers else [], None)
    results = run_distributed(parallel_worker, world, flags, single["weights"])
    for result in results:
        torch.testing.assert_close(result["loss"], single["loss"], rtol=1e-6, atol=1e-7)
    seen = set()
    for result in results:
        for name, grad in result["grads"].items():
            expected = single["grads"][name]
            module = name.rsplit(".", 1)[0]
            if module in result["expert_ids"]:
                expected = expected[result["expert_ids"][module]]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
            seen.add(name)
    assert seen == set(single["grads"])  # every parameter of the model was compared somewhere
    routers = [n for n in single["grads"] if n.endswith("router.weight")]
    assert len(routers) == (6 if six_layers else 2) and all(single["grads"][n].abs().sum() > 0 for n in routers)


def test_distributed_optimizer_takes_the_same_step():
    """With the optimizer state sharded over the data-parallel ranks (experts over expert-data-parallel
    ranks), the updated weights equal those of the unsharded optimizer (whose gradients the test above
    checks against one process)."""
    [single] = run_distributed(parallel_worker, 1, [], None)
    plain = run_distributed(parallel_worker, 2, ["--expert-model-parallel-size", "2"], single["weights"])
    sharded = run_distributed(parallel_worker, 2, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
                              single["weights"])
    for unsharded, distributed in zip(plain, sharded):
        assert distributed["loss"] == unsharded["loss"]
        assert distributed["after"].keys() == unsharded["after"].keys()
        for name, weight in distributed["after"].items():
            torch.testing.assert_close(weight, unsharded["after"][name], rtol=1e-6, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
        moved = [name for name, weight in distributed["after"].items()
                 if "experts" not in name and not torch.equal(weight, single["weights"][name])]
        assert len(moved) == len([name for name in distributed["after"] if "experts" not in name])  # a real step


ROUTING = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
           "--moe-router-bias-update-rate", "0.05", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
           "--moe-shared-expert-intermediate-size", "24", "--moe-shared-expert-gate",
           "--moe-router-load-balancing-type", "seq_aux_loss", "aux_loss", "--moe-aux-loss-coeff", "0.01", "0.001"]


@pytest.mark.parametrize("world, flags", [
    (2, ["--expert-model-parallel-size", "2"]),
    # two nodes of two processes: the two-level all-to-all, routing limited to one node per token
    (4, ["--expert-model-parallel-size", "4", "--moe-ranks-per-node", "2", "--moe-router-num-groups", "2",
         "--moe-router-group-topk", "1"]),
], ids=["ep2", "ep4-two-nodes"])
def test_todays_routing_takes_the_same_steps_under_expert_parallelism(world, flags):
    """Sigmoid scores with the aux-loss-free expert bias, group-limited top-k, a gated shared expert and two
    balance losses: three steps under expert parallelism equal three steps of one process, and the bias,
    updated by megatron-core's finalize_model_grads from the loads of the whole step, is the same on every
    rank."""
    limits = flags[flags.index("--moe-router-num-groups"):] if "--moe-router-num-groups" in flags else []
    [single] = run_distributed(parallel_worker, 1, ROUTING + limits, None, 3)
    results = run_distributed(parallel_worker, world, ROUTING + flags, single["weights"], 3)
    assert [r["all_to_all_levels"] for r in results] == [2 if "--moe-ranks-per-node" in flags else 1] * world
    assert single["biases"] and all(bias.abs().sum() > 0 for bias in single["biases"].values())
    for result in results:
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-6)
        for name, bias in result["biases"].items():
            torch.testing.assert_close(bias, single["biases"][name], rtol=0, atol=1e-6)
        for name, grad in result["grads"].items():
            expected = single["grads"][name]
            module = name.rsplit(".", 1)[0]
            if module in result["expert_ids"]:
                expected = expected[result["expert_ids"][module]]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert any("shared_experts.gate_weight" in name for name in single["grads"])


def tensor_parallel_worker(rank, world_size, sequence_parallel):
    return engine_step(["--tensor-model-parallel-size", "2"] + (["--sequence-parallel"] if sequence_parallel else []))


def test_sequence_parallel_step_equals_the_tensor_parallel_step():
    """TP=2 with --sequence-parallel (megatron-core's torch norms made sequence-parallel, the CPU shims for
    its sequence-parallel communication) takes the same step as TP=2 without it, from the same seed."""
    plain_ranks = run_distributed(tensor_parallel_worker, 2, False)
    sharded_ranks = run_distributed(tensor_parallel_worker, 2, True)
    for plain, sharded in zip(plain_ranks, sharded_ranks):
        torch.testing.assert_close(sharded["loss"], plain["loss"], rtol=1e-6, atol=1e-7)
        assert sharded["grads"].keys() == plain["grads"].keys()
        for name, grad in sharded["grads"].items():
            torch.testing.assert_close(
                grad, plain["grads"][name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
            )
        norms = {name for name in sharded["grads"] if "layernorm" in name}
        assert norms and norms <= sharded["marked"] and not plain["marked"] & norms


def test_a_router_that_sees_nan_is_named_by_the_step_check():
    """The layers read nothing back per forward; the step's check (before megatron-core's gradient check) names
    the first MoE layer whose router saw NaN, on every rank of an EP 2 job."""
    [single] = run_distributed(parallel_worker, 1, [], None)
    state = dict(single["weights"])
    name = "decoder.layers.1.mlp.router.weight"
    state[name] = torch.full_like(state[name], float("nan"))
    with pytest.raises(AssertionError) as failure:
        run_distributed(parallel_worker, 2, ["--expert-model-parallel-size", "2"], state)
    tokens = MICRO * MICRO_BATCHES * SEQ  # the global batch: every token, summed over both ranks
    assert (f"RouterLogitsError: router logits of MoE layer 2 held NaN/Inf for {tokens} of the {tokens} tokens"
            in str(failure.value))


@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "selective", "--recompute-modules", "moe", "moe_act", "shared_experts", "core_attn"],
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
], ids=["selective-moe", "full"])
def test_recompute_takes_the_same_steps(recompute):
    """megatron-core's activation recompute over the granular layer at EP 2 (the all-to-alls run again in the
    backward): three steps with today's routing (expert bias, two balance losses, a gated shared expert) give the
    same losses, gradients and biases as without it; the router's losses are attached and its loads counted
    once."""
    flags = ROUTING + ["--expert-model-parallel-size", "2"]
    plain = run_distributed(parallel_worker, 2, flags, None, 3)
    again = run_distributed(parallel_worker, 2, flags + recompute, None, 3)
    for expected, result in zip(plain, again):
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-6)
        for name, bias in result["biases"].items():
            torch.testing.assert_close(bias, expected["biases"][name], rtol=0, atol=1e-6)
        assert result["grads"].keys() == expected["grads"].keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected["grads"][name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
