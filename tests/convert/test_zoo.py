"""optimize() across the zoo of ResNet-like timm and torchvision models with conv -> BN ->
activation chains (random weights and BN statistics): as accurate as eager PyTorch against the
float64 original, with at least the chains and residual blocks fused that this version of
fastres fuses (a drop is a regression). The CPU torch path for all; one model through the
kernels (the interpreter)."""
import copy

import pytest
import timm
import torch
from helpers import UNIT_ROUNDOFF, randomize_bn

import fastres
from fastres.launch import conv as conv_launch
from fastres.tools.coverage import BLOCK_KINDS, fused_pairs
from fastres.tools.coverage import build as make

# model: (conv + BN pairs fused (chains + the convs of fused blocks), residual blocks fused
# (fusion_report kinds BasicBlock, Bottleneck, residual)), as measured with timm 1.0.31 and
# torchvision 0.29.1: every pair and every residual block of these models
# (`python -m fastres coverage`).
ZOO = {
    "timm:mobilenetv2_100": (52, 10),   # BatchNormAct2d + ReLU6, depthwise convs
    "timm:efficientnet_b0": (49, 9),    # BatchNormAct2d + SiLU, depthwise, SE mid-branch
    "timm:cspresnet50": (55, 13),       # BatchNormAct2d + LeakyReLU, grouped 3x3s
    "timm:gernet_s": (45, 14),          # byobnet ConvNormAct + ReLU, depthwise
    "timm:regnetz_b16": (68, 18),       # byobnet, SiLU, SE, grouped
    "timm:regnetx_002": (44, 13),       # grouped 3x3s of 8 channels per group
    "timm:resnetv2_18": (8, 8),         # pre-activation blocks
    "timm:seresnet18": (20, 8),         # SE at the end of the branch
    "timm:repvgg_a0": (44, 22),         # RepVGG: 3x3 + 1x1 + BN(x)
    "timm:skresnet18": (36, 8),         # selective-kernel middles, run as the blocks' own ops
    "timm:resnet26d": (31, 8),          # ResNet-D: avg-pool + 1x1 shortcuts
    "tv:mobilenet_v2": (52, 10),        # Conv2dNormActivation + ReLU6, depthwise
    "tv:efficientnet_b0": (49, 9),      # Conv2dNormActivation + SiLU, depthwise, SE, StochasticDepth
    "tv:regnet_y_400mf": (53, 16),      # grouped, SE, 1x1 projection shortcuts
}


def _errors(model, fused, x):
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager = model(x)
        out = fused(x)
    return ((out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item(),
            ref.abs().max().item())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_fuses_its_chains_and_blocks_and_stays_as_accurate_as_eager(name, monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    torch.manual_seed(0)
    model = randomize_bn(make(name)).eval()
    fused = fastres.optimize(copy.deepcopy(model))
    pairs, blocks = ZOO[name]
    report = fastres.fusion_report(fused)
    assert fused_pairs(fused) >= pairs, str(report)
    assert sum(e.fused for e in report.entries if e.kind in BLOCK_KINDS) >= blocks, str(report)
    err, eager_err, scale = _errors(model, fused, torch.randn(2, 3, 64, 64))
    assert err <= max(4 * eager_err, 2 * UNIT_ROUNDOFF[torch.float32] * scale), (err, eager_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["timm:mobilenetv2_050",  # half-precision convs are slow on CPUs
                                  pytest.param("timm:seresnet18", marks=pytest.mark.slow),
                                  pytest.param("tv:regnet_y_400mf", marks=pytest.mark.slow)])
def test_zoo_model_in_half_precision(name, dtype, monkeypatch):
    """The CPU path in bf16 and fp16 (depthwise and grouped convs, SE gates, ReLU6/SiLU): as
    accurate as eager in the same dtype against float64."""
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    torch.manual_seed(0)
    model = randomize_bn(make(name)).eval()
    fused = fastres.optimize(copy.deepcopy(model)).to(dtype)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype)).double()
        out = fused(x.to(dtype)).double()
    err, eager_err = (out - ref).abs().max().item(), (eager - ref).abs().max().item()
    assert err <= max(4 * eager_err, 2 * UNIT_ROUNDOFF[dtype] * ref.abs().max().item()), (err, eager_err)


@pytest.mark.skipif(not conv_launch.INTERPRETED, reason="the kernels run through the interpreter here")
def test_zoo_model_through_the_kernels():
    """timm's mobilenetv2_050: BatchNormAct2d + ReLU6 chains, its depthwise convs in the
    depthwise kernel: every one of its 52 conv + BN pairs is a launch."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv2_050", pretrained=False)).eval()
    fused = fastres.optimize(copy.deepcopy(model))
    before = conv_launch.launch_count()
    err, eager_err, scale = _errors(model, fused, torch.randn(1, 3, 32, 32))
    assert conv_launch.launch_count() - before == 52
    assert err <= max(4 * eager_err, 2 * UNIT_ROUNDOFF[torch.float32] * scale), (err, eager_err)
