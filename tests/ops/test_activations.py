"""The epilogue activations (fastres.activations; the kernel's ACTIVATION constexpr) against torch.

Each activation of conv_bn_act, with a residual added before it, is compared with torch's own
function of the float64 reference, in every dtype and memory format, the output poisoned first;
NaN, +inf and -inf land where torch puts them (SiLU, GELU and Hardswish of -inf are NaN there);
the torch backend and the kernel agree; gradients match autograd through the torch functions.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPE_IDS, DTYPES, FORMAT_IDS, FORMATS, assert_close, record_constexprs, to_format
from test_nonfinite import _has_both, assert_same_nonfinite, poke

import fastres
from fastres import activations
from fastres.kernels.common import ACTIVATION_CODES
from fastres.launch import conv as conv_launch

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

SLOPE = 0.2
TORCH = {
    "identity": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
}


def test_every_kernel_activation_has_a_torch_reference():
    assert set(TORCH) == set(activations.NAMES) == set(ACTIVATION_CODES)


def _case(dtype, fmt, device, scale=1.0):
    """A 3x3 conv with a residual, its pre-activations spread over [-6, 6] or so (every piece
    of ReLU6, Hardswish and Hardsigmoid is hit)."""
    N, C, H, W, K = 2, 7, 6, 5, 12
    x = to_format(torch.randn(N, C, H, W, device=device), fmt).to(dtype)
    w = (torch.randn(K, C, 3, 3, device=device) * (3 * scale / math.sqrt(9 * C))).to(dtype)
    b = torch.randn(K, device=device)
    res = to_format(torch.randn(N, K, H, W, device=device), fmt).to(dtype)
    return x, w, b, res, 9 * C


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_matches_torch_of_the_float64_reference(name, dtype, fmt, device, monkeypatch):
    x, w, b, res, L = _case(dtype, fmt, device)
    out = to_format(torch.full((2, 12, 6, 5), float("nan"), dtype=dtype, device=device), fmt)
    seen = record_constexprs(monkeypatch)
    conv_launch.fused_conv2d(x, w, b, res, None, None, out, (1, 1), (1, 1), (1, 1), (1, 1),
                              (name, SLOPE if name == "leaky_relu" else 0.0))
    if conv_launch.INTERPRETED or device.type == "cuda":
        assert seen["ACTIVATION"] == ACTIVATION_CODES[name]
    d = torch.float64
    pre = F.conv2d(x.to(d), w.to(d), b.to(d), padding=1) + res.to(d)
    assert pre.min() < -3 and pre.max() > 3
    assert_close(out, TORCH[name](pre), dtype, L)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_keeps_nan_and_inf_where_torch_does(name, dtype, device):
    x, w, b, res, L = _case(dtype, torch.channels_last, device)
    x, res = poke(x, 5), poke(res, 5)
    out = fastres.conv_bn_act(x, w, b, padding=1, residual=res, activation=name, negative_slope=SLOPE)
    d = torch.float64
    ref = TORCH[name](F.conv2d(x.to(d), w.to(d), b.to(d), padding=1) + res.to(d))
    assert _has_both(ref)
    assert_same_nonfinite(out, ref, name, dtype, L)


@pytest.mark.parametrize("name", activations.NAMES)
def test_torch_backend_computes_the_same(name, device, monkeypatch):
    x, w, b, res, L = _case(torch.float32, torch.contiguous_format, device)
    kwargs = dict(padding=1, residual=res, activation=name, negative_slope=SLOPE)
    fused = fastres.conv_bn_act(x, w, b, **kwargs)
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    plain = fastres.conv_bn_act(x, w, b, **kwargs)
    assert_close(fused, plain, torch.float32, L)


@pytest.mark.parametrize("name", ["relu", "identity", "silu", "gelu_tanh", "hardswish", "leaky_relu"])
def test_gradients_through_every_kind_of_activation(name, device):
    """ReLU and none use the op's own backward; the others are recorded by autograd as torch's
    function after the op."""
    x, w, b, res, L = _case(torch.float64 if device.type == "cpu" and not conv_launch.INTERPRETED
                            else torch.float32, torch.contiguous_format, device)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, res)]
    out = fastres.conv_bn_act(*leaves[:3], padding=1, residual=leaves[3], activation=name,
                              negative_slope=SLOPE)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, res)]
    ref = TORCH[name](F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], padding=1) + ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_relu_flag_and_activation_names():
    assert activations.resolve(True) == ("relu", 0.0)
    assert activations.resolve(False) == activations.resolve(None) == ("identity", 0.0)
    assert activations.resolve("leaky_relu", 0.3) == ("leaky_relu", 0.3)
    assert activations.resolve("silu", 0.3) == ("silu", 0.0)
    for bad in ("tanh", "ReLU", 1):
        with pytest.raises(ValueError, match="unknown activation"):
            activations.resolve(bad)
    with pytest.raises(ValueError, match="NaN"):
        activations.resolve("leaky_relu", float("nan"))


def test_unknown_activation_is_a_clear_error_before_any_work(device):
    x, w, b, res, L = _case(torch.float32, torch.contiguous_format, device)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        fastres.conv_bn_act(x, w, b, padding=1, activation="swish")


def test_activation_modules_are_recognised_by_exact_class():
    from torch import nn

    assert activations.of_module(nn.GELU(approximate="tanh")) == ("gelu_tanh", 0.0)
    assert activations.of_module(nn.LeakyReLU(0.3)) == ("leaky_relu", 0.3)
    assert activations.of_module(nn.Identity()) == ("identity", 0.0)

    class MyReLU(nn.ReLU):
        def forward(self, x):
            return x * 2

    assert activations.of_module(MyReLU()) is None
    assert activations.of_module(nn.Tanh()) is None
