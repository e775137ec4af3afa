"""Helpers every kernel family shares: the interpreter flag, NaN-keeping ReLU, rounding stores.

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
