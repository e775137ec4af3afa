"""`python -m fastres bench`: the suites run (CPU subset here), the table, JSON, CSV and plot."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        assert r["speedup_vs_eager_cl"] > 0 and 0 < r["fastres_roofline_fraction"]
        assert r["best_other"] in ("eager_cl", "eager_folded")
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "raw.json").read_text())
    info = raw["benchmarks"][0]["extra_info"]
    assert {"tflops", "gbps", "roofline_fraction", "speedup_vs", "peak_gbps"} <= set(info)
    assert "CPU" in info["timing"]


def test_bench_rejects_unknown_level(tmp_path):
    from fastres import cli
    assert cli.main(["bench", "--level", "kernel", "--out", str(tmp_path)]) == 2
