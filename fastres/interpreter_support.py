"""Whether this stack's Triton interpreter (TRITON_INTERPRET=1) can run fastres's kernels.

triton 3.6's interpreter holds a scalar kernel argument as a 1-element numpy array and turns it
into a Python int with int(array) when a loop bound needs one (`for c0 in range(0, C, BLOCK_K)`).
numpy deprecated that conversion in 1.25 and raises TypeError from 2.4 on, so every fastres
kernel with a runtime loop bound fails at its first launch with "only 0-dimensional arrays can be
converted to Python scalars" (triton-lang/triton#9171). triton 3.7 squeezes the array first. The
compiled (GPU) path never goes through this code and works on every supported stack.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

FIXED_TRITON = (3, 7)  # the first release whose interpreter squeezes scalars before int()
BREAKING_NUMPY = (2, 4)  # the first release that raises instead of warning


def _major_minor(version: str) -> Tuple[int, int]:
    """(3, 6) from "3.6.0", "3.6.0+git1a2b3c", "2.4.0rc1"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"unrecognised version string {version!r}")
    return int(match.group(1)), int(match.group(2))


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why the interpreter of this triton cannot run fastres's kernels next to this numpy, with
    the fix; None when it can."""
    if _major_minor(triton_version) >= FIXED_TRITON or \
            _major_minor(numpy_version) < BREAKING_NUMPY:
        return None
    return (f"Triton's interpreter (TRITON_INTERPRET=1) of triton {triton_version} cannot run "
            f"fastres's kernels with numpy {numpy_version}: it passes scalar kernel arguments as "
            f"1-element arrays, which numpy >= 2.4 refuses to convert to Python ints ('only "
            f"0-dimensional arrays can be converted to Python scalars', triton-lang/triton#9171). "
            f"Fix: pip install 'numpy<2.4', or upgrade to triton >= 3.7; on a GPU, unset "
            f"TRITON_INTERPRET to run the compiled kernels.")


def check_interpreter() -> None:
    """Raise RuntimeError, naming the fix, if the installed triton and numpy cannot interpret
    fastres's kernels (called at the kernels' import when TRITON_INTERPRET is set)."""
    import numpy
    import triton

    problem = interpreter_problem(triton.__version__, numpy.__version__)
    if problem:
        raise RuntimeError(problem)
