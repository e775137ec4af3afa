"""Training-mode BatchNorm + ReLU backward with its reductions fused: three launches per BN (or
per pair of BNs that share one upstream gradient, as the last BN and the downsample's BN do).

With g = dL/d(ReLU output) masked by the ReLU, y the BN's raw input, xhat = (y - mean) * invstd:
  dbeta = sum g;  dgamma = sum g * xhat                              (per channel, over N*H*W)
  dL/dy = gamma * invstd * (g - dbeta / M - xhat * dgamma / M)
        = a * g + b * (y - mean) + c,  a = gamma*invstd, b = -a*invstd*dgamma/M, c = -a*dbeta/M

1. bn_backward_reduce_kernel: per (row range, channel block) partial sums of g and g*xhat (and
   g*xhat2 for the second BN), fp32, written to a (programs, 3, C) buffer - deterministic, no
   atomics.
2. bn_backward_finalize_kernel: sums the partials; writes dgamma/dbeta and the a/b/c
   coefficients (one tiny launch).
3. bn_backward_apply_kernel: dL/dy (and dL/dy2, and the masked g itself when the block's identity
   shortcut needs it) in one elementwise pass.

The ReLU mask comes from the forward's saved output (MASK_FROM_OUTPUT: the block's final ReLU) or
is recomputed from the raw y as y*scale + shift (MASK_FROM_AFFINE: the ReLU between stages,
whose activation the next conv's prologue produced and nobody stored). Tensors are NCHW-contiguous
or channels_last; each is addressed through (batch, pixel, channel) strides, so the upstream
gradient may come in either format whatever the activations' format.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastres.kernels.bn_act import same_layout
from fastres.kernels.conv import INTERPRETED, round_to

NO_MASK, MASK_FROM_OUTPUT, MASK_FROM_AFFINE = 0, 1, 2

# Under the interpreter each program costs milliseconds whatever its size, so tiles are large.
BLOCK_R = 256 if INTERPRETED else 64
BLOCK_C = 64
MAX_ROW_PROGRAMS = 4 if INTERPRETED else 512
FINALIZE_BLOCK_C = 64
FINALIZE_BLOCK_P = 64

# Allocator of the gradient outputs (the tests swap in one that fills them with NaN, so an
# element the kernels never write shows up).
new_like = torch.empty_like


@triton.jit
def _masked_grad(g_ptr, g_off, src_ptr, off, y, scale, shift, mask, MASK: tl.constexpr):
    """The ReLU's backward as torch's threshold_backward(g, v, 0) computes it: 0 where v <= 0
    (exactly 0, even for an inf or NaN g), g elsewhere - a NaN v passes g through."""
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if MASK == 1:
        out = tl.load(src_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(out <= 0, 0.0, g)
    if MASK == 2:
        g = tl.where(y * scale[None, :] + shift[None, :] <= 0, 0.0, g)
    return g


@triton.jit
def _store_input_grad(g, y, mean_ptr, coef_ptr, dy_ptr, off, offs_c, mask_c, mask, C):
    """dL/dy = a * g + b * (y - mean) + c, with the finalize's per-channel a, b, c."""
    a = tl.load(coef_ptr + offs_c, mask=mask_c, other=0.0)
    b = tl.load(coef_ptr + C + offs_c, mask=mask_c, other=0.0)
    c = tl.load(coef_ptr + 2 * C + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    dy = a[None, :] * g + b[None, :] * (y - mean[None, :]) + c[None, :]
    tl.store(dy_ptr + off, round_to(dy, dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_backward_reduce_kernel(g_ptr, gs_n, gs_hw, gs_c, src_ptr, y_ptr, mean_ptr, invstd_ptr,
                              scale_ptr, shift_ptr, y2_ptr, mean2_ptr, invstd2_ptr, partial_ptr,
                              M, C, HW, s_n, s_hw, s_c, rows_per_program,
                              MASK: tl.constexpr, HAS_SECOND: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    if HAS_SECOND:
        mean2 = tl.load(mean2_ptr + offs_c, mask=mask_c, other=0.0)
        invstd2 = tl.load(invstd2_ptr + offs_c, mask=mask_c, other=0.0)
    acc_g = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_gx2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    row_start = pid_r * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & mask_c[None, :]
        n = (rows // HW).to(tl.int64)
        hw = (rows % HW).to(tl.int64)
        off = (n * s_n + hw * s_hw)[:, None] + offs_c[None, :].to(tl.int64) * s_c
        g_off = (n * gs_n + hw * gs_hw)[:, None] + offs_c[None, :].to(tl.int64) * gs_c
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(g_ptr, g_off, src_ptr, off, y, scale, shift, mask, MASK)
        acc_g += g
        acc_gx += g * ((y - mean[None, :]) * invstd[None, :])
        if HAS_SECOND:
            y2 = tl.load(y2_ptr + off, mask=mask, other=0.0).to(tl.float32)
            acc_gx2 += g * ((y2 - mean2[None, :]) * invstd2[None, :])
    base = partial_ptr + pid_r.to(tl.int64) * 3 * C + offs_c
    tl.store(base, tl.sum(acc_g, axis=0), mask=mask_c)
    tl.store(base + C, tl.sum(acc_gx, axis=0), mask=mask_c)
    tl.store(base + 2 * C, tl.sum(acc_gx2, axis=0), mask=mask_c)


@triton.jit
def _store_coefficients(s_g, s_gx, Mf, invstd_ptr, gamma_ptr, dgamma_ptr, coef_ptr, offs_c, mask_c,
                        C, HAS_GAMMA: tl.constexpr):
    """dgamma, and the a, b, c of dL/dy = a * g + b * (y - mean) + c for one BN."""
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    a = invstd
    if HAS_GAMMA:
        a = a * tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(dgamma_ptr + offs_c, s_gx, mask=mask_c)
    tl.store(coef_ptr + offs_c, a, mask=mask_c)
    tl.store(coef_ptr + C + offs_c, -a * invstd * s_gx / Mf, mask=mask_c)
    tl.store(coef_ptr + 2 * C + offs_c, -a * s_g / Mf, mask=mask_c)


@triton.jit
def bn_backward_finalize_kernel(partial_ptr, n_partials, M, C, invstd_ptr, gamma_ptr,
                                invstd2_ptr, gamma2_ptr, dgamma_ptr, dbeta_ptr, coef_ptr,
                                dgamma2_ptr, coef2_ptr,
                                HAS_GAMMA: tl.constexpr, HAS_SECOND: tl.constexpr,
                                HAS_GAMMA2: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_gx2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < n_partials)[:, None] & mask_c[None, :]
        base = partial_ptr + p[:, None].to(tl.int64) * 3 * C + offs_c[None, :]
        s_g += tl.sum(tl.load(base, mask=m, other=0.0), axis=0)
        s_gx += tl.sum(tl.load(base + C, mask=m, other=0.0), axis=0)
        s_gx2 += tl.sum(tl.load(base + 2 * C, mask=m, other=0.0), axis=0)
    Mf = M.to(tl.float32)
    tl.store(dbeta_ptr + offs_c, s_g, mask=mask_c)
    _store_coefficients(s_g, s_gx, Mf, invstd_ptr, gamma_ptr, dgamma_ptr, coef_ptr, offs_c,
                        mask_c, C, HAS_GAMMA)
    if HAS_SECOND:
        _store_coefficients(s_g, s_gx2, Mf, invstd2_ptr, gamma2_ptr, dgamma2_ptr, coef2_ptr,
                            offs_c, mask_c, C, HAS_GAMMA2)


@triton.jit
def bn_backward_apply_kernel(g_ptr, gs_n, gs_hw, gs_c, src_ptr, y_ptr, mean_ptr, coef_ptr,
                             scale_ptr, shift_ptr, y2_ptr, mean2_ptr, coef2_ptr,
                             dy_ptr, dy2_ptr, gout_ptr, M, C, HW, s_n, s_hw, s_c,
                             MASK: tl.constexpr, HAS_SECOND: tl.constexpr, WRITE_G: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    n = (rows // HW).to(tl.int64)
    hw = (rows % HW).to(tl.int64)
    off = (n * s_n + hw * s_hw)[:, None] + offs_c[None, :].to(tl.int64) * s_c
    g_off = (n * gs_n + hw * gs_hw)[:, None] + offs_c[None, :].to(tl.int64) * gs_c
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = _masked_grad(g_ptr, g_off, src_ptr, off, y, scale, shift, mask, MASK)
    _store_input_grad(g, y, mean_ptr, coef_ptr, dy_ptr, off, offs_c, mask_c, mask, C)
    if HAS_SECOND:
        y2 = tl.load(y2_ptr + off, mask=mask, other=0.0).to(tl.float32)
        _store_input_grad(g, y2, mean2_ptr, coef2_ptr, dy2_ptr, off, offs_c, mask_c, mask, C)
    if WRITE_G:
        tl.store(gout_ptr + off, round_to(g, gout_ptr.dtype.element_ty), mask=mask)


def _pixel_strides(t: torch.Tensor) -> Tuple[int, int, int]:
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
    s = _pixel_strides(y)
    for t in (mask_output, second.y if second else None):
        if t is not None and not same_layout(t, y):
            raise ValueError("bn_backward: y, y2 and the saved output must share shape and strides")
    if grad.shape != y.shape:
        raise ValueError(f"bn_backward: gradient shape {tuple(grad.shape)} != {tuple(y.shape)}")
    if not (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)):
        grad = grad.contiguous(memory_format=torch.channels_last if y.stride(1) == 1 else
                               torch.contiguous_format)
    gs = _pixel_strides(grad)
    placeholder = bn.mean
    scale, shift = affine if affine is not None else (placeholder, placeholder)
    src = mask_output if mask_output is not None else y
    y2 = second.y if second else y
    mean2 = second.mean if second else placeholder
    invstd2 = second.invstd if second else placeholder

    n_rblocks = triton.cdiv(M, BLOCK_R)
    n_programs = max(1, min(n_rblocks, MAX_ROW_PROGRAMS))
    rows_per_program = triton.cdiv(n_rblocks, n_programs) * BLOCK_R
    n_programs = triton.cdiv(M, rows_per_program) if M else 1
    partials = torch.empty((n_programs, 3, C), dtype=torch.float32, device=dev)
    n_cblocks = triton.cdiv(C, BLOCK_C)
    bn_backward_reduce_kernel[(n_programs, n_cblocks)](
        grad, *gs, src, y, bn.mean, bn.invstd, scale, shift, y2, mean2, invstd2, partials,
        M, C, HW, *s, rows_per_program, MASK=mask, HAS_SECOND=second is not None,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)

    vec = lambda: torch.empty(C, dtype=torch.float32, device=dev)  # noqa: E731
    dgamma, dbeta = new_like(vec()), new_like(vec())
    coef = torch.empty((3, C), dtype=torch.float32, device=dev)
    dgamma2 = new_like(vec()) if second else dgamma
    coef2 = torch.empty((3, C), dtype=torch.float32, device=dev) if second else coef
    bn_backward_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK_C),)](
        partials, n_programs, M, C, bn.invstd, bn.gamma if bn.gamma is not None else placeholder,
        invstd2, second.gamma if second and second.gamma is not None else placeholder,
        dgamma, dbeta, coef, dgamma2, coef2,
        HAS_GAMMA=bn.gamma is not None, HAS_SECOND=second is not None,
        HAS_GAMMA2=bool(second and second.gamma is not None),
        BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C)

    dy = new_like(y)
    dy2 = new_like(y) if second else dy
    g_out = new_like(y) if write_g else dy
    bn_backward_apply_kernel[(triton.cdiv(M, BLOCK_R), n_cblocks)](
        grad, *gs, src, y, bn.mean, coef, scale, shift, y2, mean2, coef2, dy, dy2, g_out,
        M, C, HW, *s, MASK=mask, HAS_SECOND=second is not None, WRITE_G=write_g,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return (dy, dgamma, dbeta, dy2 if second else None, dgamma2 if second else None,
            dbeta if second else None, g_out if write_g else None)
