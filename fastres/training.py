"""Training-mode fusion, forward pass (issue 4, in progress: no autograd yet, not the default).

A training-mode block runs as:
  conv1 (raw output + batch statistics)  ->  BN1 finalize (scale/shift, running stats updated)
  conv2 (BN1 + ReLU applied as it loads) ->  ...  -> last conv (raw + statistics)
  [downsample conv (raw + statistics)]
  one elementwise pass: relu(BN_last(y) + BN_ds(y_ds) | x)
so every activation is written once in raw form and read once by its consumer, with BN's
normalisation folded into the consumer's loads.

`finalize_batch_norm` reproduces nn.BatchNorm2d's training-mode bookkeeping exactly:
num_batches_tracked += 1, running_mean/var updated with momentum (or the cumulative average when
momentum is None) using the unbiased batch variance, and no running-stat update at all when
track_running_stats=False (such a BN always normalises with batch statistics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastres.kernels import conv as conv_kernels
from fastres.kernels.bn_act import bn_act
from fastres.modules import conv_padding
from fastres.ops import get_fp32_precision, output_memory_format


def finalize_batch_norm(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int
                        ) -> Tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) that normalise with the batch statistics (mean, biased var of
    `count` values per channel), and the running-stat update nn.BatchNorm2d makes in train mode."""
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
            scale = scale * bn.weight.float()
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
    return scale.float().contiguous(), shift.float().contiguous()


def conv_with_stats(x: Tensor, conv: nn.Conv2d, prologue: Optional[Tuple[Tensor, Tensor]] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Raw conv output (prologue applied to x on load) and its batch (mean, biased var, count)."""
    weight = conv.weight.contiguous(memory_format=torch.channels_last)
    N, _, H, W = x.shape
    K, _, R, S = weight.shape
    pad, st, dil = conv_padding(conv), conv.stride, conv.dilation
    P = (H + 2 * pad[0] - dil[0] * (R - 1) - 1) // st[0] + 1
    Q = (W + 2 * pad[1] - dil[1] * (S - 1) - 1) // st[1] + 1
    out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    M = N * P * Q
    stats = torch.empty((conv_kernels.stats_chunks(M), 2, K), dtype=torch.float32, device=x.device)
    bias = None if conv.bias is None else conv.bias.float()
    conv_kernels.fused_conv2d(x, weight, bias, None, None, None, out, st, pad, dil, (1, 1), False,
                              get_fp32_precision(), prologue=prologue, stats=stats)
    mean, var = conv_kernels.merge_batch_stats(stats, M)
    return out, mean, var, M


def block_train_forward(block: nn.Module, x: Tensor) -> Tensor:
    """Training-mode forward of a fused BasicBlock/Bottleneck through the fused kernels.

    Forward only (the result does not require grad) and not yet used by the modules: it exists
    to be checked against the unfused block (outputs and running statistics) while the backward
    pass is built. Every BN of the block must be in train mode.
    """
    stages = ["conv1", "conv2"] + (["conv3"] if "conv3" in block._modules else [])
    out, prologue = x, None
    for i, name in enumerate(stages):
        conv, bn = block._modules[name], block._modules["bn" + name[-1]]
        y, mean, var, count = conv_with_stats(out, conv, prologue)
        scale, shift = finalize_batch_norm(bn, mean, var, count)
        if i < len(stages) - 1:
            out, prologue = y, (scale, shift)
    ds = block._modules.get("downsample")
    with torch.no_grad():
        if ds is None:
            return bn_act(y, scale, shift, residual=x)
        yd, mean, var, count = conv_with_stats(x, ds[-2])
        ds_scale, ds_shift = finalize_batch_norm(ds[-1], mean, var, count)
        return bn_act(y, scale, shift, residual=yd, residual_scale=ds_scale, residual_shift=ds_shift)
