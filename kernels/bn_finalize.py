"""Training-mode BatchNorm finalize in one launch: merge the conv epilogue's per-chunk statistics,
compute the new running statistics, and produce the scale/shift the next conv's prologue applies.

For each channel (a program per block of channels):
  mean = sum n_i mean_i / M;  M2 = sum M2_i + sum n_i (mean_i - mean)^2   (Chan et al.; stable)
  var = M2 / M (biased, normalises the batch); running_var uses M2 / (M - 1) (unbiased)
  running = (1 - f) running + f batch, with f = momentum, or 1 / (num_batches_tracked + 1) when
  momentum is None (num_batches_tracked is the count before this batch: the caller increments it
  once the whole op succeeded, so a failed call changes nothing); the new running statistics go
  to new tensors
  scale = weight / sqrt(var + eps);  shift = bias - mean * scale
It also writes mean and 1/sqrt(var + eps) for the backward pass.
The host side (fastres/launch/bn.py) sizes the launch and reads the results.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.common import round_to


@triton.jit
def bn_finalize_kernel(stats_ptr, n_chunks, M, K, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr,
                       nbt_ptr, new_rmean_ptr, new_rvar_ptr, scale_ptr, shift_ptr, mean_ptr,
                       invstd_ptr, eps, momentum,
                       CHUNK: tl.constexpr, HAS_AFFINE: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CHUNKS: tl.constexpr):
    """Arguments: stats_ptr fp32 (n_chunks, 2, K), per chunk of CHUNK output rows (the last
    one short, M rows in all) the (mean, M2) the conv's STATS epilogue wrote. weight_ptr,
    bias_ptr [HAS_AFFINE], rmean_ptr, rvar_ptr (running stats, read only) and new_rmean_ptr,
    new_rvar_ptr (written) [UPDATE_RUNNING], nbt_ptr (num_batches_tracked, [CUMULATIVE]) are
    (K,) or scalar tensors; scale_ptr, shift_ptr, mean_ptr, invstd_ptr are fp32 (K,) outputs.
    momentum is the running-average factor unless CUMULATIVE. Grid: cdiv(K, BLOCK_C)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < K
    Mf = M.to(tl.float32)
    # Pass 1: the batch mean, weighted by each chunk's row count (the last chunk may be short).
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, n_chunks, BLOCK_CHUNKS):
        i = i0 + tl.arange(0, BLOCK_CHUNKS)
        mask_i = i < n_chunks
        n_i = tl.minimum(M - i * CHUNK, CHUNK).to(tl.float32)
        m = mask_i[:, None] & mask_c[None, :]
        mean_i = tl.load(stats_ptr + i[:, None].to(tl.int64) * (2 * K) + offs_c[None, :], mask=m, other=0.0)
        total += tl.sum(tl.where(m, n_i[:, None] * mean_i, 0.0), axis=0)
    mean = total / Mf
    # Pass 2: M2 around that mean, from each chunk's own M2 and its mean's offset.
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, n_chunks, BLOCK_CHUNKS):
        i = i0 + tl.arange(0, BLOCK_CHUNKS)
        mask_i = i < n_chunks
        n_i = tl.minimum(M - i * CHUNK, CHUNK).to(tl.float32)
        m = mask_i[:, None] & mask_c[None, :]
        base = stats_ptr + i[:, None].to(tl.int64) * (2 * K) + offs_c[None, :]
        mean_i = tl.load(base, mask=m, other=0.0)
        m2_i = tl.load(base + K, mask=m, other=0.0)
        d = mean_i - mean[None, :]
        m2 += tl.sum(tl.where(m, m2_i + n_i[:, None] * d * d, 0.0), axis=0)
    var = m2 / Mf
    invstd = 1.0 / tl.sqrt(var + eps)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / (tl.load(nbt_ptr).to(tl.float32) + 1.0)
        else:
            factor = momentum
        unbiased = m2 / tl.maximum(Mf - 1.0, 1.0)
        rm = tl.load(rmean_ptr + offs_c, mask=mask_c, other=0.0)
        rv = tl.load(rvar_ptr + offs_c, mask=mask_c, other=0.0)
        new_rm = (1.0 - factor) * rm.to(tl.float32) + factor * mean
        new_rv = (1.0 - factor) * rv.to(tl.float32) + factor * unbiased
        tl.store(new_rmean_ptr + offs_c, round_to(new_rm, rm.dtype), mask=mask_c)
        tl.store(new_rvar_ptr + offs_c, round_to(new_rv, rv.dtype), mask=mask_c)
    scale = invstd
    shift = -mean * invstd
    if HAS_AFFINE:
        w = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        scale = w * invstd
        shift = b - mean * scale
    tl.store(scale_ptr + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + offs_c, shift, mask=mask_c)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(invstd_ptr + offs_c, invstd, mask=mask_c)
