"""NaN and +-Inf propagate through every kernel exactly as through the unfused PyTorch graph.

A ReLU written as max(v, 0) returns 0 for a NaN (so does the GPU's max instruction), and a ReLU
backward written as grad * (out > 0) turns an inf gradient at a masked position into NaN and
drops the gradient at a NaN output. PyTorch's ReLU keeps NaN, and its backward,
threshold_backward(grad, out, 0), is (out <= 0 ? 0 : grad). Each test puts NaN, +inf and -inf at
random positions (some on the image border, next to the padding) and checks that NaN, +inf and
-inf land on exactly the positions where they land in float64 torch, and that the finite values
still meet the usual tolerances.

Float64 torch is the reference for what fastres's kernels compute: on the CPU its convolution is
direct, as fastres's is. Eager torch in the test's dtype is compared too where it convolves the
same way: on the CPU (oneDNN), not on a GPU, where cuDNN may pick a Winograd or FFT algorithm
whose transforms spread one NaN over a whole tile. The conv backward, aten's in fastres too, is
compared with eager's on any device, and with float64's on the CPU.

In train mode one non-finite value makes its BN channel's batch mean NaN, so the whole channel
turns NaN, and so does everything downstream of it: that is correct, and must match too.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE_IDS,
    DTYPES,
    FORMAT_IDS,
    FORMATS,
    UNIT_ROUNDOFF,
    assert_as_accurate_as_eager,
    assert_close,
    randomize_bn,
    to_format,
    torchvision_block,
)
from torch import nn
from torchvision.models.resnet import BasicBlock

import fastres
from fastres import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU
from fastres.launch import conv as conv_launch
from fastres.launch.bn import MASK_FROM_AFFINE, MASK_FROM_OUTPUT, BNGradInput, bn_relu_backward
from fastres.ops import block_train as training_op

# The interpreter computes with numpy, which warns wherever NaN is made (inf - inf, inf * 0).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NONFINITE = (float("nan"), float("inf"), float("-inf"))
USES_KERNELS = conv_launch.INTERPRETED or torch.cuda.is_available()


def poke(t: torch.Tensor, count: int) -> torch.Tensor:
    """A copy of the 4-D t with NaN, +inf, -inf (in turn) at `count` distinct random positions,
    the first four on the border rows and columns (the pixels whose windows reach the padding)."""
    t = t.clone()
    N, C, H, W = t.shape
    seen = set()
    while len(seen) < count:
        n, c, h, w = (int(torch.randint(s, ())) for s in (N, C, H, W))
        h, w = [(0, w), (H - 1, w), (h, 0), (h, W - 1)][len(seen)] if len(seen) < 4 else (h, w)
        if (n, c, h, w) not in seen:
            t[n, c, h, w] = NONFINITE[len(seen) % 3]
            seen.add((n, c, h, w))
    return t


def assert_same_nonfinite(got, want, what="", dtype=None, lengths=None, eager=None):
    """NaN, +inf and -inf at exactly want's positions (float64 torch) and eager's (the unfused
    graph in got's dtype), each where given; the finite values within the tolerance table's
    bound for `lengths` (one reduction length per fused conv), where given."""
    got = got.detach().double().cpu()
    for other, name in ((want, "float64 torch"), (eager, "eager torch")):
        if other is None:
            continue
        other = other.detach().double().cpu()
        assert got.shape == other.shape, (what, got.shape, other.shape)
        for kind, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            g, w = f(got), f(other)
            assert torch.equal(g, w), (
                f"{what}: {kind} at {int((g & ~w).sum())} positions where {name} has none, and "
                f"missing at {int((w & ~g).sum())} of its {int(w.sum())}")
    if lengths is not None:
        want = want.detach().double().cpu()
        finite = torch.isfinite(want)
        assert_close(got[finite], want[finite], dtype, lengths)


def on_cpu(eager, device):
    """eager where its convolution is direct like fastres's (see the module docstring)."""
    return eager if device.type == "cpu" else None


def _has_both(t):
    """The reference really has non-finite and finite values (else the test checks little)."""
    t = t.detach()
    return bool((~torch.isfinite(t)).any()) and bool(torch.isfinite(t).any())


# ---- eval mode: the conv epilogue (residual add + ReLU) -----------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_epilogue_relu_keeps_nan_and_inf(dtype, fmt, device):
    """conv_bn_act with a residual and ReLU: NaN/inf in the input and in the residual."""
    N, C, H, W, K = 2, 16, 8, 7, 24
    x = to_format(poke(torch.randn(N, C, H, W), 6).to(device=device, dtype=dtype), fmt)
    res = to_format(poke(torch.randn(N, K, H, W), 6).to(device=device, dtype=dtype), fmt)
    w = (torch.randn(K, C, 3, 3, device=device) / math.sqrt(9 * C)).to(dtype)
    b = torch.randn(K, device=device)
    out = fastres.conv_bn_act(x, w, b, padding=1, residual=res, relu=True)
    d = torch.float64
    ref = torch.relu(F.conv2d(x.to(d), w.to(d), b.to(d), padding=1) + res.to(d))
    eager = torch.relu(F.conv2d(x, w, b.to(dtype), padding=1) + res)
    assert _has_both(ref)
    assert_same_nonfinite(out, ref, "output", dtype, 9 * C, eager=on_cpu(eager, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 16, 7, 2, 3), (16, 24, 3, 1, 1)], ids=["stem_7x7", "3x3"])
def test_conv_bn_relu_module_keeps_nan_and_inf(shape, dtype, device):
    """FusedConvBNReLU in eval mode against nn.Sequential(conv, bn, relu)."""
    C, K, R, stride, padding = shape
    seq = randomize_bn(nn.Sequential(nn.Conv2d(C, K, R, stride, padding, bias=False),
                                     nn.BatchNorm2d(K), nn.ReLU())).eval()
    m = FusedConvBNReLU.from_modules(*copy.deepcopy(seq)[:2]).eval().to(device=device, dtype=dtype)
    x = poke(torch.randn(2, C, 9, 8), 5).to(device=device, dtype=dtype)
    with torch.no_grad():
        out = m(x)
        ref = copy.deepcopy(seq).double()(x.double().cpu())
        eager = copy.deepcopy(seq).to(device=device, dtype=dtype)(x)
    assert _has_both(ref)
    assert_same_nonfinite(out, ref, "output", dtype, C * R * R, eager=on_cpu(eager, device))


# ---- eval mode: whole blocks ---------------------------------------------------------------------

def block_cases(blocks, normal_formats):
    """(kind, downsample, fmt) for every block and format; each block runs in its normal_formats
    entry's format by default and in the other with --runslow (every dtype either way), which
    keeps both formats, every block and every dtype in the default run."""
    cases = []
    for (kind, downsample, name), normal in zip(blocks, normal_formats):
        for fmt, fmt_id in zip(FORMATS, FORMAT_IDS):
            marks = () if fmt_id == normal else (pytest.mark.slow,)
            cases.append(pytest.param(kind, downsample, fmt, marks=marks, id=f"{name}-{fmt_id}"))
    return cases


EVAL_BLOCKS = [("basic", False, "basic_identity"), ("basic", True, "basic_downsample"),
               ("bottleneck", False, "bottleneck_identity")]


def _stage_lengths(block):
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    lengths = [c.in_channels * c.kernel_size[0] * c.kernel_size[1] for c in convs]
    if block.downsample is not None:
        lengths[-1] += block.downsample[0].in_channels
    return lengths


def _fused(block):
    return (FusedBasicBlock if isinstance(block, BasicBlock) else FusedBottleneck).from_block(block)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind, downsample, fmt",
                         block_cases(EVAL_BLOCKS, ["nhwc", "nchw", "nhwc"]))
def test_eval_block_keeps_nan_and_inf(kind, downsample, dtype, fmt, device):
    """Every stage's ReLU, the residual add and the fused downsample GEMM."""
    block = randomize_bn(torchvision_block(kind, downsample)).eval()
    ref_block = copy.deepcopy(block).double()
    eager = copy.deepcopy(block).to(device=device, dtype=dtype, memory_format=fmt)
    model = _fused(block.to(device=device, dtype=dtype, memory_format=fmt))
    x = to_format(poke(torch.randn(2, block.conv1.in_channels, 8, 7), 4).to(device=device,
                                                                            dtype=dtype), fmt)
    before = conv_launch.launch_count()
    with torch.no_grad():
        out = model(x)
        ref, want_eager = ref_block(x.double().cpu()), eager(x)
    if USES_KERNELS:
        assert conv_launch.launch_count() - before == (2 if kind == "basic" else 3)
    assert _has_both(ref)
    assert_same_nonfinite(out, ref, "output", dtype, _stage_lengths(block),
                          eager=on_cpu(want_eager, device))


# ---- train mode: batch statistics, the BN + ReLU prologue, the tail, the BN backward ------------

@pytest.mark.skipif(not USES_KERNELS, reason="the fused training path needs CUDA or the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind, downsample, fmt", block_cases(
    [("basic", False, "basic_identity"), ("bottleneck", True, "bottleneck_downsample")],
    ["nhwc", "nchw"]))
def test_train_block_keeps_nan_and_inf(kind, downsample, dtype, fmt, device):
    """The fused training op: output, running statistics and every gradient NaN exactly where
    torchvision's block in train mode has them (here: everywhere, as one NaN or inf in a conv's
    output makes its channel's batch statistics NaN)."""
    block = randomize_bn(torchvision_block(kind, downsample)).train()
    eager = copy.deepcopy(block).to(device=device, dtype=dtype, memory_format=fmt)
    ref = copy.deepcopy(block).double()
    model = _fused(block.to(device=device, dtype=dtype, memory_format=fmt))
    x0 = to_format(poke(torch.randn(2, block.conv1.in_channels, 8, 7), 4).to(device=device,
                                                                             dtype=dtype), fmt)
    x, x_eager, x_ref = (x0.clone().requires_grad_(), x0.clone().requires_grad_(),
                         x0.double().cpu().requires_grad_())
    outs = (model(x), eager(x_eager), ref(x_ref))
    assert "fastres_block_train" in outs[0].grad_fn.name()
    assert torch.isnan(outs[2]).all()
    grad = torch.randn(outs[2].shape, dtype=torch.float64)
    for out, g in zip(outs, (grad.to(device=device, dtype=dtype),) * 2 + (grad,)):
        out.backward(g)
    assert_same_nonfinite(outs[0], outs[2], "output", eager=outs[1])
    for (name, b), e, r in zip(model.named_buffers(), eager.buffers(), ref.buffers()):
        assert_same_nonfinite(b, r, name, eager=e)
    assert_same_nonfinite(x.grad, x_ref.grad, "input grad", eager=x_eager.grad)
    for (name, p), e, r in zip(model.named_parameters(), eager.parameters(), ref.parameters()):
        assert_same_nonfinite(p.grad, r.grad, f"{name}.grad", eager=e.grad)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "channel_loop"])
def test_prologue_relu_keeps_nan_and_inf(flat, dtype, fmt, device):
    """The conv's BN + ReLU prologue on its own (finite scale/shift, so the pattern is not one of
    whole channels): relu(x * scale + shift) is NaN for a NaN, +inf or 0 for an inf depending on
    the sign of scale; the padding stays zero."""
    N, C, H, W, K = 2, 16, 8, 7, 16
    x = to_format(poke(torch.randn(N, C, H, W), 8).to(device=device, dtype=dtype), fmt)
    w = (torch.randn(K, C, 3, 3, device=device) / math.sqrt(9 * C)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    sign = torch.where(torch.arange(C, device=device) % 2 == 0, 1.0, -1.0)
    scale = (torch.rand(C, device=device) + 0.5) * sign  # -: +inf -> -inf -> relu -> 0
    shift = torch.rand(C, device=device) + 0.5  # > 0: relu(shift) != 0, so bad padding shows
    out = to_format(torch.full((N, K, H, W), float("nan"), dtype=dtype, device=device), fmt)
    conv_launch.fused_conv2d(x, w, None, None, None, None, out, (1, 1), (1, 1), (1, 1), (1, 1),
                              False, "ieee", flat_reduction=flat, prologue=(scale, shift))
    d = torch.float64
    act = torch.relu(x.to(d) * scale.to(d).view(1, -1, 1, 1) + shift.to(d).view(1, -1, 1, 1))
    ref = F.conv2d(act.to(dtype).to(d), w.to(d), None, 1, 1)  # the unfused graph stores act
    assert _has_both(ref)
    assert_same_nonfinite(out, ref, "output", dtype, 9 * C)


def _bn_relu_backward_case(case, dtype, fmt, device):
    """Inputs of one BN + ReLU backward and its float64 autograd reference.

    "output": relu(BN(y) + residual), the block tail (mask from the saved output, and the masked
    gradient written for the identity shortcut); "affine": relu(BN(y)) between stages (mask
    recomputed from y * scale + shift). NaN/inf in y (channel 0: its batch statistics turn
    NaN), in the residual (NaN/inf outputs over a finite BN) and in the upstream gradient, both
    where the ReLU passes it (its channel's sums turn NaN) and where it masks it (exactly 0)."""
    N, C, H, W, eps = 2, 12, 7, 6, 1e-5
    ch = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    y = torch.randn(N, C, H, W) * 1.5 + 0.5
    y[0, 0, 0, 0], y[1, 0, 3, 5] = NONFINITE[1], NONFINITE[0]
    y = to_format(y.to(dtype), fmt)
    y64 = y.double().requires_grad_()
    gamma = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    beta = (torch.randn(C, dtype=torch.float64) * 0.3).requires_grad_()
    var, mean = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    pre = (y64 - ch(mean)) * ch(torch.rsqrt(var + eps)) * ch(gamma) + ch(beta)
    leaves = [y64, gamma, beta]
    if case == "output":
        res = to_format(poke(torch.randn(N, C, H, W), 6).to(dtype), fmt).double().requires_grad_()
        pre = pre + res
        leaves.append(res)
    out64 = torch.relu(pre)
    # Non-finite gradients where the ReLU masks (channels 1-4) and where it passes (5-6).
    grad = torch.randn(N, C, H, W, dtype=torch.float64)
    grad[out64.detach().abs() < 1e-3] = 0.0  # no gradient at the kink: rounding decides there
    masked, passed = (pre.detach() < -0.01), (pre.detach() > 0.01)  # clear of the kink
    for c, where in ((1, masked), (2, masked), (3, masked), (4, masked), (5, passed), (6, passed)):
        idx = where[:, c].nonzero()[0]
        grad[idx[0], c, idx[1], idx[2]] = NONFINITE[c % 3]
    grad = grad.to(dtype)
    refs = torch.autograd.grad(out64, leaves, grad.double())
    f32 = lambda t: t.detach().float().to(device)  # noqa: E731
    bn = BNGradInput(y.to(device), f32(mean), f32(torch.rsqrt(var + eps)), f32(gamma))
    if case == "output":
        kwargs = dict(mask_output=out64.detach().to(dtype).to(device), write_g=True)
        kind = MASK_FROM_OUTPUT
    else:
        scale = bn.invstd * bn.gamma
        kwargs = dict(affine=(scale, f32(beta) - bn.mean * scale))
        kind = MASK_FROM_AFFINE
    return to_format(grad.to(device), fmt), bn, kind, kwargs, refs, out64


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["output", "affine"])
def test_bn_relu_backward_keeps_nan_and_inf(case, dtype, fmt, impl, device):
    """fastres.launch.bn.bn_relu_backward and its torch twin in fastres.ops.block_train against
    float64 autograd: dL/dy, dgamma, dbeta and the identity shortcut's masked gradient."""
    grad, bn, kind, kwargs, refs, out64 = _bn_relu_backward_case(case, dtype, fmt, device)
    backward = bn_relu_backward if impl == "kernel" else training_op._bn_relu_grads_torch
    dy, dgamma, dbeta, _, _, _, g = backward(grad, bn, kind, **kwargs)
    M = grad.numel() // grad.shape[1]
    assert _has_both(refs[0]) and _has_both(refs[1])
    assert_same_nonfinite(dy, refs[0], "dy", dtype, 3)
    # fp32 sums of M unit-scale terms, compared divided by sqrt(M) (as tests/kernels/test_bn_kernels.py)
    assert_same_nonfinite(dgamma / math.sqrt(M), refs[1] / math.sqrt(M), "dgamma", torch.float32, M)
    assert_same_nonfinite(dbeta / math.sqrt(M), refs[2] / math.sqrt(M), "dbeta", torch.float32, M)
    if case == "output":
        assert _has_both(out64) and _has_both(refs[3])
        assert_same_nonfinite(g, refs[3], "masked gradient", dtype, 1)


# ---- eval mode: the registered op's backward --------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_eval_op_backward_keeps_nan_and_inf(dtype, fmt, device):
    """conv_bn_act's autograd formula (frozen-BN training): the ReLU backward passes the gradient
    at NaN outputs and masks an inf or NaN gradient to exactly 0 where the output is <= 0."""
    N, C, H, W, K = 2, 16, 7, 6, 16
    d = torch.float64
    x0 = to_format(poke(torch.randn(N, C, H, W), 1).to(device=device, dtype=dtype), fmt)
    res0 = to_format(poke(torch.randn(N, K, H, W), 6).to(device=device, dtype=dtype), fmt)
    w0 = (torch.randn(K, C, 3, 3, device=device) / math.sqrt(9 * C)).to(dtype)
    b0 = torch.randn(K, device=device)

    def leaves(f=lambda t: t.clone()):
        return [f(t.detach()).requires_grad_() for t in (x0, w0, b0, res0)]

    def unfused(x, w, b, res):
        return torch.relu(F.conv2d(x, w, b.to(x.dtype), padding=1) + res)

    got, eager, want = leaves(), leaves(), leaves(lambda t: t.to(d).cpu())
    outs = (fastres.conv_bn_act(got[0], got[1], got[2], padding=1, residual=got[3]),
            unfused(*eager), unfused(*want))
    ref = outs[2].detach()
    grad = torch.randn(ref.shape, dtype=d)
    finite = torch.isfinite(ref)
    grad[finite & (ref.abs() < 16 * UNIT_ROUNDOFF[dtype] * ref[finite].abs().max())] = 0.0
    masked = (ref <= 0).nonzero()
    for i, v in zip(range(0, len(masked), max(1, len(masked) // 5)), NONFINITE * 2):
        grad[tuple(masked[i])] = v  # masked: exactly 0, whatever the gradient
    # Passed: spreads through the conv backward. Off the border: whether a NaN gradient times
    # the zero padding counts (float64's im2col) or not (oneDNN in fp32) is torch's own choice.
    interior = torch.zeros_like(finite)
    interior[:, :, 1:-1, 1:-1] = True
    grad[tuple((interior & (ref > 0.1)).nonzero()[0])] = NONFINITE[0]
    assert _has_both(ref)
    for out, g in zip(outs, (grad.to(device=device, dtype=dtype),) * 2 + (grad,)):
        out.backward(g)
    cases = []
    for name, a, e, r in zip(("x", "weight", "bias", "residual"), got, eager, want):
        # x's and the weight's come from a conv backward (see the module docstring)
        convolved = name in ("x", "weight")
        assert_same_nonfinite(a.grad, on_cpu(r.grad, device) if convolved else r.grad,
                              f"{name}.grad", eager=e.grad)
        assert _has_both(r.grad), name
        keep = torch.isfinite(r.grad) & torch.isfinite(e.grad.cpu())
        cases.append((f"{name}.grad", a.grad.cpu()[keep], e.grad.cpu()[keep], r.grad[keep]))
    assert_as_accurate_as_eager(cases, dtype)
