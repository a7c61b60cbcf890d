"""A checkpoint saved at one (TP, PP, EP, DP) layout resumes at another and continues the loss curve of the
run that was never interrupted (fp32 on the CPU: equal to rounding), the distributed optimizer's state
resharded with it: EP 2 -> 1, 2 -> 4, EP 2 -> TP 2 x EP 2, and PP 1 -> 2 (EP 1)."""

import shutil

import pytest

from distributed import run_distributed
from granular_moe.training.metrics import read_records

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--num-experts", "4", "--moe-router-topk", "1", "--moe-granularity", "4", "--moe-aux-loss-coeff", "0.01",
        "--moe-z-loss-coeff", "0.001", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--corpus-max-bytes", "300000", "--eval-iters", "1", "--eval-interval", "4",
        "--seed", "5", "--train-iters", "8", "--log-interval", "1", "--save-interval", "4",
        "--use-distributed-optimizer"]


def job(rank, world_size, argv):
    from granular_moe.training.arguments import parse_args
    from granular_moe.training.pretrain import pretrain

    return pretrain(parse_args(argv))


def losses(save):
    records = read_records(save / "metrics.jsonl")
    return ({r["iteration"]: r["loss"] for r in records if "loss" in r},
            {r["iteration"]: r["valid_loss"] for r in records if "valid_loss" in r})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    save = tmp_path_factory.mktemp("resharding") / "ep2"
    run_distributed(job, 2, TINY + ["--save", str(save), "--expert-model-parallel-size", "2"])
    return save


@pytest.mark.parametrize("world, layout", [
    (1, ["--expert-model-parallel-size", "1"]),
    (4, ["--expert-model-parallel-size", "4"]),
    (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1"]),
], ids=["ep1", "ep4", "tp2-ep2", "pp2"])
def test_a_checkpoint_resumes_at_another_layout_on_the_same_loss_curve(uninterrupted, tmp_path, world, layout):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "iter_0000004", resumed / "iter_0000004")
    (resumed / "latest_checkpointed_iteration.txt").write_text("4")
    run_distributed(job, world, TINY + ["--save", str(resumed), "--load", str(resumed), *layout])
    (expected, expected_valid), (got, got_valid) = losses(uninterrupted), losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for iteration in got:
        assert got[iteration] == pytest.approx(expected[iteration], rel=2e-6), iteration
    assert got_valid[8] == pytest.approx(expected_valid[8], rel=2e-6)
    assert expected[8] < expected[1] - 0.1  # the curve is one that learns
