"""Shared test helpers: data layouts, random BN statistics, gradient comparisons. The tolerance
table itself is fastres.testing (the demo uses it too)."""
from __future__ import annotations

import socket

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastres import FusedBasicBlock, FusedBottleneck
from fastres.reference import randomize_batchnorms
from fastres.testing import UNIT_ROUNDOFF, assert_close, tolerance  # noqa: F401 (re-exported)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["nchw", "nhwc"]


def randomize_bn(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm2d non-trivial statistics and affine parameters (fresh init has
    mean 0 / var 1 / weight 1 / bias 0, which would let a folding bug pass unseen)."""
    return randomize_batchnorms(module, torch.Generator().manual_seed(seed), shift_scale=0.5)


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
        eager_err = relative_error(eager_got, want)
        assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} (eager: {eager_err:.3g})"


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


# ---- shared by the training tests ---------------------------------------------------------------

def fused(block: nn.Module) -> nn.Module:
    """The fastres module wrapping a torchvision block (sharing its parameters and buffers)."""
    cls = FusedBasicBlock if isinstance(block, BasicBlock) else FusedBottleneck
    return cls.from_block(block)


def assert_close_scaled(got, want, tol, what):
    """|got - want| <= tol * (max|want| + 1): gradients of batch-normalised blocks have no
    natural unit, so the bound is relative to the tensor's own scale."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().item() + 1.0
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x {scale:.3g}"


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(
            BasicBlock(16, 16),
            BasicBlock(16, 32, 2, nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_constexprs(monkeypatch) -> dict:
    """The constexprs of the next fused-conv launches, as the kernel receives them."""
    seen = {}
    from fastres.launch import conv as conv_launch

    kernel = conv_launch._kernel.fn
    real_run = kernel.run

    def run(*args, **kwargs):
        seen.update(kwargs)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    return seen
