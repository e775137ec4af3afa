"""Host side of the BatchNorm kernels (training mode): the elementwise BN-apply tail
(kernels/bn_act.py), the statistics finalize (kernels/bn_finalize.py) and the fused BN + ReLU
backward (kernels/bn_backward.py). Block sizes, partial buffers, layouts, launches.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from fastres.kernels import bn_backward as bn_backward_kernels
from fastres.kernels.bn_act import bn_act_kernel
from fastres.kernels.bn_backward import (
    bn_backward_apply_kernel,
    bn_backward_finalize_kernel,
    bn_backward_reduce_kernel,
)
from fastres.kernels.bn_finalize import bn_finalize_kernel
from fastres.kernels.common import INTERPRETED
from fastres.launch import alloc
from fastres.launch.configs import STATS_CHUNK

# Under the interpreter each program costs milliseconds whatever its size, so tiles are large.
BN_ACT_BLOCK = 4096 if INTERPRETED else 1024
FINALIZE_BLOCK_C = 64
FINALIZE_BLOCK_CHUNKS = 256 if INTERPRETED else 64
BACKWARD_BLOCK_R = 256 if INTERPRETED else 64
BACKWARD_BLOCK_C = 64
BACKWARD_MAX_ROW_PROGRAMS = 4 if INTERPRETED else 512
GRAD_FINALIZE_BLOCK_C = 64
GRAD_FINALIZE_BLOCK_P = 64


# Where the BN backward takes its ReLU mask from: the kernels' MASK values, as host ints.
NO_MASK, MASK_FROM_OUTPUT, MASK_FROM_AFFINE = (
    int(v.value) for v in (bn_backward_kernels.NO_MASK, bn_backward_kernels.MASK_FROM_OUTPUT,
                           bn_backward_kernels.MASK_FROM_AFFINE))


# ---------------------------------------------------------------------------------------------
# BN-apply (+ residual) (+ ReLU)

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
        out = alloc.empty_like(y)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and not same_layout(t, y):
            raise ValueError(f"bn_act: {name} must have y's shape and strides (memory format)")
    has_bn = residual_scale is not None
    grid = (triton.cdiv(y.numel(), BN_ACT_BLOCK),)
    bn_act_kernel[grid](
        y, scale, shift, residual if residual is not None else y,
        residual_scale if has_bn else scale, residual_shift if has_bn else shift, out,
        y.numel(), C, H * W,
        HAS_RESIDUAL=residual is not None, RESIDUAL_BN=has_bn, RELU=relu,
        CHANNELS_LAST=channels_last, BLOCK=BN_ACT_BLOCK)
    return out


# ---------------------------------------------------------------------------------------------
# Batch statistics -> scale/shift and running statistics

def bn_finalize(stats: torch.Tensor, M: int, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], batches_tracked: Optional[torch.Tensor],
                eps: float, momentum: Optional[float]) -> tuple:
    """(scale, shift, mean, invstd, new_running_mean, new_running_var) from the STATS epilogue's
    partials; the first four fp32 (K,), the last two in the running stats' dtype (None when
    running_mean is None: a BN with track_running_stats=False updates nothing).

    Functional (the running statistics are read, never written): the caller copies the new ones
    in, which keeps the op that calls this free of mutation for torch.compile and autograd.
    momentum=None is the cumulative average, 1 / (batches_tracked + 1), read on the device from
    num_batches_tracked before this batch's increment (no host sync)."""
    n_chunks, _, K = stats.shape
    outs = [alloc.empty((K,), stats, torch.float32) for _ in range(4)]
    update = running_mean is not None
    cumulative = update and momentum is None
    if cumulative and batches_tracked is None:
        raise ValueError("bn_finalize: momentum=None needs num_batches_tracked")
    new_rm = alloc.empty_like(running_mean) if update else None
    new_rv = alloc.empty_like(running_var) if update else None
    affine = weight is not None
    placeholder = outs[0]
    bn_finalize_kernel[(triton.cdiv(K, FINALIZE_BLOCK_C),)](
        stats, n_chunks, M, K,
        weight if affine else placeholder, bias if affine else placeholder,
        running_mean if update else placeholder, running_var if update else placeholder,
        batches_tracked if cumulative else placeholder,
        new_rm if update else placeholder, new_rv if update else placeholder, *outs,
        float(eps), float(momentum or 0.0),
        CHUNK=STATS_CHUNK, HAS_AFFINE=affine, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
        BLOCK_C=FINALIZE_BLOCK_C, BLOCK_CHUNKS=FINALIZE_BLOCK_CHUNKS)
    return tuple(outs) + (new_rm, new_rv)


# ---------------------------------------------------------------------------------------------
# BN + ReLU backward

def pixel_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, pixel, channel) strides of an NCHW-contiguous or channels_last tensor, the pixel
    index being h * W + w."""
    N, C, H, W = t.shape
    if t.is_contiguous():
        return C * H * W, 1, H * W
    if t.is_contiguous(memory_format=torch.channels_last):
        return H * W * C, C, 1
    raise ValueError("bn_backward: tensors must be NCHW-contiguous or channels_last")


class BNGradInput:
    """One BN whose backward runs here: its raw input y, the batch mean and invstd the forward
    used, and gamma (None without affine)."""

    def __init__(self, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                 gamma: Optional[torch.Tensor]):
        self.y, self.mean, self.invstd, self.gamma = y, mean, invstd, gamma


def bn_relu_backward(grad: torch.Tensor, bn: BNGradInput, mask: int,
                     mask_output: Optional[torch.Tensor] = None,
                     affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     second: Optional[BNGradInput] = None, write_g: bool = False):
    """Backward of relu(BN(y) [+ BN2(y2) | + identity]) or of relu(BN(y)) for the upstream
    gradient `grad`, in three launches.

    mask: NO_MASK, MASK_FROM_OUTPUT (mask_output = the forward's ReLU output) or
    MASK_FROM_AFFINE (affine = the forward's (scale, shift), recomputing y*scale+shift); either
    way the gradient is 0 where that ReLU input is <= 0 and passes elsewhere, NaN included.
    Returns (dy, dgamma, dbeta, dy2, dgamma2, dbeta2, g): dy/dy2 in y's dtype and layout,
    dgamma/dbeta fp32 (dbeta2 == dbeta: both BNs see the same g); g (the masked upstream
    gradient, for an identity shortcut) only when write_g.
    """
    y = bn.y
    N, C, H, W = y.shape
    M, HW = N * H * W, H * W
    dev = y.device
    s = pixel_strides(y)
    for t in (mask_output, second.y if second else None):
        if t is not None and not same_layout(t, y):
            raise ValueError("bn_backward: y, y2 and the saved output must share shape and strides")
    if grad.shape != y.shape:
        raise ValueError(f"bn_backward: gradient shape {tuple(grad.shape)} != {tuple(y.shape)}")
    if not (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)):
        grad = grad.contiguous(memory_format=torch.channels_last if y.stride(1) == 1 else
                               torch.contiguous_format)
    gs = pixel_strides(grad)
    placeholder = bn.mean
    scale, shift = affine if affine is not None else (placeholder, placeholder)
    relu_out = mask_output if mask_output is not None else y
    y2 = second.y if second else y
    mean2 = second.mean if second else placeholder
    invstd2 = second.invstd if second else placeholder

    n_rblocks = triton.cdiv(M, BACKWARD_BLOCK_R)
    n_programs = max(1, min(n_rblocks, BACKWARD_MAX_ROW_PROGRAMS))
    rows_per_program = triton.cdiv(n_rblocks, n_programs) * BACKWARD_BLOCK_R
    n_programs = triton.cdiv(M, rows_per_program) if M else 1
    partials = torch.empty((n_programs, 3, C), dtype=torch.float32, device=dev)
    n_cblocks = triton.cdiv(C, BACKWARD_BLOCK_C)
    bn_backward_reduce_kernel[(n_programs, n_cblocks)](
        grad, *gs, relu_out, y, bn.mean, bn.invstd, scale, shift, y2, mean2, invstd2, partials,
        M, C, HW, *s, rows_per_program, MASK=mask, HAS_SECOND=second is not None,
        BLOCK_R=BACKWARD_BLOCK_R, BLOCK_C=BACKWARD_BLOCK_C)

    def vec():
        return alloc.empty((C,), y, torch.float32)

    dgamma, dbeta = vec(), vec()
    coef = torch.empty((3, C), dtype=torch.float32, device=dev)
    dgamma2 = vec() if second else dgamma
    coef2 = torch.empty((3, C), dtype=torch.float32, device=dev) if second else coef
    bn_backward_finalize_kernel[(triton.cdiv(C, GRAD_FINALIZE_BLOCK_C),)](
        partials, n_programs, M, C, bn.invstd, bn.gamma if bn.gamma is not None else placeholder,
        invstd2, second.gamma if second and second.gamma is not None else placeholder,
        dgamma, dbeta, coef, dgamma2, coef2,
        HAS_GAMMA=bn.gamma is not None, HAS_SECOND=second is not None,
        HAS_GAMMA2=bool(second and second.gamma is not None),
        BLOCK_P=GRAD_FINALIZE_BLOCK_P, BLOCK_C=GRAD_FINALIZE_BLOCK_C)

    dy = alloc.empty_like(y)
    dy2 = alloc.empty_like(y) if second else dy
    g_out = alloc.empty_like(y) if write_g else dy
    bn_backward_apply_kernel[(triton.cdiv(M, BACKWARD_BLOCK_R), n_cblocks)](
        grad, *gs, relu_out, y, bn.mean, coef, scale, shift, y2, mean2, coef2, dy, dy2, g_out,
        M, C, HW, *s, MASK=mask, HAS_SECOND=second is not None, WRITE_G=write_g,
        BLOCK_R=BACKWARD_BLOCK_R, BLOCK_C=BACKWARD_BLOCK_C)
    return (dy, dgamma, dbeta, dy2 if second else None, dgamma2 if second else None,
            dbeta if second else None, g_out if write_g else None)
