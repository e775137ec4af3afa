"""What fastres's tests and the demo check against: the one tolerance table, and poisoned outputs.

Tolerances are keyed by the unit roundoff u of what a kernel rounds to and scaled by the
reduction length; the demo's whole-model thresholds sit beside them, so every bound fastres
checks is in this file. `poisoned_outputs()` makes every tensor a fused op or kernel launch
allocates start as NaN, so an element no kernel wrote shows up in a comparison instead of as
plausible leftover memory (the test-suite turns it on for every test).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from fastres.launch import alloc
from fastres.ops.conv_bn_act import get_fp32_precision

# u, the unit roundoff of what the kernel rounds to:
#   fp16/bf16: operands (folded weights) and the output are rounded to the dtype;
#   fp32 "ieee": products are exact in fp32 but the fp32 accumulation over L terms is not
#     (2^-22 is fp32's 2^-24 with room for the sqrt(L)-growth of a summation's rounding);
#   fp32 "tf32" (GPU tensor cores): operands rounded to a 10-bit mantissa.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -22, "tf32": 2.0 ** -10, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def tolerance(dtype, reduction_length: int):
    """(rtol, atol) for one fused conv over `reduction_length` = C*R*S (+ shortcut C2) terms.

    Derivation, for unit-scale inputs and fan-in-scaled weights (|w| ~ 1/sqrt(L), as PyTorch's
    default init and the tests' data give): rounding each term by u moves the sum by at most
    u * sum|x w| ~ u * sqrt(L) (times the BN scale, < 2 here), so atol = 2u*sqrt(L); the output
    is rounded to nearest even (under the interpreter too: the kernels round bf16 themselves, as
    its own cast truncates), at most u relative, and rtol = 2u leaves that a factor of 2.
    """
    if dtype == torch.float32 and torch.cuda.is_available() and get_fp32_precision() == "tf32":
        dtype = "tf32"
    u = UNIT_ROUNDOFF[dtype]
    return 2 * u, 2 * u * math.sqrt(reduction_length)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype, reduction_lengths) -> None:
    """Check out against a float64 reference; reduction_lengths: one per fused conv the error
    passes through (their bounds add up: each rounded stage feeds the next one's sum)."""
    if isinstance(reduction_lengths, int):
        reduction_lengths = [reduction_lengths]
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out64 = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert torch.isfinite(out64).all(), "output has non-finite values (unwritten/poisoned elements?)"
    rtol = atol = 0.0
    for L in reduction_lengths:
        r, a = tolerance(dtype, L)
        rtol, atol = rtol + r, atol + a
    err = (out64 - ref).abs()
    bound = atol + rtol * ref.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max excess at flat index {worst.item()}: |{out64.flatten()[worst].item()} - "
        f"{ref.flatten()[worst].item()}| = {err.flatten()[worst].item():.3g} > "
        f"{bound.flatten()[worst].item():.3g} (dtype {dtype}, L={reduction_lengths})")


def model_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The demo's pass threshold for max|fastres - original| / max|original| over a whole
    model's output (tens of layers, so not the per-conv bound above)."""
    if dtype != torch.float32:
        # fp16/bf16: both models round every activation to 11 / 8 significant bits, in different
        # places (folded weights, fp32 accumulation in the kernel), through ~50 layers.
        return 2e-2
    if device.type == "cuda":
        # fp32 on a GPU: PyTorch's convolutions and fastres's (which follow
        # torch.backends.cudnn.allow_tf32) multiply in TF32, with a 10-bit mantissa, by default.
        return 1e-2
    return 1e-4  # fp32 on a CPU: exact fp32 products, only the order of the sums differs


@contextlib.contextmanager
def poisoned_outputs(value: float = float("nan")) -> Iterator[None]:
    """Within this scope every output a fused op or kernel launch allocates (fastres.launch.
    alloc) starts filled with `value`."""
    with alloc.filled_with(value):
        yield
