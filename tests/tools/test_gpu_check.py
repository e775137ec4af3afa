"""benchmarks/gpu_check.sh, exercised as far as a CPU allows (its --smoke subset)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("FASTRES_IN_GPU_CHECK") == "1",
                    reason="already running inside benchmarks/gpu_check.sh")
def test_gpu_check_script_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    for var in ("FASTRES_BACKEND", "FASTRES_IN_GPU_CHECK", "TRITON_INTERPRET"):
        env.pop(var, None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("env.txt", "tests.log", "tests.xml", "demo.log", "gate.log", "summary.md",
                 "bench.log", "bench/results.json", "bench/results.csv", "bench/raw.json"):
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | 0 |" in summary and "demo: PASS" in summary and "gate: PASS" in summary
    assert "| bench | 0 |" in summary and "vs eager_cl" in summary
    assert "torch:" in (tmp_path / "env.txt").read_text()
