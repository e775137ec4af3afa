"""Training-mode fusion (issue 4, in progress: not yet the fused modules' train-mode default).

A training-mode block runs as:
  conv1 (raw output + batch statistics)  ->  BN1 finalize (scale/shift, running stats updated)
  conv2 (BN1 + ReLU applied as it loads) ->  ...  -> last conv (raw + statistics)
  [downsample conv (raw + statistics)]
  one elementwise pass: relu(BN_last(y) + BN_ds(y_ds) | x)
so every activation is written once in raw form and read once by its consumer, with BN's
normalisation folded into the consumer's loads.

The finalize (kernels/bn_stats.py, one launch per BN) reproduces nn.BatchNorm2d's training-mode
bookkeeping exactly: num_batches_tracked += 1, running_mean/var updated with momentum (or the
cumulative average when momentum is None) using the unbiased batch variance, and no running-stat
update at all when track_running_stats=False (such a BN always normalises with batch statistics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastres.kernels import conv as conv_kernels
from fastres.kernels.bn_act import bn_act
from fastres.kernels.bn_stats import bn_finalize
from fastres import ops
from fastres.modules import conv_padding
from fastres.ops import get_fp32_precision


def conv_with_stats(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                    prologue: Optional[Tuple[Tensor, Tensor]] = None):
    """Raw conv output (prologue applied to x on load), then the BN finalize on its batch
    statistics: (y, scale, shift, mean, invstd), running statistics updated. Two launches."""
    weight = conv.weight.contiguous(memory_format=torch.channels_last)
    N, _, H, W = x.shape
    K, _, R, S = weight.shape
    pad, st, dil = conv_padding(conv), conv.stride, conv.dilation
    P = ops._output_size(H, R, st[0], pad[0], dil[0])
    Q = ops._output_size(W, S, st[1], pad[1], dil[1])
    out = ops._empty_output(x, (N, K, P, Q))
    M = N * P * Q
    stats = torch.empty((conv_kernels.stats_chunks(M), 2, K), dtype=torch.float32, device=x.device)
    bias = None if conv.bias is None else conv.bias.float()
    conv_kernels.fused_conv2d(x, weight, bias, None, None, None, out, st, pad, dil, (1, 1), False,
                              get_fp32_precision(), prologue=prologue, stats=stats)
    return (out,) + bn_finalize(stats, M, bn)


# ---------------------------------------------------------------------------------------------
# Autograd (first version): the fused forward above, a backward in torch ops.
#
# Saved for backward: the block input, each conv's raw output, the per-channel batch mean and
# inverse std of each BN, and the final ReLU's mask (bool) - not the post-BN activations, which
# the backward recomputes elementwise from the raw outputs. Conv input/weight gradients use
# aten.convolution_backward (cuDNN on a GPU); the BN backward reductions are torch reductions for
# now (fusing them into one pass is the next step).

def _stage_modules(block: nn.Module):
    stages = ["conv1", "conv2"] + (["conv3"] if "conv3" in block._modules else [])
    pairs = [(block._modules[n], block._modules["bn" + n[-1]]) for n in stages]
    ds = block._modules.get("downsample")
    return pairs, ((ds[-2], ds[-1]) if ds is not None else None)


def _params(pairs, ds):
    """The tensors autograd differentiates with respect to, in a fixed order."""
    out = []
    for conv, bn in pairs + ([ds] if ds else []):
        out += [conv.weight, conv.bias, bn.weight, bn.bias]
    return out


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _bn_relu(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The post-BN+ReLU activation the next conv read, recomputed (rounded as stored)."""
    return torch.relu(y.float() * _channel(scale) + _channel(shift)).to(y.dtype)


def _bn_backward(g: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor]):
    """Gradients of BN in training mode (batch statistics): (dL/dy, dL/dgamma, dL/dbeta)."""
    count = g.numel() // g.shape[1]
    xhat = (y.float() - _channel(mean)) * _channel(invstd)
    dbeta = g.sum((0, 2, 3))
    dgamma = (g * xhat).sum((0, 2, 3))
    gamma = weight.float() if weight is not None else torch.ones_like(invstd)
    dy = _channel(gamma * invstd) * (g - _channel(dbeta / count) - xhat * _channel(dgamma / count))
    return dy, dgamma, dbeta


def _conv_backward(dy: Tensor, x: Tensor, conv: nn.Conv2d):
    """(dL/dx, dL/dweight, dL/dbias) of one of the block's convs."""
    return ops.conv_grads(dy.to(x.dtype), x, conv.weight, conv.stride, conv_padding(conv),
                          conv.dilation, (True, True, True), has_bias=conv.bias is not None)


class _BlockTrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, *params):
        pairs, ds = _stage_modules(block)
        ys, stats, affine = [], [], []
        out, prologue = x, None
        for conv, bn in pairs:
            y, scale, shift, mean, invstd = conv_with_stats(out, conv, bn, prologue)
            ys.append(y)
            stats.append((mean, invstd))
            affine.append((scale, shift))
            out, prologue = y, (scale, shift)
        if ds is None:
            result = bn_act(ys[-1], *affine[-1], residual=x)
        else:
            yd, ds_scale, ds_shift, mean, invstd = conv_with_stats(x, ds[0], ds[1])
            result = bn_act(ys[-1], *affine[-1], residual=yd, residual_scale=ds_scale,
                            residual_shift=ds_shift)
            ys.append(yd)
            stats.append((mean, invstd))
        ctx.block = block
        ctx.save_for_backward(x, result > 0, *ys, *[t for pair in stats for t in pair],
                              *[t for pair in affine for t in pair])
        ctx.n_stages = len(pairs)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        pairs, ds = _stage_modules(ctx.block)
        n = ctx.n_stages
        saved = list(ctx.saved_tensors)
        x, mask = saved[0], saved[1]
        n_y = n + (1 if ds else 0)
        ys = saved[2:2 + n_y]
        flat_stats = saved[2 + n_y:2 + 3 * n_y]
        stats = [(flat_stats[2 * i], flat_stats[2 * i + 1]) for i in range(n_y)]
        flat_affine = saved[2 + 3 * n_y:]
        affine = [(flat_affine[2 * i], flat_affine[2 * i + 1]) for i in range(n)]

        grads = {}
        g = grad_out.float() * mask
        if ds is None:
            dx = g.clone()
        else:
            dyd, dgamma, dbeta = _bn_backward(g, ys[n], *stats[n], ds[1].weight)
            dx_ds, dw, db = _conv_backward(dyd, x, ds[0])
            dx = dx_ds.float()
            grads[id(ds[0].weight)], grads[id(ds[1].weight)], grads[id(ds[1].bias)] = dw, dgamma, dbeta
            if ds[0].bias is not None:
                grads[id(ds[0].bias)] = db
        for i in reversed(range(n)):
            conv, bn = pairs[i]
            dy, dgamma, dbeta = _bn_backward(g, ys[i], *stats[i], bn.weight)
            conv_in = x if i == 0 else _bn_relu(ys[i - 1], *affine[i - 1])
            dinp, dw, db = _conv_backward(dy, conv_in, conv)
            grads[id(conv.weight)], grads[id(bn.weight)], grads[id(bn.bias)] = dw, dgamma, dbeta
            if conv.bias is not None:
                grads[id(conv.bias)] = db
            if i == 0:
                dx = dx + dinp.float()
            else:
                g = dinp.float() * (conv_in > 0)  # back through the previous stage's ReLU
        params = _params(pairs, ds)
        param_grads = [None if p is None or id(p) not in grads else grads[id(p)].to(p.dtype)
                       for p in params]
        return (dx.to(x.dtype), None, *param_grads)


def block_train(block: nn.Module, x: Tensor) -> Tensor:
    """Training-mode block forward through the fused kernels, differentiable with respect to x
    and every conv/BN parameter (first version of the training path; not yet the modules'
    default). Every BN of the block must be in train mode."""
    pairs, ds = _stage_modules(block)
    return _BlockTrainFunction.apply(x, block, *_params(pairs, ds))


def block_train_forward(block: nn.Module, x: Tensor) -> Tensor:
    """block_train without autograd (under no_grad): the training-mode forward alone."""
    with torch.no_grad():
        return block_train(block, x)
