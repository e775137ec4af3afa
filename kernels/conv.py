"""One fused convolution kernel family: implicit GEMM with a BN/residual/ReLU epilogue.

The convolution is computed as a GEMM whose rows are output pixels (m = n, p, q), whose columns
are output channels (k) and whose reduction runs over the filter taps and input channels
(r, s, c), in that order, so that a channels_last (NHWC) input is read contiguously along c.
Every tensor is addressed through its strides, so NCHW-contiguous, channels_last and other
strided inputs all work without a copy; the output is written in whatever layout the caller
allocated. The host side (choice of config, launch) is fastres/launch/conv.py.

Compile-time options (one kernel, no near-copies):
  HAS_BIAS        add a per-output-channel fp32 bias (the folded BatchNorm shift)
  HAS_RESIDUAL    add a residual tensor of the output's shape (the identity shortcut)
  HAS_SHORTCUT    a second GEMM into the same accumulator: a strided 1x1 conv of a second input
                  (the downsample conv1x1 + BN of a ResNet block), so that shortcut costs no
                  extra launch and its output never touches memory
  ACTIVATION      the activation before the store (kernels/common.py ACTIVATION_CODES: 0 none,
                  1 ReLU, ReLU6, SiLU, GELU erf / tanh, Hardswish, Hardsigmoid, 8 LeakyReLU with
                  the runtime slope act_slope)
  FLAT_C          > 0: reduce over the flattened (r, s, c) index, with C = FLAT_C known at
                  compile time, instead of one filter tap's block of channels per step; used
                  when C is small (the 7x7 stem has C = 3), where padding each tap's channel
                  block up to BLOCK_K would waste most of the work
  ROW_SPAN        with FLAT_C: x channels_last and the weight (K, R, S, C), so one filter row's
                  S*C elements are contiguous in both, and S*C <= BLOCK_K: each step reads one
                  filter row (the stem: 7 steps of 21 elements, with no index division per step)
  PADDED_ROWS     with ROW_SPAN: the weight's filter rows are BLOCK_K-aligned and zero-padded to
                  BLOCK_K in memory (fastres's folded stem weight), so a step's weight tile is
                  read whole, in aligned vectors (cp.async), with no mask along the row
  UPCAST          convert loaded operands to fp32 before tl.dot; needed under Triton's
                  interpreter, which holds bf16 as raw uint16 and gets bf16 dot products wrong
  INPUT_PRECISION "tf32" or "ieee" for fp32 operands on the GPU (ignored for fp16/bf16)
  INDEX_64        64-bit channel offsets, for inputs whose single-image extent passes 2^31
  PROLOGUE        apply a per-input-channel fp32 scale/shift and ReLU to x as it is loaded (the
                  previous layer's training-mode BatchNorm + ReLU, fused into this conv's loads);
                  padding stays zero, as it is zero in the unfused graph after that ReLU
  TMA             load both operands through tensor descriptors (TMA on sm_90): for a 1x1,
                  stride-1, unpadded conv of a dense channels_last x, x is the 2-D [N*H*W, C]
                  matrix and the weight the [K, C] one, a plain GEMM whose out-of-range rows and
                  channels the descriptors fill with zeros: no address arithmetic, no masks
  TMA_SHORTCUT    the same for the shortcut GEMM (a stride-1 downsample conv)
  EPILOGUE_TMA    store the output tile (and load the residual's) through descriptors of
                  dense channels_last tensors (TMA on sm_90), as [N*P*Q, K] matrices, or 4-D
                  [N, P, Q, K] tensors for output patches, which clip what lies past their
                  ends: no per-element addresses or masks in the epilogue
  GROUPED         a grouped conv (1 < groups): the grid's second axis is the group g, and C and
                  K are one group's channels; group g reads x's channels g*C.. and the weight's
                  rows g*K.. and writes the output's channels g*K.. (a ResNeXt / RegNet 3x3).
                  The dual GEMM's shortcut is not grouped: it reads all of x2's channels into
                  the group's K output channels
  TILE_W          > 0: the tile's BLOCK_M output pixels are a TILE_H x TILE_W patch of one image
                  (TILE_H = BLOCK_M // TILE_W, both powers of two) instead of BLOCK_M
                  consecutive pixels, so a row's (p, q) costs shifts, not two runtime divisions
                  (the ROW_SPAN stem takes them for that). With TMA a stride-1 conv (any
                  filter) loads each tap's input patch through a 4-D [N, H, W, C] descriptor
                  whose zero fill outside the image is the padding: no masks and no address
                  arithmetic in the loop (C % BLOCK_K == 0: the [K, R*S*C] weight descriptor's
                  tiles never straddle two taps)
  POOL            add the output's per-(image, channel) sums, as stored, into an fp32 (N, K)
                  buffer (at stats_ptr; atomics): the squeeze of an SE / ECA gate that follows
                  this conv, so that its mean costs no second read of the output
  STATS           write, for every chunk of STATS_CHUNK output rows, the per-channel mean and
                  sum of squared deviations (M2) of the output (fp32): batch statistics for a
                  training-mode BatchNorm, merged stably by kernels/bn_finalize.py
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.common import activate, pool_partial_sums, relu, round_to


@triton.jit
def _bn_relu_prologue(a, c, mask_c, mask_a, scale_ptr, shift_ptr):
    """relu(a * scale[c] + shift[c]) in fp32 for the loaded x tile a, zero where nothing was
    loaded (the padding is zero after the ReLU in the unfused graph too), rounded back to a's
    dtype as the unfused graph stores it."""
    scale = tl.load(scale_ptr + c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + c, mask=mask_c, other=0.0)
    act = relu(a.to(tl.float32) * scale[None, :] + shift[None, :])
    return round_to(tl.where(mask_a, act, 0.0), a.dtype)


@triton.jit
def _dot(acc, a, b, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b; UPCAST: in fp32 (Triton's interpreter gets bf16 dot products wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _next_block(tap, c0, C, BLOCK_K: tl.constexpr):
    """The (filter tap, first channel) of the step after (tap, c0) in a single loop over taps
    and blocks of BLOCK_K channels: carried from step to step, because a runtime division per
    step would cost more than the rest of the step's address arithmetic."""
    c0 += BLOCK_K
    next_tap = c0 >= C
    return tl.where(next_tap, tap + 1, tap), tl.where(next_tap, 0, c0)


@triton.jit
def _accumulate_flat(acc, x_rows, w_cols, h0, w0, mask_m, mask_n, H, W,
                     stride_xc, stride_xh, stride_xw, stride_wc, stride_wr, stride_ws,
                     dil_h, dil_w, scale_ptr, shift_ptr,
                     R: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
                     SPATIAL_MASK: tl.constexpr, UPCAST: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
                     PROLOGUE: tl.constexpr, ROW_SPAN: tl.constexpr, PADDED_ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """acc += the conv over the flattened (r, s, c) index, C a compile-time constant: the stem
    (C = 3), where padding each tap's channels to BLOCK_K would waste most of the work.
    x_rows: each output row's base pointer into x (h0, w0: its top-left input pixel).

    ROW_SPAN (x channels_last with its pixels C apart, the weight (K, R, S, C), no dilation
    along w, S*C <= BLOCK_K; the host decides): for one filter row r, the S*C elements (s, c)
    an output pixel reads are contiguous in x, and in the weight, so each step reads one filter
    row at offsets j = s*C + c that are the same in every step: the column bounds
    (0 <= w0 + s < W) are computed once per tile, and a step costs a row check and one scalar
    offset."""
    offs_k = tl.arange(0, BLOCK_K)
    if ROW_SPAN:
        in_span = offs_k < S * C
        span_c = offs_k % C
        mask_span = mask_m[:, None] & in_span[None, :]
        if SPATIAL_MASK:
            w = w0[:, None] + (offs_k // C)[None, :]
            mask_span = mask_span & (w.to(tl.uint32) < W.to(tl.uint32))
        mask_b = in_span[:, None] & mask_n[None, :]
        if INDEX_64:
            k_off_x = offs_k.to(tl.int64)
        else:
            k_off_x = offs_k
        for row in range(0, R):
            row_dh = row * dil_h
            mask_a = mask_span
            if SPATIAL_MASK:
                mask_a = mask_a & ((h0 + row_dh).to(tl.uint32) < H.to(tl.uint32))[:, None]
            if INDEX_64:
                x_off = row_dh.to(tl.int64) * stride_xh
            else:
                x_off = row_dh * stride_xh
            a = tl.load(x_rows[:, None] + (x_off + k_off_x)[None, :], mask=mask_a, other=0.0)
            if PROLOGUE:
                a = _bn_relu_prologue(a, span_c, in_span, mask_a, scale_ptr, shift_ptr)
            if PADDED_ROWS:
                # Rows zero-padded to BLOCK_K, BLOCK_K-aligned: aligned vector loads, no k mask.
                b = tl.load(w_cols[None, :] + (row * stride_wr + offs_k)[:, None],
                            mask=mask_n[None, :], other=0.0)
            else:
                b = tl.load(w_cols[None, :] + (row * stride_wr + offs_k)[:, None], mask=mask_b,
                            other=0.0)
            acc = _dot(acc, a, b, UPCAST, INPUT_PRECISION)
    else:
        red = R * S * C
        for k0 in range(0, red, BLOCK_K):
            kk = k0 + offs_k
            c = kk % C
            r = kk // (S * C)
            s = (kk // C) % S
            dh = r * dil_h
            dw = s * dil_w
            mask_k = kk < red
            mask_a = mask_m[:, None] & mask_k[None, :]
            if SPATIAL_MASK:
                h = h0[:, None] + dh[None, :]
                w = w0[:, None] + dw[None, :]
                mask_a = mask_a & (h.to(tl.uint32) < H.to(tl.uint32)) & (w.to(tl.uint32) < W.to(tl.uint32))
            if INDEX_64:
                k_off = (dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw
                         + c.to(tl.int64) * stride_xc)
            else:
                k_off = dh * stride_xh + dw * stride_xw + c * stride_xc
            a = tl.load(x_rows[:, None] + k_off[None, :], mask=mask_a, other=0.0)
            if PROLOGUE:
                a = _bn_relu_prologue(a, c, mask_k, mask_a, scale_ptr, shift_ptr)
            b = tl.load(w_cols[None, :] + (c * stride_wc + r * stride_wr + s * stride_ws)[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(acc, a, b, UPCAST, INPUT_PRECISION)
    return acc


@triton.jit
def _accumulate_step(acc, x_rows, w_cols, x_off, w_off, c0, offs_k, k_off_x, k_off_w, valid,
                     mask_n, C, scale_ptr, shift_ptr, x_desc, w_desc, m0, n0,
                     EVEN_C: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     PROLOGUE: tl.constexpr, TMA: tl.constexpr):
    """acc += x[rows, tap, c0 + k] @ w[tap, c0 + k, cols] for one filter tap (the scalar offsets
    x_off, w_off, channel c0 included) and one block of channels (k_off_x / k_off_w: the
    block's channel offsets, computed once per tile); rows outside the image (not valid) read
    zeros. Only one vector addition per operand and step: Triton's interpreter checks every
    int32 vector operation for overflow, which made per-step index arithmetic its bottleneck.
    TMA (a 1x1 conv): both tiles come from the descriptors instead, at rows m0 of x and n0 of
    the weight, column c0."""
    mask_c = offs_k < C - c0
    if EVEN_C:
        mask_a = valid[:, None]
        mask_b = mask_n[None, :]
    else:
        mask_a = valid[:, None] & mask_c[None, :]
        mask_b = mask_c[:, None] & mask_n[None, :]
    if TMA:
        a = x_desc.load([m0, c0])
    else:
        a = tl.load(x_rows[:, None] + (x_off + k_off_x)[None, :], mask=mask_a, other=0.0)
    if PROLOGUE:
        a = _bn_relu_prologue(a, c0 + offs_k, mask_c, valid[:, None] & mask_c[None, :],
                              scale_ptr, shift_ptr)
    if TMA:
        b = w_desc.load([n0, c0]).T
    else:
        b = tl.load(w_cols[None, :] + (w_off + k_off_w)[:, None], mask=mask_b, other=0.0)
    return _dot(acc, a, b, UPCAST, INPUT_PRECISION)


@triton.jit
def _tap(tap, c0, h0, w0, mask_m, H, W, stride_xc, stride_xh, stride_xw, stride_wc,
         stride_wr, stride_ws, dil_h, dil_w, S: tl.constexpr, SPATIAL_MASK: tl.constexpr,
         INDEX_64: tl.constexpr):
    """For filter tap number `tap` and first channel c0: the rows whose input pixel is inside
    the image (0 <= h < H as one unsigned comparison: a negative h wraps to a huge value), and
    the scalar offsets into x and into the weights."""
    r = tap // S
    s = tap - r * S
    dh = r * dil_h
    dw = s * dil_w
    valid = mask_m
    if SPATIAL_MASK:
        valid = (valid & ((h0 + dh).to(tl.uint32) < H.to(tl.uint32))
                 & ((w0 + dw).to(tl.uint32) < W.to(tl.uint32)))
    if INDEX_64:
        x_off = (dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw
                 + c0.to(tl.int64) * stride_xc)
    else:
        x_off = dh * stride_xh + dw * stride_xw + c0 * stride_xc
    return valid, x_off, r * stride_wr + s * stride_ws + c0 * stride_wc


@triton.jit
def _accumulate_taps(acc, x_rows, w_cols, h0, w0, mask_m, mask_n, C, H, W,
                     stride_xc, stride_xh, stride_xw, stride_wc, stride_wr, stride_ws,
                     dil_h, dil_w, scale_ptr, shift_ptr, x_desc, w_desc, m0, n0,
                     R: tl.constexpr, S: tl.constexpr, EVEN_C: tl.constexpr,
                     SPATIAL_MASK: tl.constexpr, NESTED: tl.constexpr, UPCAST: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
                     PROLOGUE: tl.constexpr, TMA: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the conv, one step per (filter tap, block of BLOCK_K channels).

    By default all steps form ONE loop, so that Triton pipelines the loads across taps instead
    of draining the pipeline at the end of each tap; the tap and first channel are carried from
    step to step (a runtime division per step would cost more than the rest of the address
    arithmetic). NESTED (the host's choice when a tap has many channel blocks) loops over taps,
    then channel blocks: the per-tap work (bounds, offsets) is then done once per tap, and the
    drain at each tap's end is amortised. x_rows: each output row's base pointer into x (h0,
    w0: its top-left input pixel), w_cols: each output channel's into the weights, computed
    once per tile. EVEN_C: C % BLOCK_K == 0, so no channel mask. SPATIAL_MASK: taps can fall
    outside the image (padding, or a filter larger than 1x1). TMA: load through x_desc and
    w_desc (a 1x1 conv; m0, n0: the tile's first row and output channel)."""
    offs_k = tl.arange(0, BLOCK_K)
    if INDEX_64:
        k_off_x = offs_k.to(tl.int64) * stride_xc
    else:
        k_off_x = offs_k * stride_xc
    k_off_w = offs_k * stride_wc
    if NESTED:
        for tap in range(0, R * S):
            valid, x_off, w_off = _tap(tap, 0, h0, w0, mask_m, H, W, stride_xc, stride_xh,
                                       stride_xw, stride_wc, stride_wr, stride_ws, dil_h, dil_w,
                                       S, SPATIAL_MASK, INDEX_64)
            for c0 in range(0, C, BLOCK_K):
                if INDEX_64:
                    c_x = c0.to(tl.int64) * stride_xc
                else:
                    c_x = c0 * stride_xc
                acc = _accumulate_step(acc, x_rows, w_cols, x_off + c_x, w_off + c0 * stride_wc,
                                       c0, offs_k, k_off_x, k_off_w, valid, mask_n, C,
                                       scale_ptr, shift_ptr, x_desc, w_desc, m0, n0, EVEN_C,
                                       UPCAST, INPUT_PRECISION, PROLOGUE, TMA)
    else:
        tap = 0
        c0 = 0
        for _ in range(0, R * S * tl.cdiv(C, BLOCK_K)):
            valid, x_off, w_off = _tap(tap, c0, h0, w0, mask_m, H, W, stride_xc, stride_xh,
                                       stride_xw, stride_wc, stride_wr, stride_ws, dil_h, dil_w,
                                       S, SPATIAL_MASK, INDEX_64)
            acc = _accumulate_step(acc, x_rows, w_cols, x_off, w_off, c0, offs_k, k_off_x,
                                   k_off_w, valid, mask_n, C, scale_ptr, shift_ptr, x_desc,
                                   w_desc, m0, n0, EVEN_C, UPCAST, INPUT_PRECISION, PROLOGUE,
                                   TMA)
            tap, c0 = _next_block(tap, c0, C, BLOCK_K)
    return acc


@triton.jit
def _accumulate_patches(acc, x_desc, w_desc, tile_n, p0, q0, n0, C, pad_h, pad_w, dil_h, dil_w,
                        S: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, TILE_H: tl.constexpr,
                        TILE_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the stride-1 conv of the output patch (tile_n, p0.., q0..) by TMA, one step per
    (filter tap, block of channels): each step's x tile is the input patch shifted by the tap,
    which the descriptor loads with zeros outside the image (the padding), and its weight tile
    columns step * BLOCK_K of the [K, R*S*C] matrix (C % BLOCK_K == 0)."""
    tap = 0
    c0 = 0
    for step in range(0, R * S * (C // BLOCK_K)):
        r = tap // S
        s = tap - r * S
        patch = x_desc.load([tile_n, p0 + r * dil_h - pad_h, q0 + s * dil_w - pad_w, c0])
        a = patch.reshape(TILE_H * TILE_W, BLOCK_K)
        b = w_desc.load([n0, step * BLOCK_K]).T
        acc = _dot(acc, a, b, UPCAST, INPUT_PRECISION)
        tap, c0 = _next_block(tap, c0, C, BLOCK_K)
    return acc


@triton.jit
def _tile_offsets(offs_m, n_idx, p_idx, q_idx, offs_n, stride_n, stride_c, stride_h, stride_w,
                  ROWS_DENSE: tl.constexpr):
    """int64 element offsets of an output-shaped (N, K, P, Q) tile: row m = (n, p, q), column
    k. ROWS_DENSE: row m sits at m * stride_w (dense channels_last), so (n, p, q) is not used."""
    if ROWS_DENSE:
        rows = offs_m.to(tl.int64) * stride_w
    else:
        rows = (n_idx.to(tl.int64) * stride_n + p_idx.to(tl.int64) * stride_h
                + q_idx.to(tl.int64) * stride_w)
    return rows[:, None] + offs_n.to(tl.int64)[None, :] * stride_c


@triton.jit
def fused_conv2d_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, x2_ptr, w2_ptr, out_ptr, scale_ptr, shift_ptr, stats_ptr,
        x_desc, w_desc, x2_desc, w2_desc, o_desc, r_desc,
        N, C, H, W, K, P, Q, C2, H2, W2,
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_wk, stride_wc, stride_wr, stride_ws,
        stride_x2n, stride_x2c, stride_x2h, stride_x2w,
        stride_w2k, stride_w2c,
        stride_rn, stride_rc, stride_rh, stride_rw,
        stride_on, stride_oc, stride_oh, stride_ow,
        conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
        shortcut_stride_h, shortcut_stride_w, act_slope,
        R: tl.constexpr, S: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
        ACTIVATION: tl.constexpr, FLAT_C: tl.constexpr, ROW_SPAN: tl.constexpr,
        PADDED_ROWS: tl.constexpr, EVEN_C: tl.constexpr,
        EVEN_C2: tl.constexpr, SPATIAL_MASK: tl.constexpr, OUT_ROWS_DENSE: tl.constexpr,
        RES_ROWS_DENSE: tl.constexpr, NESTED: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, PROLOGUE: tl.constexpr,
        TMA: tl.constexpr, TMA_SHORTCUT: tl.constexpr, TILE_W: tl.constexpr,
        EPILOGUE_TMA: tl.constexpr, STATS: tl.constexpr,
        STATS_CHUNK: tl.constexpr, GROUPED: tl.constexpr, POOL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """out = act(conv(prologue?(x), w) + bias + conv1x1(x2, w2) + residual), stats of it.

    Tensors (element strides, any layout; pointers not used by the options are placeholders):
      x_ptr      input (N, C, H, W), strides stride_x{n,c,h,w}
      w_ptr      weight (K, C, R, S), strides stride_w{k,c,r,s} (BN folded in, or raw in training)
      bias_ptr   fp32 (K,)                                          [HAS_BIAS]
      res_ptr    residual (N, K, P, Q), strides stride_r{n,c,h,w}    [HAS_RESIDUAL]
      x2_ptr     shortcut input (N, C2, H2, W2), strides stride_x2{n,c,h,w}   [HAS_SHORTCUT]
      w2_ptr     shortcut 1x1 weight (K, C2, 1, 1), strides stride_w2{k,c}    [HAS_SHORTCUT]
      out_ptr    output (N, K, P, Q), strides stride_o{n,c,h,w}; its dtype is the store's
      scale_ptr, shift_ptr   fp32 (C,) prologue BN scale/shift       [PROLOGUE]
      stats_ptr  fp32 (cdiv(N*P*Q, STATS_CHUNK), 2, K) per-chunk (mean, M2)   [STATS]
                 or fp32 (N, K) per-image sums of the output, added to       [POOL]
      x_desc, w_desc     descriptors of x as [N*H*W, C], block [BLOCK_M, BLOCK_K], and of w
                 as [K, C], block [BLOCK_N, BLOCK_K]                  [TMA, a 1x1 conv]
                 or of x as [N, H, W, C], block [1, TILE_H, TILE_W, BLOCK_K], and of w as
                 [K, R*S*C], block [BLOCK_N, BLOCK_K]                 [TMA, TILE_W > 0]
      x2_desc, w2_desc   the same for x2 and w2                       [TMA_SHORTCUT]
      o_desc, r_desc     the output and the residual as [N*P*Q, K], block [BLOCK_M, BLOCK_N],
                 or with TILE_W as [N, P, Q, K], block [1, TILE_H, TILE_W, BLOCK_N]
                                                                      [EPILOGUE_TMA]
    Geometry: conv_stride_{h,w}, pad_{h,w}, dil_{h,w} of the main conv; shortcut_stride_{h,w}
    of the 1x1 shortcut conv (unpadded); act_slope: LeakyReLU's negative slope.
    Grid: cdiv(N*P*Q, BLOCK_M) * cdiv(K, BLOCK_N) tiles, or with TILE_W,
    N * cdiv(P, TILE_H) * cdiv(Q, TILE_W) * cdiv(K, BLOCK_N); with GROUPED, times the groups
    along the grid's second axis (C and K then count one group's channels).
    Facts the host proves, so the kernel can skip work: FLAT_C (the flattened stem reduction's
    C, else 0), EVEN_C / EVEN_C2 (C, C2 divisible by BLOCK_K), NESTED (loop over taps, then
    channel blocks, for many channel blocks per tap), SPATIAL_MASK (taps can leave the
    image), OUT_ROWS_DENSE / RES_ROWS_DENSE (the output's / residual's row m = (n, p, q) sits
    at m * stride_{o,r}w, as in a dense channels_last tensor, so no (n, p, q) is needed),
    TMA / TMA_SHORTCUT (a 1x1, stride-1 GEMM of dense channels_last operands)."""
    tl.static_assert(not (STATS and TILE_W > 0), "STATS chunks are runs of consecutive rows")
    tl.static_assert(not (STATS and POOL), "one statistics buffer")
    tl.static_assert(not (PROLOGUE and TMA and TILE_W > 0), "the TMA patch loop has no prologue")
    tl.static_assert(not (GROUPED and (PROLOGUE or STATS or TMA or TMA_SHORTCUT or EPILOGUE_TMA
                                       or ROW_SPAN)),
                     "grouped convs take the pointer path, in eval mode")
    if GROUPED:
        # This program's group: its slice of x's channels, of the weight's and the shortcut
        # weight's rows, and of the output's (and residual's and bias's) channels.
        group = tl.program_id(1).to(tl.int64)
        x_ptr += group * C * stride_xc
        w_ptr += group * K * stride_wk
        w2_ptr += group * K * stride_w2k
        bias_ptr += group * K
        res_ptr += group * K * stride_rc
        out_ptr += group * K * stride_oc
    M = N * P * Q
    TILE_H: tl.constexpr = BLOCK_M // TILE_W if TILE_W > 0 else 1
    patches_h = tl.cdiv(P, TILE_H)
    patches_w = tl.cdiv(Q, TILE_W) if TILE_W > 0 else 1
    # Grouped launch order: GROUP_M row-tiles share each column tile so weights stay in L2.
    pid = tl.program_id(0)
    if TILE_W > 0:
        num_pid_m = N * patches_h * patches_w
    else:
        num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group_id = pid // pids_per_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < K
    if TILE_W > 0:
        # A TILE_H x TILE_W patch of image tile_n; its rows m = (n, p, q) are not consecutive.
        tile_n = pid_m // (patches_h * patches_w)
        patch = pid_m % (patches_h * patches_w)
        p0 = (patch // patches_w) * TILE_H
        q0 = (patch % patches_w) * TILE_W
        i = tl.arange(0, BLOCK_M)
        p_idx = p0 + i // TILE_W
        q_idx = q0 + i % TILE_W
        n_idx = tile_n + 0 * i
        mask_m = (p_idx < P) & (q_idx < Q)
        offs_m = (n_idx * P + p_idx) * Q + q_idx
    else:
        tile_n = 0
        p0 = 0
        q0 = 0
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        n_idx = offs_m // (P * Q)
        pq = offs_m % (P * Q)
        p_idx = pq // Q
        q_idx = pq % Q

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h0 = p_idx * conv_stride_h - pad_h
    w0 = q_idx * conv_stride_w - pad_w
    # Per row and per output channel, the base addresses, once per tile (int64 rows: the batch
    # stride times N can pass 2^31).
    x_rows = x_ptr + (n_idx.to(tl.int64) * stride_xn + h0.to(tl.int64) * stride_xh
                      + w0.to(tl.int64) * stride_xw)
    w_cols = w_ptr + offs_n * stride_wk
    # The downsample branch of a block: a 1x1, unpadded, strided conv of the block input,
    # reduced into the same accumulator (its folded BN shift is already part of the bias).
    x2_rows = x2_ptr + (n_idx.to(tl.int64) * stride_x2n
                        + (p_idx * shortcut_stride_h).to(tl.int64) * stride_x2h
                        + (q_idx * shortcut_stride_w).to(tl.int64) * stride_x2w)
    w2_cols = w2_ptr + offs_n * stride_w2k
    if TMA and TILE_W > 0:
        acc = _accumulate_patches(acc, x_desc, w_desc, tile_n, p0, q0, pid_n * BLOCK_N, C, pad_h,
                                  pad_w, dil_h, dil_w, S, R, UPCAST, INPUT_PRECISION, TILE_H, TILE_W,
                                  BLOCK_K)
    elif FLAT_C > 0:
        acc = _accumulate_flat(acc, x_rows, w_cols, h0, w0, mask_m, mask_n, H, W,
                               stride_xc, stride_xh, stride_xw, stride_wc, stride_wr, stride_ws,
                               dil_h, dil_w, scale_ptr, shift_ptr, R, S, FLAT_C, SPATIAL_MASK,
                               UPCAST, INPUT_PRECISION, INDEX_64, PROLOGUE, ROW_SPAN, PADDED_ROWS,
                               BLOCK_K)
    else:
        acc = _accumulate_taps(acc, x_rows, w_cols, h0, w0, mask_m, mask_n, C, H, W,
                               stride_xc, stride_xh, stride_xw, stride_wc, stride_wr, stride_ws,
                               dil_h, dil_w, scale_ptr, shift_ptr, x_desc, w_desc,
                               pid_m * BLOCK_M, pid_n * BLOCK_N, R, S, EVEN_C, SPATIAL_MASK,
                               NESTED, UPCAST, INPUT_PRECISION, INDEX_64, PROLOGUE, TMA, BLOCK_K)
    if HAS_SHORTCUT:
        # A second loop: one loop over both reductions would have to select between two base
        # pointers per step, which costs Triton the operands' alignment (no cp.async, spills).
        acc = _accumulate_taps(acc, x2_rows, w2_cols, h0, w0, mask_m, mask_n, C2, H2, W2,
                               stride_x2c, 0, 0, stride_w2c, 0, 0, 1, 1, scale_ptr, shift_ptr,
                               x2_desc, w2_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, 1, 1, EVEN_C2,
                               False, False, UPCAST, INPUT_PRECISION, INDEX_64, False,
                               TMA_SHORTCUT, BLOCK_K)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if STATS:
        # Per chunk of STATS_CHUNK rows: mean and M2 around that chunk's own mean, so that the
        # merge never subtracts two large sums (no E[x^2] - E[x]^2 cancellation). The chunk
        # size is fixed, not BLOCK_M, so the host knows the layout whatever config runs.
        CHUNKS: tl.constexpr = BLOCK_M // STATS_CHUNK
        vals = tl.reshape(acc, (CHUNKS, STATS_CHUNK, BLOCK_N))
        rows = tl.reshape(mask_m, (CHUNKS, STATS_CHUNK))
        count = tl.maximum(tl.sum(rows.to(tl.float32), axis=1), 1.0)
        mean = tl.sum(tl.where(rows[:, :, None], vals, 0.0), axis=1) / count[:, None]
        dev = tl.where(rows[:, :, None], vals - mean[:, None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        chunk = pid_m * CHUNKS + tl.arange(0, CHUNKS)
        s_off = chunk.to(tl.int64)[:, None] * (2 * K) + offs_n[None, :]
        s_mask = (chunk * STATS_CHUNK < M)[:, None] & mask_n[None, :]
        tl.store(stats_ptr + s_off, mean, mask=s_mask)
        tl.store(stats_ptr + s_off + K, m2, mask=s_mask)
    if HAS_RESIDUAL:
        if EPILOGUE_TMA and TILE_W > 0:
            res = r_desc.load([tile_n, p0, q0, pid_n * BLOCK_N])
            acc += res.reshape(BLOCK_M, BLOCK_N).to(tl.float32)
        elif EPILOGUE_TMA:
            acc += r_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N]).to(tl.float32)
        else:
            r_off = _tile_offsets(offs_m, n_idx, p_idx, q_idx, offs_n, stride_rn, stride_rc,
                                  stride_rh, stride_rw, RES_ROWS_DENSE)
            acc += tl.load(res_ptr + r_off, mask=mask_out, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        acc = activate(acc, ACTIVATION, act_slope)
    stored = round_to(acc, out_ptr.dtype.element_ty)
    if POOL:
        if GROUPED:
            pool_ptr = stats_ptr + group * K
            stride_pool_n = K * tl.num_programs(1)
        else:
            pool_ptr = stats_ptr
            stride_pool_n = K
        pool_partial_sums(pool_ptr, stored, mask_out, n_idx, offs_n, mask_n, pid_m * BLOCK_M,
                          tl.minimum(pid_m * BLOCK_M + BLOCK_M, M), P * Q, stride_pool_n, tile_n,
                          TILE_W > 0)
    if EPILOGUE_TMA and TILE_W > 0:
        # The 4-D descriptor clips the patch's rows and columns outside the output.
        o_desc.store([tile_n, p0, q0, pid_n * BLOCK_N], stored.reshape(1, TILE_H, TILE_W, BLOCK_N))
    elif EPILOGUE_TMA:
        # The descriptor clips the rows and channels past the output's end.
        o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], stored)
    else:
        o_off = _tile_offsets(offs_m, n_idx, p_idx, q_idx, offs_n, stride_on, stride_oc,
                              stride_oh, stride_ow, OUT_ROWS_DENSE)
        tl.store(out_ptr + o_off, stored, mask=mask_out)
