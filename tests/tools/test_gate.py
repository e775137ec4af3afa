"""The timing-free perf-regression gate: launches and bytes per forward vs committed values."""
import json

import pytest

import fastres.nn.blocks
from fastres.tools.cli import load_checkout_tool

gate = load_checkout_tool("gate")


@pytest.fixture(scope="module")
def measured():
    return gate.measure()


def test_measurements_match_committed_expectations(measured):
    ok, lines = gate.compare(json.loads(gate.DEFAULT_EXPECTED.read_text()), measured)
    assert ok, "\n".join(lines)


def test_fusion_is_what_the_expectations_record(measured):
    """The committed numbers themselves: 2 launches per BasicBlock, 3 per Bottleneck, one per
    stem, with or without downsample, and less traffic than eager in every case."""
    for label, case in measured["blocks"].items():
        want = 2 if "BasicBlock" in label else 3
        assert case["fastres"]["launches"] == case["fastres"]["fastres_launches"] == want, label
        assert case["fastres"]["bytes"] < case["original"]["bytes"], label
    for name, blocks in (("resnet18", 8), ("resnet50", 16)):
        model = measured["models"][name]
        per_block = 2 if name == "resnet18" else 3
        assert model["fastres"]["fastres_launches"] == 1 + blocks * per_block
        assert model["fastres"]["bytes"] < model["original"]["bytes"]


def test_gate_fails_when_a_block_is_unfused(measured, monkeypatch):
    """A change that stops fusing (here: blocks run their unfused forward) fails the gate."""
    monkeypatch.setattr(fastres.nn.blocks.FusedBlockBase, "forward",
                        lambda self, x: self._fastres_unfused(x))
    ok, lines = gate.compare(measured, gate.measure())
    assert not ok
    changed = [line for line in lines if "CHANGED" in line]
    assert changed and all("fastres" in line for line in changed)


def test_bless_writes_what_check_reads(tmp_path, capsys):
    path = tmp_path / "expected.json"
    assert gate.run(path, bless=True) == 0
    assert gate.run(path) == 0
    assert "gate: PASS" in capsys.readouterr().out
    data = json.loads(path.read_text())
    data["models"]["resnet50"]["fastres"]["fastres_launches"] += 1
    path.write_text(json.dumps(data))
    assert gate.run(path) == 1
    assert "gate: FAIL" in capsys.readouterr().out


# ---- the GPU half: speedups against a stored baseline (synthetic results here) -----------------

def _results(speedups, device="NVIDIA H100 80GB HBM3"):
    rows = [{"level": "layer", "case": case, "dtype": "float16", "fastres_ms": 1.0,
             "eager_cl_ms": s, "speedup_vs_eager_cl": s} for case, s in speedups.items()]
    return {"environment": {"device": device, "commit": "abc"}, "rows": rows}


def test_timing_gate_flags_only_falls_beyond_the_threshold():
    base = _results({"a": 2.0, "b": 1.5, "c": 1.2})
    now = _results({"a": 1.85, "b": 1.2, "c": 1.5, "d": 1.0})  # -7.5%, -20%, +25%, new
    ok, lines = gate.compare_timings(base, now, threshold=0.10)
    text = "\n".join(lines)
    assert not ok
    assert "layer b float16" in text and "REGRESSION" in text
    assert "improvement" in text and "1 case(s) within" in text and "new case" in text
    ok, _ = gate.compare_timings(base, _results({"a": 1.9, "b": 1.45, "c": 1.2}), threshold=0.10)
    assert ok


def test_timing_gate_bless_and_check(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results({"a": 2.0})))
    baseline = tmp_path / "baseline.json"
    assert gate.run_timings(results, baseline) == 1  # no baseline yet
    assert gate.run_timings(results, baseline, bless=True) == 0
    assert gate.run_timings(results, baseline) == 0
    results.write_text(json.dumps(_results({"a": 1.0})))
    assert gate.run_timings(results, baseline) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_baseline_file_is_named_after_the_device():
    path = gate.baseline_path_for("NVIDIA H100 80GB HBM3")
    assert path.name == "nvidia-h100-80gb-hbm3.json" and path.parent.name == "baselines"
