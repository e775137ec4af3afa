"""Helpers every kernel family shares: the interpreter flag, rounding stores, the epilogue
activations (NaN-keeping, as torch's).

INTERPRETED is read once, when the kernels are imported: Triton chooses between its compiler and
its interpreter when @triton.jit runs, so TRITON_INTERPRET must be set before fastres is
imported (the host side, fastres.launch, checks the interpreter's stack at that point too).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Round fp32 -> bf16 on the bits under the interpreter (see round_to).
_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 v converted to dtype (fp32, fp16 or bf16), rounded to nearest even as the GPU's
    conversion instructions (and torch) round; every kernel store of a result in a tensor's own
    dtype goes through this.

    Triton's interpreter truncates fp32 -> bf16 (its cast passes no rounding mode, and
    fp_downcast_rounding="rtne" does not change that: rtne is the default, so the cast takes the
    same path), which biases every bf16 result toward zero. There the rounding is done on the
    bits instead: add 0x7FFF plus the lowest kept bit and drop the low 16 bits (the carry rounds
    into the exponent, up to inf); a NaN keeps its top bits with the quiet bit set, as the
    addition could carry a NaN's payload into an inf. fp16 needs nothing: numpy rounds it."""
    if dtype == tl.bfloat16 and _BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, (bits >> 16) | 0x40, rounded)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def relu(v):
    """max(v, 0) keeping NaN, as torch.relu does (-inf -> 0, +inf stays). A plain tl.maximum
    (the GPU's max instruction) returns the non-NaN operand; the NaN-propagating max is one
    instruction (FMNMX.NAN on sm_80+), half the compare + select it replaces."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


# The epilogue activations, by the code a kernel's ACTIVATION constexpr takes (the host names them
# in fastres.activations).
ACTIVATION_CODES = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
                    "hardswish": 6, "hardsigmoid": 7, "leaky_relu": 8}


@triton.jit
def _clamp_0_6(v):
    """min(max(v, 0), 6) keeping NaN (torch's hardtanh / clamp)."""
    v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, 6.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def activate(v, ACTIVATION: tl.constexpr, slope):
    """The activation with code ACTIVATION (ACTIVATION_CODES) of fp32 v, as torch computes it,
    NaN and +-inf included: SiLU, GELU and Hardswish of -inf are NaN there too (-inf * 0).
    slope: LeakyReLU's negative slope (unused otherwise). GELU's tanh form uses
    0.5 * (1 + tanh(y)) = sigmoid(2y), which Triton has on every backend."""
    if ACTIVATION == 1:
        out = relu(v)
    elif ACTIVATION == 2:
        out = _clamp_0_6(v)
    elif ACTIVATION == 3:
        out = v * tl.sigmoid(v)
    elif ACTIVATION == 4:
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACTIVATION == 5:
        out = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    elif ACTIVATION == 6:
        out = v * _clamp_0_6(v + 3.0) / 6.0
    elif ACTIVATION == 7:
        out = _clamp_0_6(v + 3.0) / 6.0
    elif ACTIVATION == 8:
        out = tl.where(v > 0.0, v, v * slope)
    else:
        out = v
    return out


@triton.jit
def pool_partial_sums(pool_ptr, stored, mask_out, n_idx, offs_n, mask_n, row0, rows_end, PQ,
                      stride_pool_n, tile_n, ONE_IMAGE: tl.constexpr):
    """Add the tile's per-(image, channel) sums of `stored` (the output tile as stored, in its
    dtype) into the fp32 (N, stride_pool_n) buffer at pool_ptr: the squeeze of an SE / ECA gate,
    whose mean over the image the host takes from these. The tile holds output rows row0 ..
    rows_end - 1 of images n_idx (rows m = (n, p, q), PQ rows per image), or with ONE_IMAGE
    (an output patch) rows of image tile_n only. One atomic add per image and channel the tile
    touches: the order of the adds, and so the sums' last bits, may vary from run to run."""
    vals = tl.where(mask_out, stored.to(tl.float32), 0.0)
    if ONE_IMAGE:
        tl.atomic_add(pool_ptr + tile_n * stride_pool_n + offs_n, tl.sum(vals, axis=0), mask=mask_n)
    else:
        for n in range(row0 // PQ, (rows_end - 1) // PQ + 1):
            part = tl.sum(tl.where((n_idx == n)[:, None], vals, 0.0), axis=0)
            tl.atomic_add(pool_ptr + tl.cast(n, tl.int64) * stride_pool_n + offs_n, part, mask=mask_n)
