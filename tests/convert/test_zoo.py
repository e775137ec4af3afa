"""optimize() across the zoo of ResNet-like timm and torchvision models with conv -> BN ->
activation chains (random weights and BN statistics): as accurate as eager PyTorch against the
float64 original, with at least the chains fused that this version of fastres fuses (a drop
is a regression). The CPU torch path for all; one model through the kernels (the interpreter)."""
import copy

import pytest
import timm
import torch
from helpers import UNIT_ROUNDOFF, randomize_bn

import fastres
from fastres.launch import conv as conv_launch
from fastres.tools.coverage import build as make
from fastres.tools.coverage import fused_pairs

# model: conv + BN pairs fused (chains + the convs of fused blocks), as measured with timm 1.0.31
# and torchvision 0.29.1: every pair of these models (`python -m fastres coverage`).
ZOO = {
    "timm:mobilenetv2_100": 52,       # BatchNormAct2d + ReLU6, depthwise convs
    "timm:efficientnet_b0": 49,       # BatchNormAct2d + SiLU, depthwise, SE
    "timm:cspresnet50": 55,           # BatchNormAct2d + LeakyReLU, grouped 3x3s
    "timm:gernet_s": 45,              # byobnet ConvNormAct + ReLU, depthwise
    "timm:regnetz_b16": 68,           # byobnet, SiLU, SE, grouped
    "timm:regnetx_002": 44,           # grouped 3x3s of 8 channels per group
    "timm:resnetv2_50": 32,           # pre-activation: conv -> BatchNormAct2d of the next stage
    "tv:mobilenet_v2": 52,            # Conv2dNormActivation + ReLU6, depthwise
    "tv:efficientnet_b0": 49,         # Conv2dNormActivation + SiLU, depthwise, SE
}


def _errors(model, fused, x):
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager = model(x)
        out = fused(x)
    return ((out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item(),
            ref.abs().max().item())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_fuses_its_chains_and_stays_as_accurate_as_eager(name, monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    torch.manual_seed(0)
    model = randomize_bn(make(name)).eval()
    fused = fastres.optimize(copy.deepcopy(model))
    assert fused_pairs(fused) >= ZOO[name], str(fastres.fusion_report(fused))
    err, eager_err, scale = _errors(model, fused, torch.randn(2, 3, 64, 64))
    assert err <= max(4 * eager_err, 2 * UNIT_ROUNDOFF[torch.float32] * scale), (err, eager_err)


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
