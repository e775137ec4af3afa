"""Elementwise BatchNorm-apply (+ BatchNorm-applied or plain residual) (+ ReLU), one pass.

out = relu?( y * scale[c] + shift[c] + (r * r_scale[c] + r_shift[c]  |  r  |  0) )

This is the tail of a training-mode ResNet block: the last conv's BN, the shortcut (the block
input, or the downsample conv's raw output with its own BN) and the final ReLU in one read of
each operand and one write. The host side is fastres/launch/bn.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.common import relu, round_to


@triton.jit
def bn_act_kernel(y_ptr, scale_ptr, shift_ptr, r_ptr, r_scale_ptr, r_shift_ptr, out_ptr,
                  numel, C, HW,
                  HAS_RESIDUAL: tl.constexpr, RESIDUAL_BN: tl.constexpr, RELU: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Arguments: y_ptr, r_ptr (residual, [HAS_RESIDUAL]) and out_ptr are (N, C, H, W) tensors
    of one dense memory format (NCHW-contiguous, or channels_last when CHANNELS_LAST), walked
    as flat arrays of numel elements: the channel of flat index i is i % C (channels_last) or
    (i // HW) % C (NCHW), HW = H * W. scale_ptr/shift_ptr (and r_scale_ptr/r_shift_ptr,
    [RESIDUAL_BN]) are fp32 (C,). Grid: cdiv(numel, BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = (offs // HW) % C
    # Loaded values go to fp32 at once (Triton's interpreter holds bf16 as raw integers).
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL_BN:
            r = r * tl.load(r_scale_ptr + c, mask=mask, other=0.0) \
                + tl.load(r_shift_ptr + c, mask=mask, other=0.0)
        v += r
    if RELU:
        v = relu(v)
    tl.store(out_ptr + offs, round_to(v, out_ptr.dtype.element_ty), mask=mask)
