"""Elementwise BatchNorm-apply (+ BatchNorm-applied or plain residual) (+ ReLU), one pass.

out = relu?( y * scale[c] + shift[c] + (r * r_scale[c] + r_shift[c]  |  r  |  0) )

This is the tail of a training-mode ResNet block: the last conv's BN, the shortcut (the block
input, or the downsample conv's raw output with its own BN) and the final ReLU in one read of
each operand and one write. y, r and out share one memory format (NCHW-contiguous or
channels_last), so the kernel walks them as flat arrays and derives the channel of each element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.kernels.conv import INTERPRETED, relu, round_to

BLOCK = 4096 if INTERPRETED else 1024

# Allocator of the output (the tests swap in one that fills it with NaN).
new_like = torch.empty_like


@triton.jit
def bn_act_kernel(y_ptr, scale_ptr, shift_ptr, r_ptr, r_scale_ptr, r_shift_ptr, out_ptr,
                  numel, C, HW,
                  HAS_RESIDUAL: tl.constexpr, RESIDUAL_BN: tl.constexpr, RELU: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
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


def _layout(t: torch.Tensor) -> bool:
    """True for channels_last, False for NCHW-contiguous; anything else is refused."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError("bn_act: tensors must be NCHW-contiguous or channels_last")


def same_layout(t: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether t can be walked as one flat array alongside y: same shape, and dense in y's
    memory format (strides of size-1 dimensions do not matter)."""
    fmt = torch.channels_last if _layout(y) else torch.contiguous_format
    return tuple(t.shape) == tuple(y.shape) and t.is_contiguous(memory_format=fmt)


def bn_act(y, scale, shift, residual=None, residual_scale=None, residual_shift=None,
           relu: bool = True, out=None):
    """relu?(y * scale + shift [+ residual (* residual_scale + residual_shift)]), per channel.

    scale/shift (and residual_scale/shift) are fp32 (C,); y and residual (N, C, H, W) of one
    memory format; the output (new, or `out`) has y's dtype and format.
    """
    channels_last = _layout(y)
    N, C, H, W = y.shape
    if out is None:
        out = new_like(y)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and not same_layout(t, y):
            raise ValueError(f"bn_act: {name} must have y's shape and strides (memory format)")
    has_bn = residual_scale is not None
    grid = (triton.cdiv(y.numel(), BLOCK),)
    bn_act_kernel[grid](
        y, scale, shift, residual if residual is not None else y,
        residual_scale if has_bn else scale, residual_shift if has_bn else shift, out,
        y.numel(), C, H * W,
        HAS_RESIDUAL=residual is not None, RESIDUAL_BN=has_bn, RELU=relu,
        CHANNELS_LAST=channels_last, BLOCK=BLOCK)
    return out
