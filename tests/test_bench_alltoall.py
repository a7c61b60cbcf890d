"""The all-to-all bytes benchmark runs, and its counts follow from the routing: two levels send one row per
(token, remote node) across nodes, the node limit caps that at M, and without de-duplication every remote
assignment is a row."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_alltoall_bytes.py"
ROW_BYTES, INT64, GATE = 16 * 2, 8, 4


def run_bench(tmp_path, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [str(BENCH), *argv, "--out", str(tmp_path)])
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as when run as a script: benchmarks/ is on the path
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    except SystemExit as exit_status:
        assert exit_status.code == 0
    return json.loads((tmp_path / "alltoall_bytes.json").read_text())["rows"]


def test_bytes_benchmark_flat_vs_two_level(tmp_path, monkeypatch, capsys):
    rows = run_bench(tmp_path, monkeypatch, "--tokens", "64", "--d-model", "16", "--num-experts", "8",
                     "--granularities", "1,8", "--nodes", "1,2,4", "--gpus-per-node", "2", "--node-limit", "2")
    assert [(r["G"], r["nodes"]) for r in rows] == [(1, 1), (1, 2), (1, 4), (8, 1), (8, 2), (8, 4)]
    for r in rows:
        assert 1 <= r["nodes_per_token"] <= min(r["topk"], r["nodes"])
        # two levels: at most one row per (token, remote node), never more than one level sends
        assert r["two_level_inter_rows_per_token"] <= r["nodes_per_token"] - (1 if r["nodes"] == 1 else 0) + 1e-9
        assert r["two_level_inter_rows_per_token"] <= r["flat_inter_rows_per_token"]
        assert r["two_level_inter_bytes_per_token"] <= r["flat_inter_bytes_per_token"]
        assert r["undeduplicated_inter_bytes_per_token"] >= r["flat_inter_rows_per_token"] * (ROW_BYTES + GATE) - 1e-9
        if r["nodes"] == 1:  # one node: nothing crosses, and both dispatchers are the same single level
            assert r["flat_inter_bytes_per_token"] == r["two_level_inter_bytes_per_token"] == 0
            assert r["flat_intra_bytes_per_token"] == r["two_level_intra_bytes_per_token"] > 0
    node_limited = [r for r in rows if "node_limited_inter_rows_per_token" in r]
    assert [(r["G"], r["nodes"]) for r in node_limited] == [(8, 4)]  # M=2 < nodes, and top-k a multiple of M
    # each token visits at most M = 2 nodes: at most 2 rows cross, fewer than without the limit
    [limited] = node_limited
    assert limited["node_limited_inter_rows_per_token"] <= 2.0 < limited["two_level_inter_rows_per_token"]
    g8_two_nodes = rows[4]
    # 64 experts, top-8 over 2 nodes: every token visits both; the flat dispatcher sends it to ~2 remote ranks
    assert g8_two_nodes["two_level_inter_rows_per_token"] <= 1.0 < g8_two_nodes["flat_inter_rows_per_token"]
    assert "| 8 | 4 x 2 (8) | 64, 8 |" in capsys.readouterr().out


def test_bytes_formula(tmp_path, monkeypatch):
    """A row is d_model activations and an int64 size; an assignment an int64 id and an fp32 gate: a single
    source token routed top-1 to a remote node sends exactly one of each, once per level."""
    [row] = run_bench(tmp_path, monkeypatch, "--tokens", "1", "--d-model", "16", "--num-experts", "2",
                      "--granularities", "1", "--nodes", "2", "--gpus-per-node", "1", "--node-limit", "0",
                      "--seed", "2")
    remote = row["two_level_inter_rows_per_token"]
    assert remote == 1.0  # this seed routes the token to the other node
    assert row["two_level_inter_bytes_per_token"] == remote * (ROW_BYTES + INT64 + INT64 + GATE)
    assert row["flat_inter_bytes_per_token"] == row["two_level_inter_bytes_per_token"]
    assert row["undeduplicated_inter_bytes_per_token"] == remote * (ROW_BYTES + GATE)
    assert row["two_level_intra_bytes_per_token"] == row["flat_intra_bytes_per_token"] == 0  # one GPU per node
