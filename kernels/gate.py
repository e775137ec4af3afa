"""Elementwise per-image channel gate (+ residual) + activation, one pass: the tail of an SE /
ECA residual block.

out = act( y * g[n, c] (+ r) )

y is the conv output the gate scales (kernels/conv.py wrote it, and the per-(image, channel)
sums its squeeze needs, in one pass); g is the gate the SE / ECA network computed from them;
r the block's shortcut. The host side is fastres/launch/gate.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.common import activate, round_to


@triton.jit
def gate_act_kernel(y_ptr, g_ptr, r_ptr, out_ptr, numel, C, HW, act_slope,
                    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """y_ptr, r_ptr (residual, [HAS_RESIDUAL]) and out_ptr are (N, C, H, W) tensors of one dense
    memory format (NCHW-contiguous, or channels_last when CHANNELS_LAST) walked as flat arrays
    of numel elements; g_ptr is a contiguous (N, C) gate. Grid: cdiv(numel, BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = (offs // HW) % C
    n = offs // (C * HW)
    # Loaded values go to fp32 at once (Triton's interpreter holds bf16 as raw integers).
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v * tl.load(g_ptr + n * C + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        v = activate(v, ACTIVATION, act_slope)
    tl.store(out_ptr + offs, round_to(v, out_ptr.dtype.element_ty), mask=mask)
