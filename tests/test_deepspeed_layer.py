"""GranularMoE as a drop-in for DeepSpeed's ``deepspeed.moe.layer.MoE``: the same output, l_aux and expert counts as
``MoE`` at granularity 1 (dropless); DeepSpeed's capacity rule with min_capacity; used tokens; the per-sequence loss at
either layout; Residual MoE; the state dict in ``MoE``'s layout; the aux-loss-free bias update as megatron-core's;
bad arguments refused by name before anything is built."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # noqa: E402  (before DeepSpeed's first import)

import math

import pytest
import torch

from granular_moe.config import GranularMoEConfigError
from granular_moe.parallel import ParallelLayoutError

HIDDEN, FFN = 16, 32


@pytest.fixture
def ds_world(gloo_world):
    from granular_moe.deepspeed.groups import ensure_deepspeed_comm

    ensure_deepspeed_comm()


def gelu_expert(dtype=torch.float64):
    return torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(FFN, HIDDEN, bias=False)).to(dtype)


def granular(expert=FFN, **kwargs):
    from granular_moe.deepspeed import GranularMoE

    return GranularMoE(HIDDEN, expert, **{"num_experts": 4, "kernels": "torch", "params_dtype": torch.float64,
                                          **kwargs})


@pytest.mark.parametrize("k", [1, 2, 3])
def test_equals_deepspeed_moe_at_granularity_1(ds_world, k):
    from deepspeed.moe.layer import MoE

    torch.manual_seed(k)
    expert = gelu_expert()
    theirs = MoE(HIDDEN, expert, num_experts=4, k=k, drop_tokens=False, use_rts=False,
                 top2_2nd_expert_sampling=False).double()
    theirs.set_deepspeed_parallelism()
    ours = granular(expert, k=k, drop_tokens=False)
    with torch.no_grad():
        for index, module in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):
            module[0].weight.normal_(0, 0.3)
            module[2].weight.normal_(0, 0.3)
            ours.deepspeed_moe.experts.weight1[index].copy_(module[0].weight.t())
            ours.deepspeed_moe.experts.weight2[index].copy_(module[2].weight.t())
        ours.deepspeed_moe.router.weight.copy_(theirs.deepspeed_moe.gate.wg.weight)
    x = torch.randn(3, 7, HIDDEN, dtype=torch.float64)
    out, l_aux, counts = theirs(x)
    got_out, got_l_aux, got_counts = ours(x)
    torch.testing.assert_close(got_out, out, rtol=1e-5, atol=1e-6)  # DeepSpeed's gate computes in fp32
    assert torch.equal(got_counts.cpu(), counts.cpu())
    if k != 2:  # MoE's top-2 loss counts each token's first expert only; top-1 and top-k > 2 count all k
        torch.testing.assert_close(got_l_aux.float(), l_aux.float(), rtol=1e-6, atol=0)


def test_capacity_follows_deepspeed_rule_with_min_capacity(ds_world):
    """Each expert keeps at most max(ceil(T k factor / E), min_capacity) assignments: capacity_factor in training,
    eval_capacity_factor in eval mode."""
    layer = granular(k=1, granularity=2, capacity_factor=0.25, eval_capacity_factor=0.5, min_capacity=5)
    with torch.no_grad():  # every token prefers expert 3 most
        layer.deepspeed_moe.router.weight.zero_()
        layer.deepspeed_moe.router.weight[3, 0] = 10.0
    x = torch.randn(40, HIDDEN, dtype=torch.float64)
    x[:, 0] = 1.0
    experts, topk = 8, 2
    for training, factor in ((True, 0.25), (False, 0.5)):
        layer.train(training)
        _, _, counts = layer(x)
        capacity = max(math.ceil(40 * topk * factor / experts), 5)
        assert counts.max().item() == counts[3].item() == capacity, (training, counts)
    layer.train(True)
    _, _, counts = layer(x[:8])  # ceil(8 * 2 * 0.25 / 8) = 1 < min_capacity 5
    assert counts[3].item() == 5


def test_used_token_leaves_padding_out_of_l_aux(ds_world):
    torch.manual_seed(0)
    layer = granular(k=2, granularity=2, drop_tokens=False)
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    used = torch.ones(2, 6)
    used[1, 3:] = 0
    out, l_aux, _ = layer(x, used_token=used)
    kept = torch.cat([x[0], x[1, :3]])
    kept_out, kept_l_aux, _ = layer(kept)
    torch.testing.assert_close(l_aux, kept_l_aux)
    torch.testing.assert_close(torch.cat([out[0], out[1, :3]]), kept_out)


def test_sequence_loss_reads_either_layout(ds_world):
    torch.manual_seed(0)
    batch_first = granular(k=2, aux_loss_type="seq_aux_loss", drop_tokens=False)
    sequence_first = granular(k=2, aux_loss_type="seq_aux_loss", drop_tokens=False, sequence_first=True)
    sequence_first.load_state_dict(batch_first.state_dict())
    x = torch.randn(3, 5, HIDDEN, dtype=torch.float64)  # [b, s, h]
    out, l_aux, _ = batch_first(x)
    out_t, l_aux_t, _ = sequence_first(x.transpose(0, 1).contiguous())
    torch.testing.assert_close(out_t.transpose(0, 1), out)
    torch.testing.assert_close(l_aux_t, l_aux)
    batch_loss = granular(k=2, drop_tokens=False)
    batch_loss.load_state_dict(batch_first.state_dict())
    assert not torch.allclose(batch_loss(x)[1], l_aux)  # per sequence is not per micro-batch


def test_residual_moe_mixes_the_mlp_by_its_coefficient(ds_world):
    torch.manual_seed(0)
    expert = gelu_expert()
    layer = granular(expert, k=1, use_residual=True, drop_tokens=False)
    plain = granular(expert, k=1, drop_tokens=False)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith("deepspeed_moe.")})
    x = torch.randn(4, HIDDEN, dtype=torch.float64)
    coefficient = torch.softmax(layer.coefficient(x), dim=-1)
    expected = plain(x)[0] * coefficient[:, :1] + expert(x) * coefficient[:, 1:]
    torch.testing.assert_close(layer(x)[0], expected)


def test_state_dict_has_deepspeed_moe_layout_and_loads_back(ds_world):
    torch.manual_seed(0)
    layer = granular(k=2, granularity=2, score_function="sigmoid", expert_bias=True, shared_expert_size=8,
                     aux_loss_type="none")
    state = layer.state_dict()
    experts = [f"deepspeed_moe.experts.deepspeed_experts.{i}.weight{w}" for w in (1, 2) for i in range(8)]
    assert set(experts) <= set(state)
    assert state["deepspeed_moe.experts.deepspeed_experts.5.weight1"].shape == (HIDDEN, 2 * FFN // 2)
    # DeepSpeed's engine puts every key holding "expert" but the gate's into the per-expert files
    others = [key for key in state if key not in experts]
    assert "deepspeed_moe.gate.wg.weight" in others and "deepspeed_moe.gate.e_score_correction_bias" in others
    assert all("expert" not in key or "moe.gate.wg.weight" in key for key in others), others
    copy = granular(k=2, granularity=2, score_function="sigmoid", expert_bias=True, shared_expert_size=8,
                    aux_loss_type="none")
    copy.load_state_dict(state)
    for (name, value), (_, loaded) in zip(layer.named_parameters(), copy.named_parameters()):
        assert torch.equal(value, loaded), name
    x = torch.randn(5, HIDDEN, dtype=torch.float64)
    assert torch.equal(layer(x)[0], copy(x)[0])


def test_expert_bias_update_is_megatron_cores(ds_world):
    """bias += rate * sign(mean load - load) from the loads of the step's micro-batches, then the loads clear."""
    from granular_moe.deepspeed import update_expert_bias

    torch.manual_seed(0)
    layer = granular(k=2, granularity=2, score_function="sigmoid", expert_bias=True, bias_update_rate=0.1,
                     aux_loss_type="none", drop_tokens=False)
    loads = torch.zeros(8)
    for _ in range(2):
        _, _, counts = layer(torch.randn(6, HIDDEN, dtype=torch.float64))
        loads += counts
    assert update_expert_bias(layer) == 1
    router = layer.deepspeed_moe.router
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(loads.mean() - loads))
    assert router.local_tokens_per_expert.abs().sum() == 0
    layer.eval()
    layer(torch.randn(6, HIDDEN, dtype=torch.float64))
    assert update_expert_bias(layer) == 0  # eval mode: no loads, no update


def test_granularity_cuts_the_expert_module(ds_world):
    """From an expert module at granularity G, with the router's rows repeated G times (all pieces of an expert score
    alike), the layer computes what it computes at granularity 1."""
    torch.manual_seed(0)
    expert = gelu_expert()
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.normal_(0, 0.3)
    whole = granular(expert, k=2, drop_tokens=False)
    cut = granular(expert, k=2, granularity=4, drop_tokens=False)
    with torch.no_grad():
        cut.deepspeed_moe.router.weight.copy_(whole.deepspeed_moe.router.weight.repeat_interleave(4, dim=0))
    x = torch.randn(9, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(cut(x)[0], whole(x)[0])


REFUSED = [
    (dict(k=5), GranularMoEConfigError, "k 5 is above num_experts 4; valid values: 1..4"),
    (dict(granularity=3), GranularMoEConfigError, "granularity 3 does not divide the expert FFN hidden size 32"),
    (dict(ep_size=3), GranularMoEConfigError, "ep_size 3 does not divide the 4 experts"),
    (dict(ep_size=2), ParallelLayoutError, "ep_size 2 does not divide the 1 processes of the world; valid values: 1"),
    (dict(use_rts=True), GranularMoEConfigError, "use_rts=True"),
    (dict(noisy_gate_policy="Jitter"), GranularMoEConfigError, "noisy_gate_policy 'Jitter'"),
    (dict(top2_2nd_expert_sampling=True), GranularMoEConfigError, "top2_2nd_expert_sampling=True"),
    (dict(expert_bias=True), GranularMoEConfigError, "expert_bias=True needs score_function 'sigmoid'"),
    (dict(num_groups=3, group_topk=1), GranularMoEConfigError, "num_groups 3 must divide the 4 experts"),
    (dict(router_type="expert_choice"), None, None),
    (dict(router_type="expert_choice", aux_loss_type="aux_loss"), GranularMoEConfigError,
     "aux_loss_type 'aux_loss' (valid: 'none')"),
    (dict(activation="tanh"), GranularMoEConfigError, "activation 'tanh' is not valid"),
    (dict(aux_loss_type="global_aux_loss"), GranularMoEConfigError, "aux_loss_type 'global_aux_loss' is not valid"),
    (dict(expert=torch.nn.Conv1d(16, 16, 1)), GranularMoEConfigError, "expert: a Conv1d module is not supported"),
    (dict(expert=torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN))),
     GranularMoEConfigError, "expert[0] must be nn.Linear without bias"),
]


@pytest.mark.parametrize("kwargs, error, message", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_bad_arguments_are_refused_by_name(ds_world, kwargs, error, message):
    from granular_moe.deepspeed.groups import _BUILT

    kwargs = {"expert": FFN, "k": 2, **kwargs}
    if error is None:  # expert choice with its defaults builds
        granular(**kwargs)(torch.randn(4, HIDDEN, dtype=torch.float64))
        return
    built = dict(_BUILT)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        granular(**kwargs)
    assert _BUILT == built  # nothing built: no expert groups created


def test_expert_parallel_size_needs_a_world(monkeypatch):
    """Without torch.distributed only one process: ep_size > 1 is refused by name."""
    from granular_moe.deepspeed import groups

    monkeypatch.setattr(groups.dist, "is_initialized", lambda: False)
    with pytest.raises(ParallelLayoutError, match="ep_size 2 needs torch.distributed initialised"):
        granular(k=2, ep_size=2)
