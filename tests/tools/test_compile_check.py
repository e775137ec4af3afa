"""`python -m fastres compile-check`: every kernel variant compiled for the H100 (sm_90) by
Triton's real compiler, without a GPU - what the interpreter cannot check."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("fused_conv2d_kernel", "bn_finalize_kernel", "bn_act_kernel",
           "bn_backward_reduce_kernel", "bn_backward_finalize_kernel", "bn_backward_apply_kernel")


@pytest.mark.slow  # ~80 s; .ci/run runs this command (and --arch 80) beside the suite
def test_every_kernel_compiles_for_sm90():
    """The quick set (fp16, channels_last): eval blocks, the stem, training steps and every
    tuning config compile to cubins and fit the H100's shared memory. (The full set, all dtypes
    and both formats: `python -m fastres compile-check`, a few minutes cold.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastres", "compile-check", "--quick"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.rstrip().endswith("OK")
    for name in KERNELS:
        assert name in run.stdout, name


def test_report_fails_on_compile_errors_and_shared_memory_overflow():
    from fastres.tools.compile_check import CompileReport
    report = CompileReport(90)
    report.current = "a scenario"
    report.record("k", "hash1", 100 * 1024)
    assert report.ok
    report.record("k", "hash2", 300 * 1024)
    assert not report.ok and "OVER THE SHARED-MEMORY LIMIT" in report.format()
    report = CompileReport(80)
    report.failures.append(("a scenario", "Traceback ..."))
    assert not report.ok and "FAILED a scenario" in report.format()


def test_needs_the_real_jit():
    from fastres.launch import conv as conv_launch
    from fastres.tools import compile_check
    if not conv_launch.INTERPRETED:
        pytest.skip("the kernels are compiled here (a GPU machine)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.run(quick=True)
