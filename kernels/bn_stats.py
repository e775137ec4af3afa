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
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastres.kernels.conv import INTERPRETED, STATS_CHUNK, round_to

BLOCK_C = 64
BLOCK_CHUNKS = 256 if INTERPRETED else 64

# Allocator of the outputs (the tests swap in one that fills them with NaN).
new_like = torch.empty_like


@triton.jit
def bn_finalize_kernel(stats_ptr, n_chunks, M, K, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr,
                       nbt_ptr, new_rmean_ptr, new_rvar_ptr, scale_ptr, shift_ptr, mean_ptr,
                       invstd_ptr, eps, momentum,
                       CHUNK: tl.constexpr, HAS_AFFINE: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CHUNKS: tl.constexpr):
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
    outs = [new_like(torch.empty(K, dtype=torch.float32, device=stats.device)) for _ in range(4)]
    update = running_mean is not None
    cumulative = update and momentum is None
    if cumulative and batches_tracked is None:
        raise ValueError("bn_finalize: momentum=None needs num_batches_tracked")
    new_rm = new_like(running_mean) if update else None
    new_rv = new_like(running_var) if update else None
    affine = weight is not None
    placeholder = outs[0]
    bn_finalize_kernel[(triton.cdiv(K, BLOCK_C),)](
        stats, n_chunks, M, K,
        weight if affine else placeholder, bias if affine else placeholder,
        running_mean if update else placeholder, running_var if update else placeholder,
        batches_tracked if cumulative else placeholder,
        new_rm if update else placeholder, new_rv if update else placeholder, *outs,
        float(eps), float(momentum or 0.0),
        CHUNK=STATS_CHUNK, HAS_AFFINE=affine, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
        BLOCK_C=BLOCK_C, BLOCK_CHUNKS=BLOCK_CHUNKS)
    return tuple(outs) + (new_rm, new_rv)
