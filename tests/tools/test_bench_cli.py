"""`python -m fastres bench`: the suites run (CPU subset here), the table, JSON, CSV and plot."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastres.tools.cli import load_checkout_tool

ROOT = Path(__file__).resolve().parents[2]
bench = load_checkout_tool("bench")


def test_bench_writes_table_json_csv_and_plot(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the suites time the CPU torch path, not the interpreter
    run = subprocess.run([sys.executable, "-m", "fastres", "bench", "--level", "layer,model,train",
                          "--providers", "eager_cl,eager_folded,fastres", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vs eager_cl" in run.stdout and "resnet18 N1" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["device"] == "cpu"
    rows = results["rows"]
    assert {r["level"] for r in rows} == {"layer", "model", "train_block", "train_model"}
    for r in rows:
        assert r["speedup_vs_eager_cl"] > 0
        assert r["best_other"] in ("eager_cl", "eager_folded")
        # No peak is measured on a CPU, so there is no floor and no fraction to report.
        assert (r["fastres_roofline_status"], r["fastres_roofline_fraction"]) == ("n/a", None)
        assert r["fastres_roofline_note"] == bench.CPU_ROOFLINE_NOTE
    table = run.stdout[run.stdout.index("level "):]
    assert "%" not in table.split("(times")[0]  # not a single roofline percentage
    assert f"roofline {bench.CPU_ROOFLINE_NOTE}" in table
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(r["fastres_roofline_status"] == "n/a" and r["fastres_roofline_fraction"] == ""
               for r in csv_rows)
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "raw.json").read_text())
    for result in raw["benchmarks"]:
        info = result["extra_info"]
        assert {"tflops", "gbps", "speedup_vs"} <= set(info)
        assert "CPU" in info["timing"]
        assert info["peak_tflops"] is info["peak_gbps"] is info["roofline_floor_ms"] is None
        assert (info["roofline_status"], info["roofline_fraction"]) == ("n/a", None)


def _raw(*results):
    """A pytest-benchmark JSON holding (case, provider, median_ms, roofline fields) results."""
    return {"benchmarks": [{"extra_info": dict(level="layer", case=case, dtype="float16",
                                               provider=provider, median_ms=ms, tflops=1.0,
                                               gbps=1.0, **fields)}
                           for case, provider, ms, fields in results]}


def test_roofline_decisions():
    # 1 TFLOP at 1 PFLOP/s: a 1 ms floor; the byte floor (1 GB at 2 TB/s) is 0.5 ms.
    ok = bench.roofline(1e12, 1e9, 2.0, 1e15, 2e12)
    assert ok["roofline_status"] == "ok" and ok["roofline_note"] is None
    assert ok["roofline_floor_ms"] == pytest.approx(1.0)
    assert ok["roofline_fraction"] == pytest.approx(0.5)
    assert bench.roofline(1e12, 1e9, 1.0, 1e15, 2e12)["roofline_fraction"] == pytest.approx(1.0)
    # Faster than the floor: a peak was too low. Flagged, no fraction, the floor kept to debug.
    bad = bench.roofline(1e12, 1e9, 0.9, 1e15, 2e12)
    assert (bad["roofline_status"], bad["roofline_fraction"]) == ("invalid", None)
    assert bad["roofline_floor_ms"] == pytest.approx(1.0)
    assert "floor 1 ms > measured 0.9 ms" in bad["roofline_note"]
    # The byte floor decides when it is the larger one.
    assert bench.roofline(1e9, 4e9, 1.0, 1e15, 2e12)["roofline_status"] == "invalid"
    assert bench.roofline(1e12, 1e9, 2.0, None, None) == dict(
        roofline_status="n/a", roofline_floor_ms=None, roofline_fraction=None,
        roofline_note=bench.CPU_ROOFLINE_NOTE)


def test_report_never_prints_a_fraction_above_100_percent(tmp_path):
    """A case that ran faster than its floor (fastres at 0.9 ms against a 1 ms floor) is flagged
    INVALID in the table, JSON rows and plot; a sound one (2 ms: 50%) is printed."""
    raw = _raw(("fast case", "eager_cl", 1.5, bench.roofline(1e12, 1e9, 1.5, 1e15, 2e12)),
               ("fast case", "fastres", 0.9, bench.roofline(1e12, 1e9, 0.9, 1e15, 2e12)),
               ("slow case", "eager_cl", 3.0, bench.roofline(1e12, 1e9, 3.0, 1e15, 2e12)),
               ("slow case", "fastres", 2.0, bench.roofline(1e12, 1e9, 2.0, 1e15, 2e12)))
    rows = {r["case"]: r for r in bench.rows_from_raw(raw)}
    assert rows["fast case"]["fastres_roofline_status"] == "invalid"
    assert rows["fast case"]["fastres_roofline_fraction"] is None
    assert rows["slow case"]["fastres_roofline_fraction"] == pytest.approx(0.5)
    table = bench.format_table(list(rows.values()))
    percentages = [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", table)]
    assert percentages == [50.0]
    assert re.search(r"fast case .* INVALID$", table, re.M)
    assert "roofline INVALID for layer fast case float16: floor 1 ms > measured 0.9 ms" in table
    assert bench.plot(list(rows.values()), tmp_path / "speedup.png") is None


def test_bench_rejects_unknown_level(tmp_path):
    from fastres.tools import cli
    assert cli.main(["bench", "--level", "kernel", "--out", str(tmp_path)]) == 2
