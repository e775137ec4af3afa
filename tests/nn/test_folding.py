"""BN folding: the math, and a cache that re-folds whenever a source tensor changes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, randomize_bn, record_constexprs
from torch import nn

import fastres
from fastres import FusedBottleneck, FusedConvBNReLU, fold_conv_bn, reference


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fold_matches_conv_then_batchnorm(conv_bias, affine):
    conv = nn.Conv2d(7, 9, 3, bias=conv_bias).double()
    bn = randomize_bn(nn.BatchNorm2d(9, affine=affine, eps=3e-2).double()).eval()
    x = torch.randn(2, 7, 6, 6, dtype=torch.float64)
    w, b = fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                        bn.running_var, bn.eps)
    assert w.dtype == torch.float64 and w.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_computes_in_fp32_then_casts():
    conv = nn.Conv2d(4, 4, 1).half()
    bn = randomize_bn(nn.BatchNorm2d(4)).half().eval()
    w, b = fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                        bn.running_var, bn.eps)
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    assert w.dtype == torch.float16 and b.dtype == torch.float32
    assert torch.equal(w, (conv.weight.float() * scale.view(-1, 1, 1, 1)).half())


def _module_and_check(device):
    m = randomize_bn(FusedConvBNReLU(6, 8, kernel_size=3)).eval().to(device)
    x = torch.randn(2, 6, 5, 5, device=device)

    def check():
        with torch.no_grad():
            out = m(x)
            ref = reference.conv_bn_act_reference(x.double().cpu(), *copy.deepcopy(m[:2]).double().cpu())
        assert_close(out, ref, m[0].weight.dtype, 54)
    return m, x, check


def test_cache_is_reused_while_nothing_changes(device):
    m, x, _ = _module_and_check(device)
    with torch.no_grad():
        m(x)
        first = m._fold_cache._value[0]
        m(x)
    assert m._fold_cache._value[0] is first


def test_refold_after_load_state_dict(device):
    m, x, check = _module_and_check(device)
    check()
    other = randomize_bn(FusedConvBNReLU(6, 8, kernel_size=3), seed=7)
    m.load_state_dict(other.state_dict())
    check()


def test_refold_after_optimizer_step(device):
    m, x, check = _module_and_check(device)
    check()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    m(x).mean().backward()  # also moves the running statistics
    opt.step()
    m.eval()
    check()


def test_refold_after_in_place_edits_and_eps(device):
    m, x, check = _module_and_check(device)
    check()
    with torch.no_grad():
        m[1].running_var.mul_(3.0)
    check()
    m[1].eps = 0.5
    check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refold_after_dtype_and_device_moves(dtype, device):
    m, x, check = _module_and_check(device)
    check()
    m.to(dtype)
    x_low = x.to(dtype)
    with torch.no_grad():
        out = m(x_low)
        ref = reference.conv_bn_act_reference(x_low.double().cpu(), *copy.deepcopy(m[:2]).double().cpu())
    assert_close(out, ref, dtype, 54)
    m.float()
    check()


def test_data_edits_need_refresh(device):
    """`.data` edits bypass version counters (by PyTorch's design): fastres.refresh() re-folds."""
    m, x, check = _module_and_check(device)
    model = nn.Sequential(m)
    check()
    m[0].weight.data.mul_(2.0)
    fastres.refresh(model)
    check()


def test_block_refolds_shortcut_after_changes(device):
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    block = randomize_bn(FusedBottleneck(16, 8, 2, ds)).eval().to(device)
    x = torch.randn(2, 16, 6, 6, device=device)

    def check():
        with torch.no_grad():
            out = block(x)
            ref = reference.bottleneck_reference(copy.deepcopy(block).double().cpu(), x.double().cpu())
        assert_close(out, ref, torch.float32, [16, 72, 8 + 16])
    check()
    with torch.no_grad():
        block.downsample[1].running_mean.add_(1.0)
        block.downsample[0].weight.mul_(-1.0)
    check()


def test_folded_stem_weight_reaches_the_kernel_zero_padded(monkeypatch):
    """A 7x7 stem's folded weight has its filter rows (21 elements) zero-padded to 32, so the
    kernel reads it in aligned vectors without a mask along the row (PADDED_ROWS), when the
    config reads one filter row per step (BLOCK_K 32; the interpreter's default is larger).
    The public fold_conv_bn keeps a plain channels_last weight."""
    from fastres.launch import conv as conv_launch
    from fastres.nn.folding import fold_modules

    if fastres.ops.conv_bn_act.backend_for(torch.empty(0)) != "triton":
        pytest.skip("the kernel runs only under TRITON_INTERPRET=1 on CPU")
    m = randomize_bn(FusedConvBNReLU(3, 16, kernel_size=7, stride=2)).eval()
    weight, _ = fold_modules(m[0], m[1])
    assert weight.stride() == (7 * 32, 1, 32, 3) and conv_launch.padded_rows(weight, 32)
    assert not conv_launch.padded_rows(weight.clone(memory_format=torch.channels_last), 32)
    # A view of the same buffer shifted along its rows would read the next row's weights.
    # (half the output channels: its reads stay inside the storage, only the shift is wrong)
    half = (8,) + tuple(weight.shape[1:])
    assert conv_launch.padded_rows(torch.as_strided(weight._base, half, weight.stride(), 32 * 7), 32)
    shifted = torch.as_strided(weight._base, half, weight.stride(), storage_offset=8)
    assert shifted._base is weight._base and not conv_launch.padded_rows(shifted, 32)
    plain, _ = fold_conv_bn(m[0].weight, None, m[1].weight, m[1].bias, m[1].running_mean,
                            m[1].running_var, m[1].eps)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(conv_launch, "INTERPRETER_CONFIG",
                        dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, GROUP_M=2))
    seen = record_constexprs(monkeypatch)
    x = torch.randn(2, 3, 15, 29).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = m(x)
        ref = reference.conv_bn_act_reference(x.double(), copy.deepcopy(m[0]).double(),
                                              copy.deepcopy(m[1]).double())
    assert seen["PADDED_ROWS"] and seen["ROW_SPAN"] and seen["TILE_W"] == 8
    assert_close(out, ref, torch.float32, 3 * 49)
