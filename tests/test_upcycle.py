"""Upcycling a dense checkpoint into a granular MoE model (``--moe-upcycle-from``): the experts and router are
megatron-core's conversion; with an activation the weight scale commutes with (ReLU) the upcycled model computes
the dense model exactly, also at EP 2, TP 2 and PP 2; top-1 routing without granularity scales the FFN by
``E * p_top``; a checkpoint that cannot be upcycled is refused by name; the main job starts from one."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from granular_moe.training.arguments import parse_args
from granular_moe.training.checkpoint import CheckpointError, TrainingState, save_checkpoint
from granular_moe.training.model import padded_vocab_size, transformer_config_from_args
from granular_moe.training.upcycle import (
    expert_weight_scale,
    moe_activation_scale,
    upcycled_chunks,
    upcycled_expert_weights,
    upcycled_router_weight,
)

VOCAB, SEQ, BATCH = 256, 8, 2  # 256: the same padded vocabulary at TP 1 and 2
DENSE = ["--num-layers", "2", "--hidden-size", "16", "--ffn-hidden-size", "32", "--num-attention-heads", "2",
         "--seq-length", str(SEQ), "--micro-batch-size", str(BATCH), "--fp32"]


def moe_flags(experts, topk, granularity, upcycle_from=None):
    flags = ["--num-experts", str(experts), "--moe-router-topk", str(topk), "--moe-granularity", str(granularity)]
    return flags + (["--moe-upcycle-from", str(upcycle_from)] if upcycle_from is not None else [])


def job_args(flags):
    args = parse_args(flags)
    args.global_batch_size = args.micro_batch_size
    args.padded_vocab_size = padded_vocab_size(VOCAB, args.tensor_model_parallel_size)
    return args


def relu_config(args):
    """The job's config with ReLU experts in float64: the activation the upcycling scale is exact for."""
    return dataclasses.replace(transformer_config_from_args(args), activation_func=F.relu,
                               params_dtype=torch.float64, pipeline_dtype=torch.float64)


@pytest.fixture
def float64():
    """Float64 throughout (megatron-core's torch norms and position embeddings take torch's default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def save_dense(directory, flags, seed=0):
    """A dense ReLU float64 model of the main job, saved as the job saves; returns the model."""
    from granular_moe.training.engine import build_engine

    args = job_args(DENSE + flags)
    torch.manual_seed(seed)
    engine = build_engine(args, relu_config(args), VOCAB)
    save_checkpoint(directory, TrainingState(1, BATCH), engine, args)
    return engine.modules[0]


def batch(seed=0):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ), torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)


@torch.no_grad()
def logits(model, seed=0):
    model.eval()
    return model(*batch(seed))


def upcycled(flags, seed=7, upcycle=True):
    """The job's model of these flags (ReLU, float64), upcycled (else as initialised)."""
    from megatron.core import tensor_parallel

    from granular_moe.training.model import build_model_chunks

    args = job_args(DENSE + flags)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    (model,) = (upcycled_chunks if upcycle else build_model_chunks)(args, relu_config(args), VOCAB)
    return model


# --------------------------------------------------------------------------- the conversion


@pytest.mark.parametrize("swiglu", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("experts, topk, granularity", [(4, 1, 2), (2, 2, 4), (4, 1, 1), (4, 2, 1)])
def test_experts_and_router_are_megatron_cores_upcycling(gloo_world, swiglu, experts, topk, granularity):
    """megatron-core's ``_convert_to_moe_state_dict`` on its own dense and MoE GPTs gives the same experts (up
    to float32 rounding: ours are scaled in float64) and the same router."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.upcycling_utils import _convert_to_moe_state_dict
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, add_bias_linear=False,
                  use_cpu_initialization=True, gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu)
    total = experts * granularity
    moe_config = TransformerConfig(**common, num_moe_experts=total, moe_router_topk=topk * granularity,
                                   moe_ffn_hidden_size=32 // granularity,
                                   moe_router_pre_softmax=topk * granularity == 1)
    torch.manual_seed(0)
    dense = GPTModel(TransformerConfig(**common), get_gpt_layer_local_spec(), VOCAB, SEQ)
    moe = GPTModel(moe_config, get_gpt_layer_local_spec(num_experts=total), VOCAB, SEQ)
    expected = _convert_to_moe_state_dict(moe, dense)

    mlp = dense.decoder.layers[0].mlp
    weight1, weight2 = upcycled_expert_weights(mlp.linear_fc1.weight, mlp.linear_fc2.weight, moe_config,
                                               granularity, range(total))
    assert weight1.shape == (total, 16, (2 if swiglu else 1) * 32 // granularity)
    for expert in range(total):
        prefix = f"decoder.layers.0.mlp.experts.local_experts.{expert}."
        torch.testing.assert_close(weight1[expert].t(), expected[prefix + "linear_fc1.weight"], rtol=1e-6, atol=0)
        torch.testing.assert_close(weight2[expert].t(), expected[prefix + "linear_fc2.weight"], rtol=1e-6, atol=0)
    router = upcycled_router_weight(moe.decoder.layers[0].mlp.router.weight, granularity)
    assert torch.equal(router, expected["decoder.layers.0.mlp.router.weight"])
    renormalising = topk * granularity > 1
    assert moe_activation_scale(moe_config, granularity) == (granularity if renormalising else experts)
    root = 3 if swiglu else 2
    assert expert_weight_scale(moe_config, granularity) == pytest.approx(moe_activation_scale(moe_config, granularity)
                                                                         ** (1 / root))


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("variant", [
    [],
    ["--swiglu"],
    ["--moe-layer-freq", "[0,1]", "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm",
     "--position-embedding-type", "rope"],
], ids=["relu", "relu-glu", "freq-untied-rmsnorm-rope"])
def test_upcycled_model_computes_the_dense_model_exactly(gloo_world, float64, tmp_path, variant):
    """ReLU experts, a router that renormalises (top-k * G > 1): the logits at step 0 are the dense model's to
    float64 rounding, for G in {2, 4} at base top-1 and top-2, and for G = 1 at top-2; with SwiGLU's halves
    (ReLU-gated), with --moe-layer-freq keeping a layer dense, untied output weights, RMSNorm and RoPE."""
    dense = save_dense(tmp_path, variant)
    expected = logits(dense)
    for experts, topk, granularity in [(4, 1, 2), (4, 2, 2), (4, 1, 4), (2, 2, 4), (4, 2, 1)]:
        model = upcycled(variant + moe_flags(experts, topk, granularity, tmp_path))
        drawn_next = torch.randn(4)
        got = logits(model)
        assert (got - expected).abs().max() < 1e-10, (experts, topk, granularity)
        layers = [layer.mlp for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
        assert len(layers) == (1 if "--moe-layer-freq" in variant else 2)
        assert layers[0].experts.weight1.shape[0] == experts * granularity
        # the same model not upcycled computes something else; upcycling left the random streams as building it does
        fresh = upcycled(variant + moe_flags(experts, topk, granularity), upcycle=False)
        assert torch.equal(torch.randn(4), drawn_next)
        assert (logits(fresh) - expected).abs().max() > 1e-3


def test_top1_without_granularity_scales_the_ffn_by_experts_times_top_probability(gloo_world, float64, tmp_path):
    """G = 1, top-1: the router keeps the raw probability, so the scale is megatron-core's pre-softmax one, E;
    the layer computes ``E * p_top(x) * FFN(x)``, the dense FFN only where the router is uniform (its
    expectation at initialisation), not exactly."""
    experts = 4
    dense = save_dense(tmp_path, [])
    model = upcycled(moe_flags(experts, 1, 1, tmp_path))
    x = torch.randn(SEQ, BATCH, 16, generator=torch.Generator().manual_seed(3))
    dense_mlp, moe = dense.decoder.layers[0].mlp, model.decoder.layers[0].mlp
    with torch.no_grad():
        ffn, out = dense_mlp(x)[0], moe(x)[0]
        top = torch.softmax(x.reshape(-1, 16) @ moe.router.weight.t(), dim=-1).max(dim=-1).values.view(SEQ, BATCH, 1)
    torch.testing.assert_close(out, experts * top * ffn, rtol=1e-12, atol=1e-12)
    assert bool((experts * top > 1).all())
    assert (logits(model) - logits(dense)).abs().max() > 1e-4
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.mlp.router.weight.zero_()  # uniform router: p_top = 1 / E
    assert (logits(model) - logits(dense)).abs().max() < 1e-10


# name: (flag, keyword of granular_moe.parallel.initialize_model_parallel)
LAYOUTS = {"ep2": ("--expert-model-parallel-size", "expert"), "tp2": ("--tensor-model-parallel-size", "tensor"),
           "pp2": ("--pipeline-model-parallel-size", "pipeline")}


def upcycled_at_other_layouts(rank, world_size, directory, flags):
    """This rank's upcycled model at EP 2 (logits, expert ids and weights), TP 2 (its vocabulary shard of the
    logits), then PP 2 (its stage's state)."""
    from megatron.core import tensor_parallel

    from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel

    torch.set_default_dtype(torch.float64)
    results = {}
    for name, (flag, keyword) in LAYOUTS.items():
        initialize_model_parallel(**{keyword: 2})
        args = job_args(DENSE + flags + ["--moe-upcycle-from", str(directory), flag, "2"])
        torch.manual_seed(7)
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        (model,) = upcycled_chunks(args, relu_config(args), VOCAB)
        if name == "ep2":
            experts = model.decoder.layers[1].mlp.experts
            results[name] = (logits(model), experts.global_expert_ids.tolist(), experts.weight1.detach().clone())
        elif name == "tp2":
            results[name] = logits(model)
        else:
            results[name] = {key: value.clone() for key, value in model.state_dict().items() if torch.is_tensor(value)}
        destroy_model_parallel()
    return results


def test_upcycling_at_other_layouts_equals_the_single_process_one(gloo_world, float64, tmp_path):
    """Two expert-parallel ranks each convert their half of the experts: the model computes what the
    single-process upcycled model (and the dense model) computes; so does it at TP 2 (each rank its half of
    the vocabulary). Two pipeline stages each hold their layers of it (the routers are each stage's own random
    ones, shared within each group of G experts)."""
    flags = ["--swiglu"] + moe_flags(4, 1, 2)
    dense = save_dense(tmp_path, ["--swiglu"])
    single = upcycled(flags + ["--moe-upcycle-from", str(tmp_path)])
    expected = logits(single)
    assert (expected - logits(dense)).abs().max() < 1e-10
    results = run_distributed(upcycled_at_other_layouts, 2, tmp_path, flags)
    whole = single.decoder.layers[1].mlp.experts.weight1
    for rank, result in enumerate(results):
        got, ids, weight1 = result["ep2"]
        assert ids == list(range(4 * rank, 4 * rank + 4))
        assert torch.equal(weight1, whole[4 * rank: 4 * rank + 4])
        assert (got - expected).abs().max() < 1e-10, rank
        half = VOCAB // 2
        assert (result["tp2"] - expected[..., rank * half: (rank + 1) * half]).abs().max() < 1e-10, rank

    single_state = single.state_dict()
    stages = [result["pp2"] for result in results]
    assert "embedding.word_embeddings.weight" in stages[0] and "output_layer.weight" in stages[1]
    for stage, state in enumerate(stages):
        for key, value in state.items():
            if key.endswith("router.weight"):
                assert torch.equal(value, value[torch.arange(8) // 2 * 2]), key
                continue
            original = "embedding.word_embeddings.weight" if key == "output_layer.weight" else key.replace(
                "decoder.layers.0.", f"decoder.layers.{stage}.")
            assert torch.equal(value, single_state[original]), key


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.mark.parametrize("case, flags, message", [
    ("moe", moe_flags(2, 1, 2), "the checkpoint is of an MoE model (--num-experts 2 at --moe-granularity 2); "
                                "upcycling starts from a dense one"),
    ("hidden", ["--hidden-size", "32"] + moe_flags(2, 1, 2), "--hidden-size: dense checkpoint 16, this job 32"),
    ("ffn", ["--ffn-hidden-size", "64"] + moe_flags(2, 1, 2),
     "--ffn-hidden-size: dense checkpoint 32, this job's experts --moe-granularity 2 x 32 = 64"),
    ("swiglu", ["--swiglu"] + moe_flags(2, 1, 2), "--swiglu: dense checkpoint False, this job True"),
    ("expert-choice", ["--moe-router-type", "expert_choice"] + moe_flags(2, 1, 2),
     "--moe-upcycle-from needs --moe-router-type token_choice, got 'expert_choice'"),
    ("absent", moe_flags(2, 1, 2), "absent: no such folder"),
])
def test_what_cannot_be_upcycled_is_refused_by_name(gloo_world, checkpoints, case, flags, message):
    from granular_moe.training.engine import build_engine

    directory = checkpoints / {"moe": "moe", "absent": "absent"}.get(case, "dense")
    if case == "moe" and not directory.exists():
        args = job_args(DENSE + moe_flags(2, 1, 2))
        save_checkpoint(directory, TrainingState(1, BATCH), build_engine(args, transformer_config_from_args(args),
                                                                         VOCAB), args)
    elif case != "absent" and not directory.exists():
        args = job_args(DENSE)
        save_checkpoint(directory, TrainingState(1, BATCH), build_engine(args, transformer_config_from_args(args),
                                                                         VOCAB), args)
    args = job_args(DENSE + flags + ["--moe-upcycle-from", str(directory)])
    with pytest.raises(CheckpointError, match=re.escape(message)) as raised:
        upcycled_chunks(args, transformer_config_from_args(args), VOCAB)
    assert "--moe-upcycle-from" in str(raised.value)


# --------------------------------------------------------------------------- the main job

TINY = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--swiglu", "--micro-batch-size", "4", "--corpus-max-bytes", "300000",
        "--eval-iters", "1", "--log-interval", "1", "--seed", "5"]
EXPERTS, TOPK, GRANULARITY = 2, 1, 4


def dense_then_upcycled_job(rank, world_size, dense_save, moe_save):
    from granular_moe.parallel import destroy_model_parallel
    from granular_moe.training.pretrain import pretrain

    dense = pretrain(parse_args(TINY + ["--tensor-model-parallel-size", "2", "--train-iters", "3",
                                        "--save", str(dense_save)]))
    destroy_model_parallel()
    # the first iteration runs at --lr-warmup-init 0 and changes no weight: its checkpoint holds the upcycled model
    moe = pretrain(parse_args(TINY + moe_flags(EXPERTS, TOPK, GRANULARITY, dense_save) + [
        "--expert-model-parallel-size", "2", "--train-iters", "2", "--lr-warmup-iters", "1", "--save-interval", "1",
        "--save", str(moe_save)]))
    destroy_model_parallel()
    return dense, moe


def read_tensors(directory, keys):
    """Whole tensors of a torch_dist checkpoint, read with torch's own reader (no process group)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(tuple(metadata[key].size), dtype=metadata[key].properties.dtype) for key in keys}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def test_the_main_job_starts_from_a_dense_checkpoint_of_another_layout(tmp_path):
    """A SwiGLU dense job at TP 2 trains and saves; the MoE job upcycles it at EP 2 (TP 1), trains and saves:
    its experts are the dense FFN's slices times G^(1/3), its router rows equal within each group of G, the
    rest is the dense checkpoint's."""
    dense_save, moe_save = tmp_path / "dense", tmp_path / "moe"
    (dense, moe), _ = run_distributed(dense_then_upcycled_job, 2, dense_save, moe_save)
    assert dense["iteration"] == 3 and moe["iteration"] == 2
    assert 0 < moe["loss"] < 10 and (moe_save / "iter_0000002").is_dir()

    layers, ffn, width, total = 2, 64, 64 // GRANULARITY, EXPERTS * GRANULARITY
    shared = ["embedding.word_embeddings.weight", "decoder.layers.self_attention.linear_qkv.weight",
              "decoder.layers.mlp.linear_fc1.layer_norm_weight"]  # the MoE layers' pre-MLP norm is saved as Megatron's
    before = read_tensors(dense_save / "iter_0000003", shared + ["decoder.layers.mlp.linear_fc1.weight",
                                                                  "decoder.layers.mlp.linear_fc2.weight"])
    after = read_tensors(moe_save / "iter_0000001", shared + ["decoder.layers.mlp.experts.weight1",
                                                              "decoder.layers.mlp.experts.weight2",
                                                              "decoder.layers.mlp.router.weight"])
    for key in shared:
        assert torch.equal(after[key], before[key]), key
    scale = GRANULARITY ** (1 / 3)  # renormalised top-(k*G) routing, gated unit
    assert after["decoder.layers.mlp.experts.weight1"].shape == (layers, total, 32, 2 * width)
    for layer in range(layers):
        fc1 = before["decoder.layers.mlp.linear_fc1.weight"][layer].double()
        fc2 = before["decoder.layers.mlp.linear_fc2.weight"][layer].double()
        for expert in range(total):
            rows = slice(expert % GRANULARITY * width, (expert % GRANULARITY + 1) * width)
            expected1 = (torch.cat([fc1[:ffn][rows], fc1[ffn:][rows]]).t() * scale).float()
            expected2 = (fc2[:, rows].t() * scale).float()
            assert torch.equal(after["decoder.layers.mlp.experts.weight1"][layer, expert], expected1), (layer, expert)
            assert torch.equal(after["decoder.layers.mlp.experts.weight2"][layer, expert], expected2), (layer, expert)
        router = after["decoder.layers.mlp.router.weight"][layer]
        assert router.shape == (total, 32)
        assert torch.equal(router, router[torch.arange(total) // GRANULARITY * GRANULARITY])
        assert not torch.equal(router[0], router[GRANULARITY])
