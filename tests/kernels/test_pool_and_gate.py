"""The SE / ECA path's kernels against float64: the POOL epilogue (per-(image, channel) sums of
the output as stored) of the implicit GEMM - runs of rows spanning several images, output
patches of one image (the stem's), grouped - and of the depthwise kernel; and the gate pass
act(y * g[n, c] + r) in every dtype and memory format, its output poisoned first."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPE_IDS, DTYPES, FORMAT_IDS, FORMATS, assert_close, record_constexprs, to_format

from fastres import activations
from fastres.launch import conv as conv_launch
from fastres.launch.gate import gate_act

# name: (N, C, H, W, K, groups, R, stride, padding): several images per run of rows (7x5
# outputs), the stem over output patches, a grouped and a depthwise conv
POOL_CASES = {
    "3x3_rows_span_images": (3, 19, 7, 5, 21, 1, 3, 1, 1),
    "7x7_stem_patches": (2, 3, 16, 15, 16, 1, 7, 2, 3),
    "3x3_grouped": (2, 32, 9, 8, 24, 4, 3, 2, 1),
    "3x3_depthwise": (2, 40, 9, 7, 40, 40, 3, 1, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_pool_epilogue_sums_the_stored_output(name, dtype, device, monkeypatch):
    N, C, H, W, K, groups, R, stride, pad = POOL_CASES[name]
    x = to_format(torch.randn(N, C, H, W, device=device), torch.channels_last).to(dtype)
    w = (torch.randn(K, C // groups, R, R, device=device) / math.sqrt(C // groups * R * R)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(K, device=device)
    ref = F.silu(F.conv2d(x.double(), w.double(), bias.double(), stride, pad, 1, groups))
    out = to_format(torch.full(ref.shape, float("nan"), device=device), torch.channels_last).to(dtype)
    pool = torch.zeros(N, K, device=device)
    seen = record_constexprs(monkeypatch)
    # (the stem reads a filter row per step, over 8x8 output patches, at BLOCK_K 32)
    config = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, GROUP_M=8, num_warps=4,
                  num_stages=2) if name == "7x7_stem_patches" else None
    conv_launch.fused_conv2d(x, w, bias, None, None, None, out, (stride, stride), (pad, pad),
                             (1, 1), (1, 1), "silu", "ieee", groups=groups, pool=pool,
                             config=config)
    if name == "7x7_stem_patches" and (conv_launch.INTERPRETED or device.type == "cuda"):
        assert seen["TILE_W"] > 0  # one image per tile
    L = C // groups * R * R
    assert_close(out, ref, dtype, L)
    # The sums of what was stored: exact up to fp32 summation order, whatever the rounding.
    stored = out.double().sum((2, 3))
    assert torch.allclose(pool.double(), stored, rtol=1e-5, atol=1e-5 * ref.shape[2] * ref.shape[3])


def test_pool_buffer_is_checked(device):
    x = torch.randn(2, 8, 5, 5, device=device)
    out = torch.empty(2, 8, 5, 5, device=device)
    with pytest.raises(ValueError, match="pool buffer"):
        conv_launch.fused_conv2d(x, torch.randn(8, 8, 1, 1, device=device), None, None, None, None,
                                 out, (1, 1), (0, 0), (1, 1), (1, 1), True,
                                 pool=torch.zeros(2, 4, device=device))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_gate_pass_matches_float64(residual, dtype, fmt, device):
    N, C, H, W = 3, 37, 5, 7
    y = to_format(torch.randn(N, C, H, W, device=device), fmt).to(dtype)
    g = torch.sigmoid(torch.randn(N, C, 1, 1, device=device)).to(dtype)
    r = to_format(torch.randn(N, C, H, W, device=device), fmt).to(dtype) if residual else None
    out = gate_act(y, g, r, ("leaky_relu", 0.1))
    assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype
    want = y.double() * g.double() + (r.double() if residual else 0.0)
    assert_close(out, activations.apply(want, "leaky_relu", 0.1), dtype, 2)


def test_gate_pass_residual_in_another_layout(device):
    """A shortcut in NCHW beside a channels_last output is read in the output's layout."""
    y = torch.randn(2, 6, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    g = torch.rand(2, 6, device=device)
    r = torch.randn(2, 6, 4, 5, device=device)
    out = gate_act(y, g, r, "relu")
    assert_close(out, torch.relu(y.double() * g.double()[:, :, None, None] + r.double()),
                 torch.float32, 2)
