"""The unfused oracle: what fastres must compute, written with the torch modules themselves.

Used by the fused modules as their reference path (train mode, autograd, unsupported input) and
by the tests (on float64 copies) as the ground truth. Each function runs the modules exactly as
torchvision's blocks do, so every module keeps its own train/eval behaviour.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_act_reference(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True,
                          residual: Optional[Tensor] = None) -> Tensor:
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def basic_block_reference(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    identity = block.downsample(x) if block.downsample is not None else x
    return F.relu(out + identity)


def bottleneck_reference(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision Bottleneck (v1.5): 1x1 -> 3x3 -> 1x1, each with BN, ReLU after the first two,
    then relu(out + shortcut(x))."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = F.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    identity = block.downsample(x) if block.downsample is not None else x
    return F.relu(out + identity)


def folded_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                     residual: Optional[Tensor] = None, shortcut=None, relu: bool = True) -> Tensor:
    """The functional op's meaning, in plain torch (for tests of fastres.conv_bn_act)."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation)
    if shortcut is not None:
        x2, w2, s2 = shortcut
        out = out + F.conv2d(x2, w2, None, s2)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out
