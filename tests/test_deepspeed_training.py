"""GranularMoE trained by ``deepspeed.initialize`` on gloo CPU processes (DeepSpeed's CPU accelerator): ZeRO 0, 1 and
2 at DP 2 x EP 2 and at EP 4 equal one process for a few steps (losses, every weight, the expert biases), gradient
accumulation and clipping included; DeepSpeed checkpoints resume identically and load their module weights at another
expert-parallel size; bf16 runs; ZeRO 3 is refused by DeepSpeed."""

import pytest
import torch

from deepspeed_cases import training_worker
from distributed import run_distributed

STEPS = 3
# fp32 on both sides: DeepSpeed reduces fp16 / bf16 / fp32 gradients only; sums in another order round differently
LOSS_TOLERANCE = dict(rtol=1e-6, atol=1e-7)
WEIGHT_TOLERANCE = dict(rtol=2e-5, atol=2e-6)
BF16_TOLERANCE = dict(rtol=1e-2, atol=1e-3)

REFERENCE_RUNS = [dict(ep=1, stage=stage, steps=STEPS) for stage in (0, 1, 2)] + [
    dict(ep=1, stage=2, steps=STEPS, bf16=True),
    dict(ep=1, stage=3, refused=True),
]
LAYOUT_RUNS = [  # world 4: DP 2 x EP 2, then EP 4
    dict(ep=2, stage=0, steps=STEPS),
    dict(ep=2, stage=1, steps=STEPS),
    dict(ep=2, stage=2, steps=STEPS, resume_at=2),
    dict(ep=4, stage=0, steps=STEPS),
    dict(ep=4, stage=1, steps=STEPS, resume_at=2),
    dict(ep=4, stage=2, steps=STEPS),
    dict(ep=4, stage=2, steps=0, load_from=2),  # the EP 2 run's checkpoint at EP 4
    dict(ep=2, stage=2, steps=STEPS, bf16=True),
    dict(ep=4, stage=2, steps=STEPS, ranks_per_node=2),  # EP 4 over 2 "nodes" of 2: the two-level all-to-all
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reference = run_distributed(training_worker, 1, REFERENCE_RUNS)[0]
    layouts = run_distributed(training_worker, 4, LAYOUT_RUNS, str(tmp_path_factory.mktemp("deepspeed_checkpoints")))
    return reference, layouts


def assert_weights_close(got_by_rank, expected, **tolerance):
    """Every rank's weights (its experts by global index) against one process's."""
    for got in got_by_rank:
        assert set(got) == set(expected)
        for name, value in got.items():
            if isinstance(value, dict):
                for expert, tensor in value.items():
                    torch.testing.assert_close(tensor, expected[name][expert], **tolerance, msg=f"{name}[{expert}]")
            else:
                torch.testing.assert_close(value, expected[name], **tolerance, msg=name)


def every_expert(got_by_rank, name):
    experts = {}
    for got in got_by_rank:
        experts.update(got[name])
    return experts


EQUAL_RUNS = [0, 1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("index", EQUAL_RUNS, ids=[
    f"ep{r['ep']}-zero{r['stage']}" + ("-2nodes" if r.get("ranks_per_node") else "")
    for r in (LAYOUT_RUNS[i] for i in EQUAL_RUNS)])
def test_layouts_equal_one_process(runs, index):
    reference, layouts = runs
    run = LAYOUT_RUNS[index]
    expected = reference[run["stage"]]
    got = [rank_results[index] for rank_results in layouts]
    assert all(rank["nodes"] == (2 if run.get("ranks_per_node") else 1) for rank in got)
    for rank in got:
        torch.testing.assert_close(rank["losses"], expected["losses"], **LOSS_TOLERANCE)
    assert_weights_close([rank["weights"] for rank in got], expected["weights"], **WEIGHT_TOLERANCE)
    for name, value in expected["weights"].items():
        if isinstance(value, dict):  # the ranks hold every expert between them
            assert sorted(every_expert([rank["weights"] for rank in got], name)) == sorted(value)
    # the aux-loss-free bias after every step: the same on every rank and as in one process, and it moved
    if "biases" in got[0]:
        assert all(torch.equal(a, b) for rank in got for a, b in zip(rank["biases"], expected["biases"]))
    assert max(bias.abs().max().item() for bias in expected["biases"]) > 0


@pytest.mark.parametrize("index", [2, 4], ids=["ep2-zero2", "ep4-zero1"])
def test_checkpoint_resumes_identically(runs, index):
    _, layouts = runs
    for rank_results in layouts:
        result = rank_results[index]
        resume_at = LAYOUT_RUNS[index]["resume_at"]
        assert result["resumed_losses"] == result["losses"][resume_at:]
        for name, value in result["weights"].items():
            resumed = result["resumed_weights"][name]
            if isinstance(value, dict):
                assert all(torch.equal(value[i], resumed[i]) for i in value), name
            else:
                assert torch.equal(value, resumed), name


def test_checkpoint_module_weights_load_at_another_expert_parallel_size(runs):
    """DeepSpeed writes one file per expert (by global index): the EP 2 checkpoint's weights load at EP 4."""
    _, layouts = runs
    saved = [rank_results[2]["saved_weights"] for rank_results in layouts]
    loaded = [rank_results[6]["loaded_weights"] for rank_results in layouts]
    for name, value in saved[0].items():
        if isinstance(value, dict):
            assert every_expert(loaded, name).keys() == every_expert(saved, name).keys()
            for expert, tensor in every_expert(loaded, name).items():
                assert torch.equal(tensor, every_expert(saved, name)[expert]), (name, expert)
        else:
            assert all(torch.equal(rank[name], value) for rank in loaded), name


def test_bf16_runs_close_to_one_process(runs):
    reference, layouts = runs
    expected = reference[3]
    for rank_results in layouts:
        got = rank_results[7]
        torch.testing.assert_close(got["losses"], expected["losses"], **BF16_TOLERANCE)
        assert got["losses"][-1] < got["losses"][0]


def test_zero_stage_3_is_refused(runs):
    reference, _ = runs
    assert reference[4].startswith("AssertionError: Native DeepSpeed MoE is not supported with ZeRO Stage 3")
