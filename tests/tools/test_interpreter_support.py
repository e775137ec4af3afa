"""Which triton/numpy pairs can interpret fastres's kernels, and the clear error for those that
cannot (triton 3.6's interpreter + numpy >= 2.4 would otherwise fail at the first launch with
"only 0-dimensional arrays can be converted to Python scalars")."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastres.interpreter_support import interpreter_problem

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("triton_version, numpy_version", [
    ("3.6.0", "2.4.0"), ("3.6.0", "2.4.6"), ("3.6.1", "2.5.0"), ("3.6.0+git1a2b3c4", "2.4.0rc1"),
    ("3.5.1", "3.0.0.dev0"),
])
def test_broken_pairs_name_the_fix(triton_version, numpy_version):
    problem = interpreter_problem(triton_version, numpy_version)
    assert problem is not None
    assert f"triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
    assert "numpy<2.4" in problem and "triton >= 3.7" in problem


@pytest.mark.parametrize("triton_version, numpy_version", [
    ("3.6.0", "2.3.5"), ("3.6.0", "1.26.4"),      # numpy only warns
    ("3.7.0", "2.4.6"), ("3.8.0", "2.4.6"), ("3.9.0+gitabc", "2.5.0"),  # triton squeezes first
])
def test_working_pairs(triton_version, numpy_version):
    assert interpreter_problem(triton_version, numpy_version) is None


def test_unrecognised_version_is_an_error():
    with pytest.raises(ValueError, match="unrecognised version"):
        interpreter_problem("dev", "2.4.0")


def test_kernels_import_raises_the_clear_error():
    """Importing the kernels with TRITON_INTERPRET set on a broken pair fails at once, before any
    launch. The versions are faked in a fresh Python (the interpreter is chosen at import)."""
    code = ("import numpy, triton; triton.__version__ = '3.6.0'; numpy.__version__ = '2.4.0'\n"
            "import fastres\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "RuntimeError: Triton's interpreter (TRITON_INTERPRET=1) of triton 3.6.0 cannot run" \
        in run.stderr, run.stderr[-2000:]
