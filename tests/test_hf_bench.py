"""benchmarks/bench_hf_convert.py at a toy size: it builds a folder, runs import-hf and export-hf as processes,
measures them and writes its JSON; its straight-line fit recovers a line."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hf_convert.py"


def test_the_conversion_benchmark_measures_import_and_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--layers", "2", "--hidden", "64", "--experts", "4", "--width", "32",
                                      "--workers", "1", "--no-wide", "--repeats", "2", "--out", str(tmp_path)])
    monkeypatch.syspath_prepend(str(BENCH.parent))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert done.value.code == 0
    result = json.loads((tmp_path / "hf_convert.json").read_text())
    assert [row["what"] for row in result["rows"]] == ["import-hf", "export-hf"]
    for row in result["rows"]:
        assert row["tensors"] == 2 * (9 + 4 * 3) + 3 and row["wall_s"] > 0  # per layer 9 + 4 experts' 3; 3 more
        assert row["peak_rss_mb"] > 100 and row["peak_sum_pss_mb"] > 0
        assert len(row["walls_s"]) == 2 and min(row["walls_s"]) <= row["wall_s"] <= max(row["walls_s"])
    assert result["provenance"]["cpu_count"] >= 1 and "import-hf" in capsys.readouterr().out


def test_the_fit_recovers_a_line(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    bench = runpy.run_path(str(BENCH))
    rows = [{"what": "export-hf", "workers": 1, "hidden": 8, "tensors": n, "wall_s": 2.0 + 0.001 * n}
            for n in (100, 400, 1600)]
    [fit] = bench["linear_fits"](rows, 8)
    assert fit["start_s"] == pytest.approx(2.0) and fit["ms_per_tensor"] == pytest.approx(1.0)
    assert fit["largest_residual"] < 1e-6
