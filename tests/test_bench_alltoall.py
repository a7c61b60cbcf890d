"""The all-to-all bytes benchmark runs and its counts follow from the routing."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_alltoall_bytes.py"


def test_bytes_benchmark_counts_rows_and_bytes(tmp_path, monkeypatch, capsys):
    argv = ["--tokens", "64", "--d-model", "16", "--granularities", "1,8", "--ep-sizes", "2,4", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [str(BENCH), *argv])
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as when run as a script: benchmarks/ is on the path
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    except SystemExit as exit_status:
        assert exit_status.code == 0
    rows = json.loads((tmp_path / "alltoall_bytes.json").read_text())["rows"]
    assert [(r["G"], r["EP"]) for r in rows] == [(1, 2), (1, 4), (8, 2), (8, 4)]
    for r in rows:
        assert 1 <= r["rows_per_token"] <= min(r["topk"], r["EP"])
        # without de-duplication: every remote assignment is a 16 x 2-byte row plus a 4-byte gate
        assert r["bytes_per_token_undeduplicated"] == r["remote_assignments_per_token"] * (16 * 2 + 4)
        expected = r["remote_rows_per_token"] * (16 * 2 + 8) + r["remote_assignments_per_token"] * 12
        assert abs(r["bytes_per_token_deduplicated"] - expected) < 1e-9
    g8_ep2 = rows[2]
    # 8 experts per token over 2 ranks: one remote row per token carries about 4 remote assignments
    assert (
        g8_ep2["rows_per_token"] == 2.0
        and g8_ep2["remote_rows_per_token"] <= 1.0 < 3 < g8_ep2["remote_assignments_per_token"]
    )
    assert "| 8 | 4 |" in capsys.readouterr().out
