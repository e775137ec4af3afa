"""A hypothesis-driven fuzz over convolution configurations, against the float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")  # the GPU check machine has no hypothesis installed
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

from fastres import conv_bn_act  # noqa: E402
from helpers import assert_close  # noqa: E402

DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(N=st.integers(1, 3), C=st.integers(1, 40), K=st.integers(1, 40), H=st.integers(1, 12),
       W=st.integers(1, 12), R=st.sampled_from([1, 2, 3, 5, 7]), S=st.sampled_from([1, 3, 5]),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       residual=st.booleans(), relu=st.booleans(), shortcut=st.booleans(),
       channels_last=st.booleans(), dtype=st.sampled_from(list(DTYPE)))
def test_fuzz_conv_configurations(N, C, K, H, W, R, S, stride, padding, dilation, residual, relu,
                                  shortcut, channels_last, dtype):
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    assume(P >= 1 and Q >= 1)
    dt = DTYPE[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    L = C * R * S
    x = torch.randn(N, C, H, W).to(dt).contiguous(memory_format=fmt)
    w = (torch.randn(K, C, R, S) / math.sqrt(L)).to(dt)
    b = torch.randn(K)
    res = torch.randn(N, K, P, Q).to(dt).contiguous(memory_format=fmt) if residual else None
    sc = None
    if shortcut:
        C2 = max(1, (C * 3) % 29)
        x2 = torch.randn(N, C2, P, Q).to(dt).contiguous(memory_format=fmt)
        sc = (x2, (torch.randn(K, C2, 1, 1) / math.sqrt(C2)).to(dt), 1)
        L += C2
    out = conv_bn_act(x, w, b, stride=stride, padding=padding, dilation=dilation, residual=res,
                      shortcut=sc, relu=relu)
    d = torch.float64
    ref = F.conv2d(x.to(d), w.to(d), b.to(d), stride, padding, dilation)
    if sc is not None:
        ref = ref + F.conv2d(sc[0].to(d), sc[1].to(d))
    if res is not None:
        ref = ref + res.to(d)
    if relu:
        ref = torch.relu(ref)
    assert_close(out, ref, dt, L)
