"""The unfused oracle: what fastres must compute, written with the torch modules themselves.

Used by the fused modules as their reference path (train mode, autograd, unsupported input) and
by the tests (on float64 copies) as the ground truth. Each function runs the modules exactly as
torchvision's blocks do, so every module keeps its own train/eval behaviour. Also here: the
BatchNorm randomising of the demo and the oldest-stack smoke check (non-identity statistics, so
that folding mistakes show).
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
    downsample = getattr(block, "downsample", None)
    identity = downsample(x) if downsample is not None else x
    return F.relu(out + identity)


def bottleneck_reference(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision Bottleneck (v1.5): 1x1 -> 3x3 -> 1x1, each with BN, ReLU after the first two,
    then relu(out + shortcut(x))."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = F.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    downsample = getattr(block, "downsample", None)
    identity = downsample(x) if downsample is not None else x
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


def merge_chunk_stats(stats: Tensor, M: int, chunk: int):
    """(mean, biased var) per channel from per-chunk (mean, M2) partials of `chunk` rows each
    (the last one shorter), by Chan et al.'s parallel formula: M2 = sum M2_i + sum n_i
    (mean_i - mean)^2. The oracle for kernels/bn_finalize.py."""
    counts = torch.full((stats.shape[0],), float(chunk), dtype=torch.float64, device=stats.device)
    counts[-1] = M - chunk * (stats.shape[0] - 1)
    means, m2 = stats[:, 0].double(), stats[:, 1].double()
    mean = (counts[:, None] * means).sum(0) / M
    m2_total = m2.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
    return mean, m2_total / M


def batch_norm_train_update(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int):
    """What nn.BatchNorm2d does in train mode given a batch's (mean, biased var) over `count`
    values per channel: update num_batches_tracked and the running statistics (momentum, or the
    cumulative average when momentum is None; unbiased variance; nothing when
    track_running_stats=False), and return the (scale, shift) that normalise the batch."""
    with torch.no_grad():
        if bn.training and bn.track_running_stats:
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    factor = 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (count / max(count - 1, 1))
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(scale.dtype)
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(shift.dtype)
    return scale, shift


def randomize_batchnorms(model: nn.Module, generator: torch.Generator,
                         shift_scale: float = 0.1) -> nn.Module:
    """Give every BatchNorm2d its own statistics and affine parameters; return the model.

    torchvision initialises every BatchNorm to the identity (mean 0, var 1, weight 1, bias 0),
    under which a mistake in folding the scale or the shift could go unnoticed. running_var and
    weight are drawn from [0.5, 1.5) (BN scales below ~2, which the tolerance table assumes);
    running_mean and bias are normal with standard deviation `shift_scale`, near enough to the
    identity to keep activations in range through a deep model. BNs without running statistics
    or without affine parameters keep what they lack. Used by the demo, the tests, the probe
    and the oldest-stack smoke check."""
    def draw(n: int, normal: bool) -> Tensor:
        # float32 draws, in the order mean, var, weight, bias: the values the demo and the
        # tests have always used for a given seed
        if normal:
            return shift_scale * torch.randn(n, generator=generator)
        return 0.5 + torch.rand(n, generator=generator)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(draw(c, True))
                    m.running_var.copy_(draw(c, False))
                if m.weight is not None:
                    m.weight.copy_(draw(c, False))
                    m.bias.copy_(draw(c, True))
    return model
