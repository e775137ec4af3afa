"""Shared test helpers: the one tolerance table, reference checks, random BN statistics."""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fastres

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["nchw", "nhwc"]

# The one tolerance table. u is the unit roundoff of what the kernel rounds to:
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
    if dtype == torch.float32 and torch.cuda.is_available() and fastres.get_fp32_precision() == "tf32":
        dtype = "tf32"
    u = UNIT_ROUNDOFF[dtype]
    return 2 * u, 2 * u * math.sqrt(reduction_length)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype, reduction_lengths):
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


def randomize_bn(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm2d non-trivial statistics and affine parameters (fresh init has
    mean 0 / var 1 / weight 1 / bias 0, which would let a folding bug pass unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                dev = m.running_mean.device
                m.running_mean.copy_((torch.randn(n, generator=g) * 0.5).to(dev))
                m.running_var.copy_((torch.rand(n, generator=g) + 0.5).to(dev))
                if m.weight is not None:
                    m.weight.copy_((torch.rand(n, generator=g) + 0.5).to(dev))
                    m.bias.copy_((torch.randn(n, generator=g) * 0.5).to(dev))
    return module


def conv_reduction(conv: nn.Conv2d) -> int:
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def to_format(t: torch.Tensor, fmt) -> torch.Tensor:
    return t.contiguous(memory_format=fmt)


def is_format(t: torch.Tensor, fmt) -> bool:
    return t.is_contiguous(memory_format=fmt)


# ---- gradients ----------------------------------------------------------------------------------

def relative_error(t: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error. Not the max error: a value that lands within rounding of a
    ReLU's kink can flip that ReLU's mask in any low-precision implementation (eager's
    included), which moves single gradient elements by O(1) - a discontinuity, not an error."""
    t, ref = t.detach().double().cpu(), ref.detach().double().cpu()
    return ((t - ref).norm() / (ref.norm() + 1e-12)).item()


def kink_free_grad(out_ref: torch.Tensor, dtype) -> torch.Tensor:
    """A random upstream gradient that is zero where the float64 output lies within rounding of
    the final ReLU's kink, so a comparison sees the backward pass itself rather than which side
    a rounding fell on."""
    grad = torch.randn_like(out_ref)
    out = out_ref.detach()
    grad[out.abs() < 16 * UNIT_ROUNDOFF[dtype] * out.abs().max()] = 0.0
    return grad


def assert_as_accurate_as_eager(cases, dtype):
    """cases: (name, fastres tensor, eager tensor in the same dtype, float64 reference). Each
    fastres result must be within 4x eager's relative error, or within 2u."""
    for what, got, eager_got, want in cases:
        bound = max(4 * relative_error(eager_got, want), 2 * UNIT_ROUNDOFF[dtype])
        err = relative_error(got, want)
        assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} (eager: {relative_error(eager_got, want):.3g})"


def assert_step_as_accurate_as_eager(models, outs, inputs, dtype, buffers: bool = True):
    """After a forward + backward of (fastres model, eager model in dtype, float64 model):
    output, input gradient, every parameter gradient and (buffers=True) every buffer of the
    fastres model within 4x eager's relative error against float64 (assert_as_accurate_as_eager)."""
    model, eager, ref = models
    cases = [("output", *outs), ("input grad", *(x.grad for x in inputs))]
    cases += [(f"{n}.grad", p.grad, e.grad, q.grad) for (n, p), e, q in
              zip(model.named_parameters(), eager.parameters(), ref.parameters())]
    if buffers:
        cases += [(n, b, e, c) for (n, b), e, c in
                  zip(model.named_buffers(), eager.buffers(), ref.buffers())]
    assert_as_accurate_as_eager(cases, dtype)


def torchvision_block(kind: str, downsample: bool, **bn_kwargs) -> nn.Module:
    """A small torchvision BasicBlock ("basic") or Bottleneck, stride 2 with a downsample or
    stride 1 without; bn_kwargs go to every BatchNorm2d."""
    def norm(c):
        return nn.BatchNorm2d(c, **bn_kwargs)
    if kind == "basic":
        ds = nn.Sequential(nn.Conv2d(12, 20, 1, 2, bias=False), norm(20)) if downsample else None
        return BasicBlock(12 if downsample else 20, 20, 2 if downsample else 1, ds, norm_layer=norm)
    ds = nn.Sequential(nn.Conv2d(24, 48, 1, 2, bias=False), norm(48)) if downsample else None
    return Bottleneck(24 if downsample else 48, 12, 2 if downsample else 1, ds, norm_layer=norm)
