"""The host side of the Triton kernels (layer 1, above kernels/): which config a launch uses,
what fits the target GPU's shared memory, the one output allocator, and the launchers.

Nothing here knows about nn.Modules or torch.library; fastres.ops builds on it.
"""
from fastres.interpreter_support import check_interpreter
from fastres.kernels.common import INTERPRETED

if INTERPRETED:
    # Fail here, naming the fix, rather than with numpy's TypeError at the first launch.
    check_interpreter()
