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
The host side (sizes, partial buffers, launches) is fastres/launch/bn.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.common import round_to

# Where the ReLU's mask comes from (the MASK constexpr; the host passes these values).
NO_MASK = tl.constexpr(0)            # no ReLU after the BN
MASK_FROM_OUTPUT = tl.constexpr(1)   # the forward's saved ReLU output (relu_out_ptr)
MASK_FROM_AFFINE = tl.constexpr(2)   # recomputed as y * scale + shift (the prologue's ReLU)


@triton.jit
def _masked_grad(g_ptr, g_off, relu_out_ptr, off, y, scale, shift, mask, MASK: tl.constexpr):
    """The ReLU's backward as torch's threshold_backward(g, v, 0) computes it: 0 where v <= 0
    (exactly 0, even for an inf or NaN g), g elsewhere - a NaN v passes g through."""
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if MASK == MASK_FROM_OUTPUT:
        out = tl.load(relu_out_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(out <= 0, 0.0, g)
    if MASK == MASK_FROM_AFFINE:
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
def bn_backward_reduce_kernel(g_ptr, stride_gn, stride_gp, stride_gc, relu_out_ptr, y_ptr,
                              mean_ptr, invstd_ptr, scale_ptr, shift_ptr, y2_ptr, mean2_ptr,
                              invstd2_ptr, partial_ptr, M, C, HW, stride_n, stride_p, stride_c,
                              rows_per_program,
                              MASK: tl.constexpr, HAS_SECOND: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sums of g, g * xhat (and g * xhat2) over rows_per_program rows per program.

    Arguments (M = N * HW rows, row = n * HW + pixel, C channels):
      g_ptr         upstream gradient, strides (batch, pixel, channel) = stride_g{n,p,c}
      relu_out_ptr  the forward's ReLU output [MASK == MASK_FROM_OUTPUT]
      y_ptr         the BN's raw input; y2_ptr the second BN's [HAS_SECOND]; both and
                    relu_out_ptr with strides stride_{n,p,c}
      mean_ptr, invstd_ptr (mean2_ptr, invstd2_ptr)   fp32 (C,) batch statistics of the forward
      scale_ptr, shift_ptr  fp32 (C,) the forward's BN affine [MASK == MASK_FROM_AFFINE]
      partial_ptr   fp32 (programs along rows, 3, C) output: sum g, sum g*xhat, sum g*xhat2
    Grid: (cdiv(M, rows_per_program), cdiv(C, BLOCK_C))."""
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
        off = (n * stride_n + hw * stride_p)[:, None] + offs_c[None, :].to(tl.int64) * stride_c
        g_off = (n * stride_gn + hw * stride_gp)[:, None] + offs_c[None, :].to(tl.int64) * stride_gc
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(g_ptr, g_off, relu_out_ptr, off, y, scale, shift, mask, MASK)
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
    """Sums the n_partials rows of partial_ptr (fp32 (n_partials, 3, C)) and writes, per
    channel, dbeta_ptr and dgamma_ptr (fp32 (C,)) and coef_ptr (fp32 (3, C): a, b, c of
    dL/dy = a * g + b * (y - mean) + c); the same for the second BN [HAS_SECOND] into
    dgamma2_ptr, coef2_ptr. gamma_ptr/gamma2_ptr: the BNs' weights [HAS_GAMMA/HAS_GAMMA2];
    invstd_ptr/invstd2_ptr: fp32 (C,). Grid: cdiv(C, BLOCK_C)."""
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
def bn_backward_apply_kernel(g_ptr, stride_gn, stride_gp, stride_gc, relu_out_ptr, y_ptr,
                             mean_ptr, coef_ptr, scale_ptr, shift_ptr, y2_ptr, mean2_ptr,
                             coef2_ptr, dy_ptr, dy2_ptr, gout_ptr, M, C, HW,
                             stride_n, stride_p, stride_c,
                             MASK: tl.constexpr, HAS_SECOND: tl.constexpr, WRITE_G: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL/dy into dy_ptr (and dL/dy2 into dy2_ptr [HAS_SECOND], the masked g itself into
    gout_ptr [WRITE_G]), all with y's strides stride_{n,p,c}; the other arguments as in
    bn_backward_reduce_kernel, coef_ptr/coef2_ptr from the finalize. Grid: (cdiv(M, BLOCK_R),
    cdiv(C, BLOCK_C))."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    n = (rows // HW).to(tl.int64)
    hw = (rows % HW).to(tl.int64)
    off = (n * stride_n + hw * stride_p)[:, None] + offs_c[None, :].to(tl.int64) * stride_c
    g_off = (n * stride_gn + hw * stride_gp)[:, None] + offs_c[None, :].to(tl.int64) * stride_gc
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = _masked_grad(g_ptr, g_off, relu_out_ptr, off, y, scale, shift, mask, MASK)
    _store_input_grad(g, y, mean_ptr, coef_ptr, dy_ptr, off, offs_c, mask_c, mask, C)
    if HAS_SECOND:
        y2 = tl.load(y2_ptr + off, mask=mask, other=0.0).to(tl.float32)
        _store_input_grad(g, y2, mean2_ptr, coef2_ptr, dy2_ptr, off, offs_c, mask_c, mask, C)
    if WRITE_G:
        tl.store(gout_ptr + off, round_to(g, gout_ptr.dtype.element_ty), mask=mask)
