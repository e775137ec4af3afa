"""Kernel pieces of training-mode fusion (issue 4, first step): the BN-apply + ReLU prologue
and the batch-statistics epilogue, against float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPE_IDS, DTYPES, FORMAT_IDS, FORMATS, assert_close, to_format

from fastres.launch import conv as conv_launch
from fastres.reference import merge_chunk_stats

# (N, C, H, W, K, R, stride, padding): channel-loop 3x3, flat 7x7 stem-like, 1x1 with several
# channel blocks
PROLOGUE_CASES = {"3x3_p1": (2, 19, 9, 7, 21, 3, 1, 1), "7x7_p3_flat": (1, 5, 13, 11, 16, 7, 2, 3),
                  "1x1_many_channels": (2, 150, 5, 6, 24, 1, 1, 0)}


def _conv_out(H, R, stride, padding):
    return (H + 2 * padding - R) // stride + 1


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(PROLOGUE_CASES))
def test_prologue_applies_bn_and_relu_and_keeps_padding_zero(name, dtype, fmt, device):
    N, C, H, W, K, R, stride, padding = PROLOGUE_CASES[name]
    x = to_format(torch.randn(N, C, H, W, device=device).to(dtype), fmt)
    w = (torch.randn(K, C, R, R, device=device) / math.sqrt(C * R * R)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(C, device=device) + 0.5
    shift = torch.rand(C, device=device) + 0.5  # > 0: relu(shift) != 0, so bad padding shows
    P, Q = _conv_out(H, R, stride, padding), _conv_out(W, R, stride, padding)
    out = to_format(torch.full((N, K, P, Q), float("nan"), dtype=dtype, device=device), fmt)
    conv_launch.fused_conv2d(x, w, None, None, None, None, out, (stride, stride),
                              (padding, padding), (1, 1), (1, 1), False, "ieee",
                              prologue=(scale, shift))
    d = torch.float64
    act = torch.relu(x.to(d) * scale.to(d).view(1, -1, 1, 1) + shift.to(d).view(1, -1, 1, 1))
    act = act.to(dtype).to(d)  # the unfused graph stores the BN+ReLU output in the dtype
    ref = F.conv2d(act, w.to(d), None, stride, padding)
    assert_close(out, ref, dtype, C * R * R)


def _stats_reference(y64):
    var, mean = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    return mean, var


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 16, 9, 11, 24), (3, 40, 15, 13, 70)], ids=["odd_M", "multi_tile"])
def test_stats_epilogue_matches_batch_var_mean(shape, dtype, device):
    N, C, H, W, K = shape
    x = torch.randn(N, C, H, W, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(K, C, 3, 3, device=device) / math.sqrt(9 * C)).to(dtype)
    out = torch.full((N, K, H, W), float("nan"), dtype=dtype, device=device)
    out = out.contiguous(memory_format=torch.channels_last)
    M = N * H * W
    stats = torch.full((conv_launch.stats_chunks(M), 2, K), float("nan"), device=device)
    conv_launch.fused_conv2d(x, w, None, None, None, None, out, (1, 1), (1, 1), (1, 1), (1, 1),
                              False, "ieee", stats=stats)
    y64 = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert_close(out, y64, dtype, 9 * C)  # the raw conv output is still written
    mean, var = merge_chunk_stats(stats, M, conv_launch.STATS_CHUNK)
    ref_mean, ref_var = _stats_reference(y64)
    # The statistics come from the fp32 accumulator, before the output is rounded to dtype.
    torch.testing.assert_close(mean.double().cpu(), ref_mean.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double().cpu(), ref_var.cpu(), rtol=1e-4, atol=1e-5)


def test_stats_are_stable_for_large_means(device):
    """An output with mean ~3e3 and std ~1: E[y^2] - E[y]^2 in fp32 loses the variance, the
    chunk-wise merge does not."""
    N, C, H, W, K = 4, 8, 16, 16, 8
    x = (torch.randn(N, C, H, W, device=device) * 0.3 + 1000.0).contiguous(memory_format=torch.channels_last)
    w = torch.full((K, C, 1, 1), 1.0 / C, device=device) * (torch.rand(K, 1, 1, 1, device=device) + 2.5)
    out = torch.empty(N, K, H, W, device=device).contiguous(memory_format=torch.channels_last)
    M = N * H * W
    stats = torch.empty(conv_launch.stats_chunks(M), 2, K, device=device)
    conv_launch.fused_conv2d(x, w, None, None, None, None, out, (1, 1), (0, 0), (1, 1), (1, 1),
                              False, "ieee", stats=stats)
    mean, var = merge_chunk_stats(stats, M, conv_launch.STATS_CHUNK)
    _, ref_var = _stats_reference(F.conv2d(x.double(), w.double()))
    rel = ((var.double().cpu() - ref_var.cpu()).abs() / ref_var.cpu()).max().item()
    assert rel < 1e-3, rel
    # The naive formula on the same fp32 output really does fail here (so this test can fail).
    y = out.float()
    naive = (y * y).mean((0, 2, 3)) - y.mean((0, 2, 3)) ** 2
    assert ((naive.double().cpu() - ref_var.cpu()).abs() / ref_var.cpu()).max().item() > 1e-2


def test_prologue_and_stats_in_one_launch(device):
    """The training-mode middle conv: previous BN+ReLU on load, own statistics on store."""
    N, C, H, W, K = 2, 24, 10, 9, 32
    x = torch.randn(N, C, H, W, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, 3, 3, device=device) / math.sqrt(9 * C)
    scale, shift = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    out = torch.empty(N, K, H, W, device=device).contiguous(memory_format=torch.channels_last)
    M = N * H * W
    stats = torch.empty(conv_launch.stats_chunks(M), 2, K, device=device)
    before = conv_launch.launch_count()
    conv_launch.fused_conv2d(x, w, None, None, None, None, out, (1, 1), (1, 1), (1, 1), (1, 1),
                              False, "ieee", prologue=(scale, shift), stats=stats)
    assert conv_launch.launch_count() - before == 1
    act = torch.relu(x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    y64 = F.conv2d(act, w.double(), None, 1, 1)
    assert_close(out, y64, torch.float32, 9 * C)
    mean, var = merge_chunk_stats(stats, M, conv_launch.STATS_CHUNK)
    ref_mean, ref_var = _stats_reference(y64)
    torch.testing.assert_close(mean.double().cpu(), ref_mean.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double().cpu(), ref_var.cpu(), rtol=1e-5, atol=1e-6)


def test_stats_buffer_shape_is_checked(device):
    x = torch.randn(1, 4, 5, 5, device=device)
    w = torch.randn(8, 4, 1, 1, device=device)
    out = torch.empty(1, 8, 5, 5, device=device)
    with pytest.raises(ValueError, match="stats buffer"):
        conv_launch.fused_conv2d(x, w, None, None, None, None, out, (1, 1), (0, 0), (1, 1),
                                  (1, 1), False, "ieee", stats=torch.empty(3, 2, 8, device=device))


# ---- the BN finalize kernel --------------------------------------------------------------------

def _chunk_stats(y):
    """Per-64-row-chunk (mean, M2) of y (M, K) in float64, as the STATS epilogue lays them out."""
    chunk = conv_launch.STATS_CHUNK
    parts = []
    for i in range(0, y.shape[0], chunk):
        c = y[i:i + chunk].double()
        parts.append(torch.stack([c.mean(0), ((c - c.mean(0)) ** 2).sum(0)]))
    return torch.stack(parts).float()


def _finalize(stats, M, bn):
    """bn_finalize for a module's BN; num_batches_tracked incremented after, as the op's caller
    does."""
    from fastres.launch.bn import bn_finalize
    track = bn.training and bn.track_running_stats
    out = bn_finalize(stats, M, bn.weight, bn.bias, bn.running_mean if track else None,
                      bn.running_var if track else None, bn.num_batches_tracked,
                      bn.eps, bn.momentum)
    if track:
        bn.num_batches_tracked.add_(1)
    return out


@pytest.mark.parametrize("bn_kwargs", [dict(), dict(momentum=None), dict(track_running_stats=False),
                                       dict(affine=False, eps=1e-3)],
                         ids=["momentum", "cumulative", "no_running_stats", "no_affine"])
def test_bn_finalize_matches_batchnorm_bookkeeping(bn_kwargs, device):
    import copy

    from torch import nn

    from fastres.reference import batch_norm_train_update

    K, M = 70, 1000  # several channel blocks; a short last chunk
    bn = nn.BatchNorm2d(K, **bn_kwargs).train().to(device)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    ref_bn = copy.deepcopy(bn).double()
    for _ in range(2):  # twice: the cumulative average needs a second step to differ
        y = torch.randn(M, K, device=device) * 3 + 50
        stats = _chunk_stats(y.cpu()).to(device)
        scale, shift, mean, invstd, new_rm, new_rv = _finalize(stats, M, bn)
        ref_mean, ref_var = merge_chunk_stats(stats.cpu(), M, conv_launch.STATS_CHUNK)
        ref_scale, ref_shift = batch_norm_train_update(ref_bn.cpu(), ref_mean, ref_var, M)
        for got, want in ((scale, ref_scale), (shift, ref_shift), (mean, ref_mean),
                          (invstd, torch.rsqrt(ref_var + bn.eps))):
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
        if bn.track_running_stats:
            assert not torch.equal(new_rm, bn.running_mean)  # functional: the inputs are untouched
            bn.running_mean.copy_(new_rm)
            bn.running_var.copy_(new_rv)
        else:
            assert new_rm is None and new_rv is None
    for (name, b), c in zip(bn.named_buffers(), ref_bn.buffers()):
        torch.testing.assert_close(b.double().cpu(), c.double(), rtol=1e-5, atol=1e-5, msg=name)


def test_bn_finalize_is_stable_for_large_means(device):
    from torch import nn

    M, K = 4096, 8
    y = torch.randn(M, K, dtype=torch.float64) * 0.5 + 3000.0
    bn = nn.BatchNorm2d(K, affine=False).train().to(device)
    invstd = _finalize(_chunk_stats(y).to(device), M, bn)[3]
    var = invstd.double().cpu() ** -2 - bn.eps
    ref = y.var(0, unbiased=False)
    assert ((var - ref).abs() / ref).max().item() < 1e-3


# ---- the BN + ReLU backward kernels ------------------------------------------------------------

# name: (N, C, H, W, mask kind, second BN, identity shortcut gradient, affine)
BACKWARD_CASES = {
    "final_identity": (3, 70, 13, 11, "output", False, True, True),
    "final_downsample": (3, 70, 13, 11, "output", True, False, True),
    # M = 1292 rows: several row programs, each looping over several row tiles
    "between_stages": (4, 24, 19, 17, "affine", False, False, True),
    "no_affine": (2, 9, 5, 7, "affine", False, False, False),
}


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, grad_fmt", [(n, "same") for n in BACKWARD_CASES]
                         + [("final_identity", "other")])
def test_bn_relu_backward_matches_float64_autograd(name, grad_fmt, dtype, fmt, device):
    """dL/dy, dL/dgamma, dL/dbeta (and the second BN's, and the identity shortcut's masked
    gradient) against float64 autograd through batch-statistics BN + ReLU."""
    from fastres.launch.bn import MASK_FROM_AFFINE, MASK_FROM_OUTPUT, BNGradInput, bn_relu_backward
    N, C, H, W, mask, has_second, identity, affine = BACKWARD_CASES[name]
    eps, M = 1e-5, N * H * W
    ch = lambda v: v.view(1, -1, 1, 1)  # noqa: E731

    def bn_input(shift):
        y = to_format((torch.randn(N, C, H, W) * 1.5 + shift).to(dtype), fmt)
        y64 = y.double().requires_grad_()
        var, mean = torch.var_mean(y64.detach(), dim=(0, 2, 3), unbiased=False)
        gamma = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
        beta = torch.randn(C, dtype=torch.float64).requires_grad_() if affine else None
        v, m = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
        bn64 = (y64 - ch(m)) * ch(torch.rsqrt(v + eps))
        if affine:
            bn64 = bn64 * ch(gamma) + ch(beta)
        kernel_bn = BNGradInput(y.to(device), mean.float().to(device),
                                torch.rsqrt(var + eps).float().to(device),
                                None if gamma is None else gamma.detach().float().to(device))
        return y64, gamma, beta, bn64, kernel_bn

    y64, gamma, beta, pre, bn = bn_input(0.5)
    leaves = [y64] + ([gamma, beta] if affine else [])
    second = None
    if has_second:
        y2_64, gamma2, beta2, bn2, second = bn_input(-2.0)
        pre = pre + bn2
        leaves += [y2_64, gamma2, beta2]
    if identity:
        res = to_format(torch.randn(N, C, H, W).to(dtype), fmt).double().requires_grad_()
        pre = pre + res
        leaves.append(res)
    out64 = torch.relu(pre)
    grad = torch.randn(N, C, H, W, dtype=torch.float64)
    if mask == "affine":  # the kernel recomputes y*scale+shift in fp32: no gradient at the kink
        grad[pre.detach().abs() < 1e-4] = 0.0
    grad = grad.to(dtype)
    g_fmt = fmt if grad_fmt == "same" else (torch.channels_last if fmt == torch.contiguous_format
                                            else torch.contiguous_format)
    refs = torch.autograd.grad(out64, leaves, grad.double())

    kwargs = dict(second=second, write_g=identity)
    if mask == "output":
        kwargs.update(mask_output=out64.detach().to(dtype).to(device))
        kind = MASK_FROM_OUTPUT
    else:
        scale = bn.invstd * (bn.gamma if affine else 1.0)
        shift = (beta.detach().float().to(device) if affine else 0.0) - bn.mean * scale
        kwargs.update(affine=(scale, shift))
        kind = MASK_FROM_AFFINE
    dy, dgamma, dbeta, dy2, dgamma2, dbeta2, g = bn_relu_backward(
        to_format(grad.to(device), g_fmt), bn, kind, **kwargs)

    # dy is an elementwise 3-term formula of fp32 per-channel sums: rounded once to the dtype.
    # dgamma/dbeta are fp32 sums of M unit-scale terms; the table's bound is for terms scaled
    # by 1/sqrt(L) (fan-in-scaled conv weights), so they are compared divided by sqrt(M).
    assert dy.dtype == dtype and dy.is_contiguous(memory_format=fmt)
    assert_close(dy, refs[0], dtype, 3)

    def assert_sum_close(got, want):
        assert_close(got / math.sqrt(M), want / math.sqrt(M), torch.float32, M)

    k = 1
    if affine:
        assert_sum_close(dgamma, refs[1])
        assert_sum_close(dbeta, refs[2])
        k = 3
    if has_second:
        assert_close(dy2, refs[k], dtype, 3)
        assert_sum_close(dgamma2, refs[k + 1])
        assert_sum_close(dbeta2, refs[k + 2])
    if identity:
        assert_close(g, refs[-1], dtype, 1)


# ---- bf16 rounding -------------------------------------------------------------------------------

def _bf16_rounding_case(kernel, device):
    """(a bf16 result of one kernel, the exact value it rounds, in float64)."""
    from fastres.launch.bn import MASK_FROM_OUTPUT, BNGradInput, bn_act, bn_finalize, bn_relu_backward
    bf, d = torch.bfloat16, torch.float64
    ch = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    N, C, H, W = 2, 24, 9, 7
    scale, shift = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    y = (torch.randn(N, C, H, W, device=device) * 1.5 + 0.5).to(bf)
    if kernel == "prologue":
        # through a 1x1 identity conv, whose sum and output rounding are exact: the result is
        # the prologue's own rounding of relu(y * scale + shift) to y's dtype
        y = y.contiguous(memory_format=torch.channels_last)
        w = torch.eye(C, device=device).view(C, C, 1, 1).to(bf)
        out = torch.empty_like(y)
        conv_launch.fused_conv2d(y, w.contiguous(memory_format=torch.channels_last), None, None,
                                  None, None, out, (1, 1), (0, 0), (1, 1), (1, 1), False, "ieee",
                                  prologue=(scale, shift))
        return out, torch.relu(y.to(d) * ch(scale.to(d)) + ch(shift.to(d)))
    if kernel == "bn_act":
        r = torch.randn(N, C, H, W, device=device).to(bf)
        return (bn_act(y, scale, shift, residual=r),
                torch.relu(y.to(d) * ch(scale.to(d)) + ch(shift.to(d)) + r.to(d)))
    if kernel == "bn_finalize":  # bf16 running statistics (a bf16 model's BN buffers)
        K, M = 70, 1000
        rows = torch.randn(M, K) * 3 + 5
        stats = _chunk_stats(rows).to(device)
        rm, rv = torch.randn(K, device=device).to(bf), (torch.rand(K, device=device) + 0.5).to(bf)
        new_rm, new_rv = bn_finalize(stats, M, None, None, rm, rv, None, 1e-5, 0.1)[4:]
        var, mean = torch.var_mean(rows.double(), 0, unbiased=False)
        return (torch.cat([new_rm, new_rv]),
                torch.cat([0.9 * rm.to(d).cpu() + 0.1 * mean,
                           0.9 * rv.to(d).cpu() + 0.1 * var * M / (M - 1)]))
    # bn_backward: dL/dy of relu(BN(y)) in y's dtype
    y64 = y.to(d).cpu().requires_grad_()
    gamma, beta = torch.rand(C, dtype=d) + 0.5, torch.randn(C, dtype=d) * 0.3
    var, mean = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    out64 = torch.relu((y64 - ch(mean)) * ch(torch.rsqrt(var + 1e-5)) * ch(gamma) + ch(beta))
    grad = torch.randn(N, C, H, W).to(bf)
    dy_exact, = torch.autograd.grad(out64, [y64], grad.to(d))
    f32 = lambda t: t.detach().float().to(device)  # noqa: E731
    bn = BNGradInput(y, f32(mean), f32(torch.rsqrt(var + 1e-5)), f32(gamma))
    dy = bn_relu_backward(grad.to(device), bn, MASK_FROM_OUTPUT,
                          mask_output=out64.detach().to(bf).to(device))[0]
    return dy, dy_exact


@pytest.mark.parametrize("kernel", ["prologue", "bn_act", "bn_finalize", "bn_backward"])
def test_bf16_results_round_to_nearest_even(kernel, device):
    """Every bf16 a kernel stores is its fp32 result rounded to nearest even, as the GPU's (and
    torch's) conversion rounds: so it equals the exact value correctly rounded to bf16 except
    where fp32's own rounding lands near a tie (here at most 1 element in 3000). Triton's
    interpreter truncates fp32 -> bf16, which gets about half of them wrong, all toward zero."""
    got, exact = _bf16_rounding_case(kernel, device)
    got, exact = got.cpu(), exact.detach().cpu()
    nonzero = exact != 0  # (the ReLU's zeros are exact either way)
    match = (got == exact.to(torch.bfloat16))[nonzero].float().mean().item()
    assert match >= 0.99, f"{kernel}: only {match:.1%} of bf16 results are correctly rounded"
