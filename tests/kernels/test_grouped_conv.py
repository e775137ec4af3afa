"""Grouped convs (the implicit GEMM with the group in the grid) and depthwise convs (their own
direct-conv kernel, kernels/depthwise.py) against a float64 reference.

Paths: groups whose channels are reduced by the flattened index (few per group) and by channel
blocks (one and several per tap, channel masks and none), a grouped conv with a residual and
with the (ungrouped) dual-GEMM shortcut; depthwise 3x3/5x5/1x1 at stride 1 and 2, with dilation,
a channel multiplier of 2, a residual, odd sizes; a depthwise conv with a shortcut, which takes
the grouped GEMM instead. Every dtype and memory format, the output NaN-poisoned inside a NaN
guard, and the kernel each path should take checked by its constexprs / launch.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE_IDS,
    DTYPES,
    FORMAT_IDS,
    FORMATS,
    assert_close,
    record_constexprs,
    to_format,
)
from test_conv_kernel import assert_guard_untouched

import fastres
from fastres.launch import conv as conv_launch
from fastres.launch import depthwise as dw_launch

# name: (N, C, H, W, K, groups, (R, S), stride, padding, dilation, residual, shortcut (C2, s2))
GROUPED = {
    "3x3_g4_flat":         (2, 16, 9, 7, 24, 4, (3, 3), (1, 1), (1, 1), (1, 1), False, None),
    "3x3_g2_channel_loop": (2, 80, 7, 6, 64, 2, (3, 3), (2, 2), (1, 1), (1, 1), False, None),
    "1x1_g3_residual":     (3, 33, 5, 7, 21, 3, (1, 1), (1, 1), (0, 0), (1, 1), True, None),
    "3x3_g8_dual_gemm":    (2, 64, 6, 6, 48, 8, (3, 3), (2, 2), (1, 1), (1, 1), False, (24, 2)),
    "3x3_g16_resnext":     (2, 32, 5, 5, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1), True, None),
}
DEPTHWISE = {
    "3x3_s1":              (2, 19, 9, 7, 19, 19, (3, 3), (1, 1), (1, 1), (1, 1), False, None),
    "3x3_s2_residual":     (3, 40, 11, 10, 40, 40, (3, 3), (2, 2), (1, 1), (1, 1), True, None),
    "5x5_s2_dil2":         (1, 24, 13, 12, 24, 24, (5, 5), (2, 2), (4, 4), (2, 2), False, None),
    "3x3_multiplier2":     (2, 12, 8, 9, 24, 12, (3, 3), (1, 1), (1, 1), (1, 1), False, None),
    "1x1_unpadded":        (2, 150, 5, 5, 150, 150, (1, 1), (1, 1), (0, 0), (1, 1), True, None),
    "3x3_with_shortcut":   (2, 8, 6, 6, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 1)),
}


def make(case, dtype, fmt, device):
    N, C, H, W, K, groups, (R, S), stride, padding, dilation, residual, shortcut = case
    L = C // groups * R * S
    x = to_format(torch.randn(N, C, H, W, device=device), fmt).to(dtype)
    w = (torch.randn(K, C // groups, R, S, device=device) / math.sqrt(L)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(K, device=device)
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    res = to_format(torch.randn(N, K, P, Q, device=device), fmt).to(dtype) if residual else None
    sc = None
    if shortcut:
        C2, s2 = shortcut
        x2 = to_format(torch.randn(N, C2, (P - 1) * s2 + 1, (Q - 1) * s2 + 1, device=device), fmt)
        w2 = torch.randn(K, C2, 1, 1, device=device) / math.sqrt(C2)
        sc = (x2.to(dtype), w2.to(dtype), (s2, s2))
        L += C2
    d = torch.float64
    ref = F.conv2d(x.to(d), w.to(d), bias.to(d), stride, padding, dilation, groups)
    if sc is not None:
        ref = ref + F.conv2d(sc[0].to(d), sc[1].to(d), None, sc[2])
    if res is not None:
        ref = ref + res.to(d)
    return dict(x=x, w=w, bias=bias, res=res, sc=sc, stride=stride, padding=padding,
                dilation=dilation, groups=groups, L=L, shape=(N, K, P, Q), pre=ref)


def launch(c, dtype, fmt, device, activation="relu", config=None):
    N, K, P, Q = c["shape"]
    guard = to_format(torch.full((N + 2, K, P, Q), float("nan"), dtype=dtype, device=device), fmt)
    out = guard[1:N + 1]
    x2, w2, s2 = c["sc"] if c["sc"] else (None, None, (1, 1))
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], x2, w2, out, c["stride"],
                             c["padding"], c["dilation"], s2, activation, "ieee", config=config,
                             groups=c["groups"])
    assert_guard_untouched(guard)
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_conv_matches_float64_reference(name, dtype, fmt, device, monkeypatch):
    c = make(GROUPED[name], dtype, fmt, device)
    seen = record_constexprs(monkeypatch)
    out = launch(c, dtype, fmt, device)
    if conv_launch.INTERPRETED or device.type == "cuda":
        assert seen["GROUPED"] is True
    assert_close(out, F.relu(c["pre"]), dtype, c["L"])


@pytest.mark.parametrize("name", ["3x3_g2_channel_loop", "3x3_g8_dual_gemm"])
def test_grouped_conv_with_small_channel_blocks(name, device):
    """Channel blocks smaller than a group's channels: several per tap (NESTED at 40 channels
    per group and BLOCK_K 16, with its channel mask), and ones that divide C (EVEN_C)."""
    c = make(GROUPED[name], torch.float16, torch.channels_last, device)
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
    out = launch(c, torch.float16, torch.channels_last, device, config=config)
    assert_close(out, F.relu(c["pre"]), torch.float16, c["L"])


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(DEPTHWISE))
def test_depthwise_conv_matches_float64_reference(name, dtype, fmt, device, monkeypatch):
    c = make(DEPTHWISE[name], dtype, fmt, device)
    seen = record_constexprs(monkeypatch)
    before = conv_launch.launch_count()
    out = launch(c, dtype, fmt, device, activation="relu6")
    assert conv_launch.launch_count() == before + 1
    # Depthwise convs take their own kernel, but not with a shortcut GEMM to add.
    if conv_launch.INTERPRETED or device.type == "cuda":
        assert ("GROUPED" in seen) == (c["sc"] is not None)
    assert_close(out, F.relu6(c["pre"]), dtype, c["L"])


@pytest.mark.parametrize("config", dw_launch.GPU_CONFIGS, ids=lambda c: "{BLOCK_M}x{BLOCK_C}".format(**c))
def test_depthwise_gpu_tiles(config, device):
    """The GPU's tiles, smaller than the interpreter's: several tiles along pixels and channels."""
    c = make(DEPTHWISE["3x3_s2_residual"], torch.float32, torch.channels_last, device)
    out = launch(c, torch.float32, torch.channels_last, device, config=config)
    assert_close(out, F.relu(c["pre"]), torch.float32, c["L"])


# Every activation in fp32; in fp16 and bf16 with --runslow (the same epilogue code: ReLU6 runs
# in every dtype and format in the depthwise matrix above, SiLU in test_functional_op_groups,
# and every activation in every dtype on the plain conv in tests/ops/test_activations.py).
ACTIVATION_DTYPES = [pytest.param(d, marks=() if d == torch.float32 else pytest.mark.slow, id=i)
                     for d, i in zip(DTYPES, DTYPE_IDS)]


@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES)
@pytest.mark.parametrize("kind, fmt", [("grouped", torch.contiguous_format),
                                       ("depthwise", torch.channels_last)],
                         ids=["grouped-nchw", "depthwise-nhwc"])
@pytest.mark.parametrize("name", fastres.activations.NAMES)
def test_grouped_and_depthwise_activations(name, kind, fmt, dtype, device):
    """Every epilogue activation on both families in every dtype (each family in the memory
    format the tests above leave it least covered in)."""
    case = GROUPED["3x3_g4_flat"] if kind == "grouped" else DEPTHWISE["3x3_s1"]
    c = make(case, dtype, fmt, device)
    out = launch(c, dtype, fmt, device, activation=(name, 0.2))
    want = fastres.activations.apply(c["pre"], name, 0.2)
    assert_close(out, want, dtype, c["L"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["3x3_g4_flat", "depthwise"])
def test_functional_op_groups(name, dtype, device):
    """fastres.conv_bn_act(groups=...) on either backend, and its gradients."""
    case = GROUPED[name] if name in GROUPED else DEPTHWISE["3x3_s2_residual"]
    c = make(case, dtype, torch.channels_last, device)
    out = fastres.conv_bn_act(c["x"], c["w"], c["bias"], stride=c["stride"], padding=c["padding"],
                              dilation=c["dilation"], groups=c["groups"], residual=c["res"],
                              activation="silu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, F.silu(c["pre"]), dtype, c["L"])


def test_grouped_gradients_match_autograd(device):
    c = make(GROUPED["3x3_g4_flat"], torch.float32, torch.contiguous_format, device)
    x = c["x"].clone().requires_grad_()
    w = c["w"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()
    out = fastres.conv_bn_act(x, w, b, padding=1, groups=4)
    g = torch.randn_like(out)
    out.backward(g)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (c["x"], c["w"], c["bias"]))
    F.relu(F.conv2d(xr, wr, br, 1, 1, 1, 4)).backward(g.double())
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups, weight_shape, message", [
    (3, (8, 4, 3, 3), "must divide"),
    (4, (8, 2, 3, 3), "input channels"),
    (0, (8, 4, 3, 3), "must divide"),
])
def test_bad_groups_are_refused(groups, weight_shape, message, device):
    x = torch.randn(1, 16, 5, 5, device=device)
    with pytest.raises(ValueError, match=message):
        fastres.conv_bn_act(x, torch.randn(weight_shape, device=device), groups=groups)


def test_grouped_prologue_is_refused(device):
    x = torch.randn(1, 16, 5, 5, device=device)
    out = torch.empty(1, 16, 5, 5, device=device)
    with pytest.raises(ValueError, match="grouped"):
        conv_launch.fused_conv2d(x, torch.randn(16, 4, 3, 3, device=device), None, None, None,
                                 None, out, (1, 1), (1, 1), (1, 1), (1, 1), True,
                                 prologue=(torch.ones(16), torch.zeros(16)), groups=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_depthwise_tap_major_weight(dtype, device):
    """The layout fastres folds depthwise weights into (nn.folding.kernel_weight_layout: taps
    outermost, channels contiguous, so a tap's weights load as vectors)."""
    from fastres.nn.folding import kernel_weight_layout

    c = make(DEPTHWISE["3x3_multiplier2"], dtype, torch.channels_last, device)
    w = kernel_weight_layout(c["w"])
    assert w.stride(0) == 1 and torch.equal(w, c["w"])
    out = launch(dict(c, w=w), dtype, torch.channels_last, device)
    assert_close(out, F.relu(c["pre"]), dtype, c["L"])
