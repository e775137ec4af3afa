"""The drop-in modules against the unfused float64 reference, train mode, state_dicts."""
import copy

import pytest
import torch
from helpers import (
    DTYPE_IDS,
    DTYPES,
    FORMAT_IDS,
    FORMATS,
    UNIT_ROUNDOFF,
    assert_close,
    assert_step_as_accurate_as_eager,
    conv_reduction,
    is_format,
    kink_free_grad,
    randomize_bn,
    to_format,
)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from fastres import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU, reference
from fastres.launch import conv as conv_launch

USES_KERNELS = conv_launch.INTERPRETED or torch.cuda.is_available()


def _downsample(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def make_block(kind, with_downsample):
    """Small blocks with odd spatial sizes in mind; channels not multiples of the block sizes."""
    if kind == "basic":
        if with_downsample:
            return FusedBasicBlock(12, 20, stride=2, downsample=_downsample(12, 20, 2))
        return FusedBasicBlock(20, 20)
    if with_downsample:
        return FusedBottleneck(24, 12, stride=2, downsample=_downsample(24, 48, 2))
    return FusedBottleneck(48, 12)


def stage_reductions(block):
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    lengths = [conv_reduction(c) for c in convs]
    if block.downsample is not None:
        lengths[-1] += conv_reduction(block.downsample[0])
    return lengths


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_eval_matches_float64_reference(kind, with_downsample, dtype, fmt, device):
    block = randomize_bn(make_block(kind, with_downsample)).eval()
    ref_block = copy.deepcopy(block).double()
    block = block.to(device=device, dtype=dtype, memory_format=fmt)
    x = to_format(torch.randn(3, block.conv1.in_channels, 9, 7, device=device).to(dtype), fmt)
    x_before = x.clone()
    before = conv_launch.launch_count()
    with torch.no_grad():
        out = block(x)
    launches = conv_launch.launch_count() - before
    formula = reference.basic_block_reference if kind == "basic" else reference.bottleneck_reference
    with torch.no_grad():
        ref = formula(ref_block, x.double().cpu())
    assert_close(out, ref, dtype, stage_reductions(block))
    assert is_format(out, fmt) and out.dtype == dtype
    assert torch.equal(x, x_before), "the input was modified"
    if USES_KERNELS:
        assert launches == (2 if kind == "basic" else 3)


def test_identity_led_shortcut_is_fused(device):
    """timm's stride-1 avg-pool shortcut: Sequential(Identity, conv1x1, BN)."""
    ds = nn.Sequential(nn.Identity(), nn.Conv2d(24, 48, 1, bias=False), nn.BatchNorm2d(48))
    block = randomize_bn(FusedBottleneck(24, 12, downsample=ds)).eval()
    assert block.fallback_reason is None
    ref_block = copy.deepcopy(block).double()
    block = block.to(device)
    x = torch.randn(2, 24, 7, 7, device=device)
    before = conv_launch.launch_count()
    with torch.no_grad():
        out = block(x)
        ref = reference.bottleneck_reference(ref_block, x.double().cpu())
    assert_close(out, ref, torch.float32, [24, 108, 12 + 24])
    if USES_KERNELS:
        assert conv_launch.launch_count() - before == 3


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_conv_bn_relu_matches_float64_reference(relu, dtype, fmt, device):
    m = randomize_bn(FusedConvBNReLU(5, 19, kernel_size=3, stride=2, bias=False, relu=relu)).eval()
    ref = copy.deepcopy(m).double()
    m = m.to(device=device, dtype=dtype, memory_format=fmt)
    x = to_format(torch.randn(2, 5, 11, 9, device=device).to(dtype), fmt)
    with torch.no_grad():
        out = m(x)
        want = reference.conv_bn_act_reference(x.double().cpu(), ref[0], ref[1], relu=relu)
    assert_close(out, want, dtype, conv_reduction(m[0]))
    assert is_format(out, fmt)


def test_conv_bias_and_affine_free_bn(device):
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(10, affine=False, eps=1e-3)
    randomize_bn(bn)
    m = FusedConvBNReLU.from_modules(conv, bn, relu=True).eval()
    ref = copy.deepcopy(m).double()
    m = m.to(device)
    x = torch.randn(2, 6, 7, 7, device=device)
    with torch.no_grad():
        assert_close(m(x), reference.conv_bn_act_reference(x.double().cpu(), ref[0], ref[1]),
                     torch.float32, 54)


def _train_pair(kind, device):
    fused = randomize_bn(make_block(kind, True)).to(device).train()
    tv_cls = BasicBlock if kind == "basic" else Bottleneck
    args = (12, 20, 2) if kind == "basic" else (24, 12, 2)
    tv = tv_cls(*args, downsample=_downsample(args[0], args[1] * tv_cls.expansion, 2)).to(device).train()
    tv.load_state_dict(fused.state_dict(), strict=True)
    return fused, tv, torch.randn(4, args[0], 8, 8, device=device)


@pytest.mark.skipif(not USES_KERNELS, reason="the fused training path needs CUDA or the interpreter")
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_train_mode_runs_the_fused_training_op_by_default(kind, device):
    """Train mode goes through fastres::block_train (one stats-conv launch per conv) and matches
    torchvision's block: outputs, gradients, running statistics; then eval uses the new stats.
    (Accuracy in every dtype and format: tests/nn/test_training_blocks.py.)"""
    fused, tv, x = _train_pair(kind, device)
    assert fused.train_fallback_reason is None
    before = conv_launch.launch_count()
    out_f, out_t = fused(x), tv(x)
    assert conv_launch.launch_count() - before == len(stage_reductions(fused)) + 1
    assert "fastres_block_train" in out_f.grad_fn.name()
    tol = 64 * UNIT_ROUNDOFF[torch.float32]
    torch.testing.assert_close(out_f, out_t, rtol=tol, atol=tol)
    out_f.square().sum().backward()
    out_t.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), tv.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * q.grad.abs().max().item(),
                                   msg=name)
    for (name, b), c in zip(fused.named_buffers(), tv.buffers()):
        torch.testing.assert_close(b, c, rtol=tol, atol=tol, msg=name)
    # and back to eval: the fused path uses the freshly updated running statistics
    fused.eval()
    tv.eval()
    with torch.no_grad():
        assert_close(fused(x), tv.double()(x.double()), torch.float32, stage_reductions(fused))


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_train_mode_without_kernels_is_exactly_the_unfused_block(kind, device, monkeypatch):
    """Where the kernels do not run (the CPU torch path), train mode is torchvision's block,
    bit for bit: outputs, gradients and running-stat updates."""
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    fused, tv, x = _train_pair(kind, device)
    out_f, out_t = fused(x), tv(x)
    assert torch.equal(out_f, out_t)
    out_f.square().sum().backward()
    out_t.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), tv.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(fused.named_buffers(), tv.buffers()):
        assert torch.equal(b, c), name


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_state_dict_round_trips_with_torchvision(kind):
    tv_cls = BasicBlock if kind == "basic" else Bottleneck
    fused_cls = FusedBasicBlock if kind == "basic" else FusedBottleneck
    args = (16, 16, 2, _downsample(16, 16 * tv_cls.expansion, 2))
    tv = randomize_bn(tv_cls(*args))
    fused = fused_cls(16, 16, 2, _downsample(16, 16 * tv_cls.expansion, 2))
    fused.load_state_dict(tv.state_dict(), strict=True)
    back = tv_cls(16, 16, 2, _downsample(16, 16 * tv_cls.expansion, 2))
    back.load_state_dict(fused.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(tv.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_conv_bn_relu_state_dict_matches_torchvision_conv_norm_activation():
    tv = randomize_bn(Conv2dNormActivation(8, 16, kernel_size=3))
    fused = FusedConvBNReLU(8, 16, kernel_size=3)
    fused.load_state_dict(tv.state_dict(), strict=True)
    assert list(fused.state_dict()) == list(tv.state_dict())
    plain = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    plain.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        assert_close(fused.eval()(x), tv.eval().double()(x.double()), torch.float32, 72)


def test_unbatched_input_is_refused_like_torchvision(device):
    """A 3-D (C, H, W) input: nn.Conv2d would take it, nn.BatchNorm2d does not; the fused block
    raises torchvision's error (see also tests/nn/test_dropin.py)."""
    m = randomize_bn(FusedBasicBlock(16, 16)).eval().to(device)
    x = torch.randn(16, 7, 7, device=device)
    with pytest.raises(ValueError, match="expected 4D input"):
        BasicBlock(16, 16).eval().to(device)(x)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(x)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_frozen_bn_training_runs_fused_and_differentiates(kind, dtype, fmt, device):
    """BNs in eval mode, autograd recording (frozen-BN fine-tuning, or eval-mode gradients):
    the fused kernels run, and gradients reach the input, the conv weights and the BN affine
    parameters as in the unfused block."""
    block = randomize_bn(make_block(kind, True)).eval()
    ref = copy.deepcopy(block).double()
    eager = copy.deepcopy(block).to(device=device, dtype=dtype, memory_format=fmt)
    block = block.to(device=device, dtype=dtype, memory_format=fmt)
    x0 = to_format(torch.randn(2, block.conv1.in_channels, 9, 7, device=device).to(dtype), fmt)
    x, x_eager = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    x_ref = x0.detach().double().cpu().requires_grad_()
    buffers = [b.clone() for b in block.buffers()]
    before = conv_launch.launch_count()
    out = block(x)
    if USES_KERNELS:
        assert conv_launch.launch_count() - before == len(block._fastres_stages)  # fused, not fallen back
    formula = reference.basic_block_reference if kind == "basic" else reference.bottleneck_reference
    outs = (out, formula(eager, x_eager), formula(ref, x_ref))
    grad = kink_free_grad(outs[2], dtype)
    for o, g in zip(outs, (grad.to(device=device, dtype=dtype),) * 2 + (grad,)):
        o.backward(g)
    assert_step_as_accurate_as_eager((block, eager, ref), outs, (x, x_eager, x_ref), dtype,
                                     buffers=False)
    assert all(torch.equal(b, c) for b, c in zip(block.buffers(), buffers))  # eval: no BN update


def test_float64_input_falls_back_to_reference(device):
    m = randomize_bn(FusedBasicBlock(16, 16)).eval().to(device).double()
    x = torch.randn(1, 16, 5, 5, device=device, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference.basic_block_reference(m, x), rtol=0, atol=0)


def test_frozen_bn_mix_runs_each_module_in_its_own_mode(device):
    """Some BNs in train mode, some in eval: the block computes exactly the unfused thing."""
    fused = randomize_bn(make_block("basic", False)).to(device).eval()
    fused.bn1.train()
    tv = BasicBlock(20, 20).to(device)
    tv.load_state_dict(fused.state_dict())
    tv.eval()
    tv.bn1.train()
    x = torch.randn(2, 20, 6, 6, device=device)
    assert torch.equal(fused(x), tv(x))
    assert torch.equal(fused.bn1.running_mean, tv.bn1.running_mean)
