"""Depthwise convolution (groups = input channels) with the fused conv's epilogue.

A depthwise conv reduces over one input channel's R*S taps only: as an implicit GEMM each
group would be a (pixels x 1) @ (1 x multiplier) product per tap, which leaves a tensor core's
tile almost empty. So this family is a direct convolution on the CUDA cores: a tile is BLOCK_M
output pixels (m = n, p, q) by BLOCK_C output channels, and each filter tap adds
x[pixel + tap, channel] * w[channel, tap] to an fp32 accumulator. Output channel k reads input
channel k // MULTIPLIER (a channel multiplier > 1: K = C * MULTIPLIER). Along the tile's
channels a channels_last x and output are contiguous, so the loads and stores are vectors;
other layouts work through the strides, without copies. The epilogue is the fused conv's:
folded-BN bias, a residual, the activation (kernels/common.py), one rounding store.

Compile-time options:
  R, S            the filter (unrolled: a depthwise filter is at most 7x7 in the models)
  MULTIPLIER      output channels per input channel
  HAS_BIAS, HAS_RESIDUAL, ACTIVATION   as in kernels/conv.py
  SPATIAL_MASK    taps can fall outside the image (padding)
  POOL            add the output's per-(image, channel) sums into the fp32 (N, K) buffer at
                  pool_ptr (kernels/conv.py's POOL: an SE gate after a depthwise conv)
  OUT_ROWS_DENSE / RES_ROWS_DENSE      as in kernels/conv.py: row m at m * stride_w
The host side is fastres/launch/depthwise.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.common import activate, pool_partial_sums, round_to
from fastres.kernels.conv import _tile_offsets


@triton.jit
def depthwise_conv2d_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, pool_ptr,
        N, H, W, K, P, Q,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_wk, stride_wr, stride_ws,
        stride_rn, stride_rc, stride_rh, stride_rw,
        stride_on, stride_oc, stride_oh, stride_ow,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w, act_slope,
        R: tl.constexpr, S: tl.constexpr, MULTIPLIER: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
        SPATIAL_MASK: tl.constexpr, OUT_ROWS_DENSE: tl.constexpr, RES_ROWS_DENSE: tl.constexpr,
        POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = act(depthwise_conv(x, w) + bias + residual).

    x (N, C, H, W), w (K, 1, R, S) with K = C * MULTIPLIER, bias fp32 (K,), residual and out
    (N, K, P, Q); all by element strides. Grid: (cdiv(N*P*Q, BLOCK_M), cdiv(K, BLOCK_C))."""
    M = N * P * Q
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_k = offs_k < K
    n_idx = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p_idx = pq // Q
    q_idx = pq % Q
    h0 = p_idx * conv_stride_h - pad_h
    w0 = q_idx * conv_stride_w - pad_w
    # Per row and per channel, the base offsets, once per tile (int64 rows: N's stride times N
    # can pass 2^31); each tap then adds one scalar.
    x_rows = x_ptr + (n_idx.to(tl.int64) * stride_xn + h0.to(tl.int64) * stride_xh
                      + w0.to(tl.int64) * stride_xw)
    x_cols = (offs_k // MULTIPLIER).to(tl.int64) * stride_xc
    w_cols = w_ptr + offs_k * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r in tl.static_range(R):
        for s in tl.static_range(S):
            valid = mask_m
            if SPATIAL_MASK:
                valid = (valid & ((h0 + r * dil_h).to(tl.uint32) < H.to(tl.uint32))
                         & ((w0 + s * dil_w).to(tl.uint32) < W.to(tl.uint32)))
            # (tl.cast: with dilation 1, specialised to a constant, r * dil_h is a Python int)
            tap = (tl.cast(r * dil_h, tl.int64) * stride_xh
                   + tl.cast(s * dil_w, tl.int64) * stride_xw)
            a = tl.load(x_rows[:, None] + (tap + x_cols)[None, :],
                        mask=valid[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols + r * stride_wr + s * stride_ws, mask=mask_k, other=0.0)
            acc += a.to(tl.float32) * b.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    mask_out = mask_m[:, None] & mask_k[None, :]
    if HAS_RESIDUAL:
        r_off = _tile_offsets(offs_m, n_idx, p_idx, q_idx, offs_k, stride_rn, stride_rc,
                              stride_rh, stride_rw, RES_ROWS_DENSE)
        acc += tl.load(res_ptr + r_off, mask=mask_out, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        acc = activate(acc, ACTIVATION, act_slope)
    stored = round_to(acc, out_ptr.dtype.element_ty)
    if POOL:
        row0 = tl.program_id(0) * BLOCK_M
        pool_partial_sums(pool_ptr, stored, mask_out, n_idx, offs_k, mask_k, row0,
                          tl.minimum(row0 + BLOCK_M, M), P * Q, K, 0, False)
    o_off = _tile_offsets(offs_m, n_idx, p_idx, q_idx, offs_k, stride_on, stride_oc, stride_oh,
                          stride_ow, OUT_ROWS_DENSE)
    tl.store(out_ptr + o_off, stored, mask=mask_out)
