"""One training step of the main job's model on gloo processes equals the single-process step: data,
expert and pipeline parallelism (the last shows the router losses reach every stage's routers)."""

import re

import pytest
import torch

from distributed import run_distributed
from granular_moe.training.arguments import parse_args
from granular_moe.training.gradients import finalize_gradients
from granular_moe.training.model import build_model, transformer_config_from_args
from granular_moe.training.schedule import PipelineStage, forward_backward

VOCAB, SEQ, MICRO, MICRO_BATCHES = 64, 16, 2, 4
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
         "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--micro-batch-size", str(MICRO),
         "--moe-aux-loss-coeff", "0.1", "--moe-z-loss-coeff", "0.01", "--seed", "3"]


def micro_batches():
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MICRO, SEQ + 1), generator=generator)
    mask = (torch.rand(MICRO_BATCHES, MICRO, SEQ, generator=generator) > 0.1).float()
    return [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": m, "position_ids": torch.arange(SEQ).expand(MICRO, SEQ)}
        for t, m in zip(tokens, mask)
    ]


def global_name(name: str, layer_offset: int) -> str:
    """A stage's parameter name in the single-stage model (layers renumbered; the last stage's copy of
    the tied embedding is the embedding)."""
    name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    return "embedding.word_embeddings.weight" if name == "output_layer.weight" else name


def step_gradients(model, args, batches):
    stage = PipelineStage(model.config, SEQ, MICRO, torch.device("cpu"))
    loss = forward_backward(model, batches, stage)
    finalize_gradients(model)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def parallel_worker(rank, world_size, flags, state):
    from megatron.core import parallel_state, tensor_parallel

    from granular_moe.parallel import initialize_model_parallel

    args = parse_args(MODEL + flags)
    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.expert_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model = build_model(args, transformer_config_from_args(args), VOCAB)
    offset = parallel_state.get_pipeline_model_parallel_rank() * args.num_layers // args.pipeline_model_parallel_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = state[global_name(name, offset)]
            if name.endswith(("experts.weight1", "experts.weight2")):
                full = full[model.get_submodule(name.rsplit(".", 1)[0]).global_expert_ids]
            param.copy_(full)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    loss, grads = step_gradients(model, args, micro_batches()[dp_rank::dp_size])
    expert_ids = {n: m.global_expert_ids for n, m in model.named_modules() if hasattr(m, "global_expert_ids")}
    return {"loss": loss, "offset": offset, "grads": grads, "expert_ids": expert_ids}


@pytest.fixture(scope="module")
def reference(gloo_world):
    torch.manual_seed(0)
    args = parse_args(MODEL)
    model = build_model(args, transformer_config_from_args(args), VOCAB)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss, grads = step_gradients(model, args, micro_batches())
    return state, loss, grads


@pytest.mark.parametrize("flags", [
    [],  # data parallel 2
    ["--expert-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2"],
], ids=["dp2", "ep2", "pp2"])
def test_parallel_step_equals_single_process(reference, flags):
    state, reference_loss, reference_grads = reference
    results = run_distributed(parallel_worker, 2, flags, state)
    losses = [r["loss"] for r in results if r["loss"] is not None]
    data_parallel = "--pipeline-model-parallel-size" not in flags
    assert len(losses) == (2 if data_parallel else 1)
    torch.testing.assert_close(sum(losses) / len(losses), reference_loss, rtol=1e-5, atol=1e-6)
    seen = set()
    for result in results:
        for name, grad in result["grads"].items():
            expected = reference_grads[global_name(name, result["offset"])]
            module = name.rsplit(".", 1)[0]
            if module in result["expert_ids"]:
                expected = expected[result["expert_ids"][module]]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
            seen.add(global_name(name, result["offset"]))
    assert seen == set(reference_grads)  # every parameter of the model was compared somewhere
    routers = [n for n in reference_grads if n.endswith("router.weight")]
    assert len(routers) == 2 and all(reference_grads[n].abs().sum() > 0 for n in routers)


def tensor_parallel_worker(rank, world_size, sequence_parallel):
    from megatron.core import tensor_parallel

    from granular_moe.parallel import initialize_model_parallel

    args = parse_args(MODEL + ["--tensor-model-parallel-size", "2"]
                      + (["--sequence-parallel"] if sequence_parallel else []))
    initialize_model_parallel(2, 1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args, transformer_config_from_args(args), VOCAB)
    loss, grads = step_gradients(model, args, micro_batches())
    marked = {name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    return {"loss": loss, "grads": grads, "marked": marked}


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
