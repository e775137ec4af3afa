"""Training-mode fusion: a ResNet block (or a conv -> BN -> ReLU chain such as the stem) with
batch-statistics BatchNorm as one registered op, fastres::block_train.

Forward, per block (Triton on CUDA or under the interpreter):
  conv1 (raw output + per-chunk batch statistics)  ->  BN1 finalize (scale/shift, new running stats)
  conv2 (BN1 + ReLU applied as it loads its input) ->  ...  -> last conv (raw + statistics)
  [downsample conv (raw + statistics)]
  one elementwise pass: relu(BN_last(y) + BN_ds(y_ds) | x)
Every activation is written once, raw, and read once by its consumer, with BN's normalisation
folded into the consumer's loads. The finalize (kernels/bn_finalize.py) reproduces nn.BatchNorm2d's
bookkeeping exactly: momentum or the cumulative average (momentum=None), the unbiased running
variance, no update at all with track_running_stats=False.

Backward (kernels/bn_backward.py for BN + ReLU, three launches per BN or per BN pair; aten's
convolution_backward, i.e. cuDNN, for the conv data and weight gradients). Saved for backward:
the block's input and output (the output doubles as the final ReLU's mask, and is the next
block's input anyway), each conv's raw output and each BN's batch mean/invstd/scale/shift; the
post-BN activations between stages are recomputed with one elementwise pass each, not stored.

`fastres::block_train` is a torch.library.custom_op with a fake implementation and a registered
autograd formula, so the fused training block also runs under torch.compile. Custom ops must be
functional to be differentiable: the op returns the new running statistics and block_train()
copies them into the BN buffers (one foreach launch per block) and increments
num_batches_tracked (one more), ending in nn.BatchNorm2d's exact state.

Float64 and CPU tensors without the interpreter run the op's torch implementation: the same
graph in plain torch ops with the same backward formula (this is what gradcheck checks). The
modules do not send such inputs here: they run the unfused modules instead (exactly eager).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastres.launch import conv as conv_launch
from fastres.launch.bn import (
    MASK_FROM_AFFINE,
    MASK_FROM_OUTPUT,
    NO_MASK,
    BNGradInput,
    bn_act,
    bn_finalize,
    bn_relu_backward,
    same_layout,
)
from fastres.ops import conv_bn_act as conv_op
from fastres.ops.conv_bn_act import conv_padding

GEOMETRY_INTS = 6  # per conv: stride (2), padding (2), dilation (2)
# What the op adds before its final ReLU: nothing (a conv -> BN -> ReLU chain such as the stem),
# the op's input (a block's identity shortcut), or the last conv's BN output (the downsample's).
NO_SHORTCUT, IDENTITY, DOWNSAMPLE = 0, 1, 2


def _geometry(conv: nn.Conv2d) -> List[int]:
    return list(conv.stride) + list(conv_padding(conv)) + list(conv.dilation)


def _unpack_geometry(geometry: Sequence[int], i: int):
    g = geometry[GEOMETRY_INTS * i:GEOMETRY_INTS * (i + 1)]
    return list(g[0:2]), list(g[2:4]), list(g[4:6])


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _uses_kernels(x: Tensor) -> bool:
    return x.dtype in conv_op.SUPPORTED_DTYPES and conv_op.backend_for(x) == "triton"


# ---------------------------------------------------------------------------------------------
# The op's forward

def _conv_out_shape(x_shape, w_shape, geometry, i):
    """The stage's conv output shape; like nn.BatchNorm2d in training, refuses to normalise a
    single value per channel (its batch variance would be 0)."""
    stride, padding, dilation = _unpack_geometry(geometry, i)
    N, _, H, W = x_shape
    K, _, R, S = w_shape
    shape = (N, K, conv_op.output_size(H, R, stride[0], padding[0], dilation[0]),
             conv_op.output_size(W, S, stride[1], padding[1], dilation[1]))
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"fastres: input {H}x{W} is too small for conv {i}'s {R}x{S} kernel")
    if N * shape[2] * shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(shape)}")
    return shape


def _planned_shapes(x: Tensor, weights: List[Tensor], per_bn: List[List[Optional[Tensor]]],
                    geometry: List[int], shortcut: int) -> List[tuple]:
    """Validate the op's arguments (the kernels trust them) and return every conv's output shape:
    stages in order, then the downsample's."""
    if x.dim() != 4:
        raise ValueError(f"fastres: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in conv_op.SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"fastres: input dtype {x.dtype} is not supported")
    n = len(weights) - int(shortcut == DOWNSAMPLE)
    if n < 1 or len(geometry) != GEOMETRY_INTS * len(weights):
        raise ValueError("fastres: the training op needs one geometry entry per conv, at least one stage")
    shapes, shape = [], tuple(x.shape)
    for i, w in enumerate(weights):
        in_shape = tuple(x.shape) if i == n else shape  # the downsample conv reads x
        if w.dim() != 4 or w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"fastres: conv {i}'s weight must be a 4-D {x.dtype} tensor on "
                            f"{x.device}, got {w.dtype} {tuple(w.shape)} on {w.device}")
        if w.shape[1] != in_shape[1]:
            raise ValueError(f"fastres: conv {i} expects {w.shape[1]} input channels, its input "
                             f"has {in_shape[1]} (grouped convolutions are not supported)")
        out = _conv_out_shape(in_shape, w.shape, geometry, i)
        for t in per_bn[i]:
            if t is not None and (t.numel() != out[1] or t.device != x.device):
                raise ValueError(f"fastres: BN {i} has tensors of {t.numel()} channels on "
                                 f"{t.device}, its conv has {out[1]} outputs on {x.device}")
        shapes.append(out)
        if i < n:
            shape = out
    if shortcut == IDENTITY and tuple(x.shape) != shapes[n - 1]:
        raise ValueError(f"fastres: identity shortcut of shape {tuple(x.shape)} cannot be added "
                         f"to the block output {shapes[n - 1]}")
    if shortcut == DOWNSAMPLE and shapes[n] != shapes[n - 1]:
        raise ValueError(f"fastres: downsample output {shapes[n]} does not match the block "
                         f"output {shapes[n - 1]}")
    return shapes


def _conv_with_stats_kernel(x, weight, bias, geometry, i, shape, bn_args, fp32_precision,
                            prologue=None):
    """Raw conv output of `shape` (from _planned_shapes; prologue applied to x on load) and the
    BN finalize on its batch statistics: (y, scale, shift, mean, invstd, new_running_mean,
    new_running_var). Two launches."""
    stride, padding, dilation = _unpack_geometry(geometry, i)
    out = conv_op.empty_output(x, shape)
    M = shape[0] * shape[2] * shape[3]
    stats = torch.empty((conv_launch.stats_chunks(M), 2, shape[1]), dtype=torch.float32,
                        device=x.device)
    conv_launch.fused_conv2d(x, weight.contiguous(memory_format=torch.channels_last),
                              None if bias is None else bias.float(), None, None, None, out,
                              stride, padding, dilation, (1, 1), False, fp32_precision,
                              prologue=prologue, stats=stats)
    return (out,) + bn_finalize(stats, M, *bn_args)


def _conv_with_stats_torch(x, weight, bias, geometry, i, bn_args):
    """The same as _conv_with_stats_kernel in torch ops (float64, and CPU without the
    interpreter)."""
    stride, padding, dilation = _unpack_geometry(geometry, i)
    gamma, beta, running_mean, running_var, batches_tracked, eps, momentum = bn_args
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    y = y.contiguous(memory_format=conv_op.output_memory_format(x))
    acc = _stat_dtype(x)
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + eps)
    scale = invstd.clone() if gamma is None else invstd * gamma.to(acc)  # outputs never alias
    shift = -mean * scale if beta is None else beta.to(acc) - mean * scale
    new_rm = new_rv = None
    if running_mean is not None:
        count = y.numel() // y.shape[1]
        # batches_tracked is the count before this batch (see kernels/bn_finalize.py)
        factor = 1.0 / (batches_tracked.to(acc) + 1) if momentum is None else momentum
        unbiased = var * (count / max(count - 1, 1))
        new_rm = ((1 - factor) * running_mean.to(acc) + factor * mean).to(running_mean.dtype)
        new_rv = ((1 - factor) * running_var.to(acc) + factor * unbiased).to(running_var.dtype)
    return y, scale, shift, mean, invstd, new_rm, new_rv


def _bn_relu_torch(y, scale, shift, residual=None, relu=True):
    v = y.to(scale.dtype) * _channel(scale) + _channel(shift)
    if residual is not None:
        v = v + residual
    return (torch.relu(v) if relu else v).to(y.dtype)


def _optional(tensors: List[Tensor]) -> List[Optional[Tensor]]:
    """The op's tensor lists mark a missing tensor (no conv bias, no BN affine, no running
    statistics) by an empty one: custom-op autograd only maps gradients onto lists that hold
    tensors throughout."""
    return [None if t.numel() == 0 else t for t in tensors]


def _block_train_impl(x: Tensor, weights: List[Tensor], conv_biases: List[Tensor],
                      bn_weights: List[Tensor], bn_biases: List[Tensor],
                      running_means: List[Tensor], running_vars: List[Tensor],
                      batches_tracked: List[Tensor], geometry: List[int],
                      eps: List[float], momentum: List[float], cumulative: List[bool],
                      shortcut: int, relu: bool, fp32_precision: str) -> List[Tensor]:
    """conv -> BN (batch statistics) -> ReLU for every conv but the last (and, with DOWNSAMPLE,
    the last weight's conv of x), then the last BN + shortcut (+ ReLU).

    Returns [out, then per BN (stages in order, then the downsample's): raw conv outputs,
    batch means, invstds, scales, shifts, new running means, new running vars] (the last two
    empty for BNs without running statistics). Missing tensors are passed as empty ones."""
    conv_biases, bn_weights, bn_biases, running_means, running_vars, batches_tracked = map(
        _optional, (conv_biases, bn_weights, bn_biases, running_means, running_vars,
                    batches_tracked))
    per_bn = list(zip(conv_biases, bn_weights, bn_biases, running_means, running_vars))
    shapes = _planned_shapes(x, weights, per_bn, geometry, shortcut)
    n_bn = len(weights)
    n = n_bn - int(shortcut == DOWNSAMPLE)
    kernels = _uses_kernels(x)

    def stage(inp, i, prologue=None):
        bn_args = (bn_weights[i], bn_biases[i], running_means[i], running_vars[i],
                   batches_tracked[i], eps[i], None if cumulative[i] else momentum[i])
        if kernels:
            return _conv_with_stats_kernel(inp, weights[i], conv_biases[i], geometry, i,
                                           shapes[i], bn_args, fp32_precision, prologue)
        return _conv_with_stats_torch(inp, weights[i], conv_biases[i], geometry, i, bn_args)

    results = []
    h, prologue = x, None
    for i in range(n):
        r = stage(h, i, prologue)
        results.append(r)
        y, scale, shift = r[:3]
        if kernels:
            h, prologue = y, (scale, shift)  # the next conv applies BN + ReLU as it loads y
        else:
            h = _bn_relu_torch(y, scale, shift)
    y, scale, shift = results[-1][:3]
    if shortcut == DOWNSAMPLE:
        rd = stage(x, n)
        results.append(rd)
        if kernels:
            out = bn_act(y, scale, shift, residual=rd[0], residual_scale=rd[1],
                         residual_shift=rd[2], relu=relu)
        else:
            bn_ds = rd[0].to(rd[1].dtype) * _channel(rd[1]) + _channel(rd[2])
            out = _bn_relu_torch(y, scale, shift, residual=bn_ds, relu=relu)
    elif shortcut == IDENTITY:
        # The tail walks y and the residual as one flat array: a strided-view input is copied
        # into y's layout first (y has x's memory format, dense).
        residual = x if same_layout(x, y) else x.contiguous(
            memory_format=conv_op.output_memory_format(x))
        out = bn_act(y, scale, shift, residual=residual, relu=relu) if kernels else \
            _bn_relu_torch(y, scale, shift, residual=x.to(scale.dtype), relu=relu)
    else:
        out = bn_act(y, scale, shift, relu=relu) if kernels else \
            _bn_relu_torch(y, scale, shift, relu=relu)
    # (Outputs of a custom op may not alias each other: one fresh empty tensor per missing one.)
    columns = [[r[0] for r in results], [r[3] for r in results], [r[4] for r in results],
               [r[1] for r in results], [r[2] for r in results],
               [x.new_empty(0) if r[5] is None else r[5] for r in results],
               [x.new_empty(0) if r[6] is None else r[6] for r in results]]
    return [out] + [t for col in columns for t in col]


_block_train_op = torch.library.custom_op("fastres::block_train", _block_train_impl,
                                          mutates_args=())


@_block_train_op.register_fake
def _block_train_fake(x, weights, conv_biases, bn_weights, bn_biases, running_means,
                      running_vars, batches_tracked, geometry, eps, momentum, cumulative,
                      shortcut, relu, fp32_precision):
    per_bn = list(zip(*map(_optional, (conv_biases, bn_weights, bn_biases, running_means,
                                       running_vars))))
    ys = [conv_op.empty_output(x, shape)
          for shape in _planned_shapes(x, weights, per_bn, geometry, shortcut)]
    n = len(weights) - int(shortcut == DOWNSAMPLE)
    acc = _stat_dtype(x)
    per_channel = lambda: [x.new_empty(w.shape[0], dtype=acc) for w in weights]  # noqa: E731
    new_running = [[torch.empty_like(rm) for rm in running]
                   for running in (running_means, running_vars)]
    return ([conv_op.empty_output(x, ys[n - 1].shape)] + ys + per_channel() + per_channel()
            + per_channel() + per_channel() + new_running[0] + new_running[1])


# ---------------------------------------------------------------------------------------------
# The op's backward

def _bn_relu_grads_torch(grad, bn: BNGradInput, mask, mask_output=None, affine=None,
                         second: Optional[BNGradInput] = None, write_g=False):
    """bn_relu_backward's contract in torch ops (float64 and CPU without the interpreter)."""
    acc = bn.mean.dtype
    g = grad.to(acc)
    # The ReLU's backward as torch computes it (see kernels/bn_backward.py, _masked_grad).
    if mask == MASK_FROM_OUTPUT:
        g = torch.ops.aten.threshold_backward(g, mask_output.to(acc), 0)
    elif mask == MASK_FROM_AFFINE:
        g = torch.ops.aten.threshold_backward(
            g, bn.y.to(acc) * _channel(affine[0]) + _channel(affine[1]), 0)
    count = g.numel() // g.shape[1]
    dbeta = g.sum((0, 2, 3))

    def one(b: BNGradInput):
        xhat = (b.y.to(acc) - _channel(b.mean)) * _channel(b.invstd)
        dgamma = (g * xhat).sum((0, 2, 3))
        a = b.invstd if b.gamma is None else b.gamma.to(acc) * b.invstd
        dy = _channel(a) * (g - _channel(dbeta / count) - xhat * _channel(dgamma / count))
        return dy.to(b.y.dtype), dgamma

    dy, dgamma = one(bn)
    dy2, dgamma2 = one(second) if second is not None else (None, None)
    return (dy, dgamma, dbeta, dy2, dgamma2, dbeta if second is not None else None,
            g.to(bn.y.dtype) if write_g else None)


def _block_backward_impl(grad: Tensor, x: Tensor, out: Tensor, weights: List[Tensor],
                         gammas: List[Tensor], ys: List[Tensor], means: List[Tensor],
                         invstds: List[Tensor], scales: List[Tensor], shifts: List[Tensor],
                         geometry: List[int], has_conv_bias: List[bool], shortcut: int,
                         relu: bool, needs_x: bool) -> List[Tensor]:
    """All of the block's gradients: [dx, dweight per conv, dbias per conv, dgamma per BN,
    dbeta per BN]; empty tensors for what does not exist (no conv bias, no BN affine, dx when
    not needed). dx/dweight/dbias in x's dtype, dgamma/dbeta in the statistics' dtype."""
    n_bn = len(weights)
    has_downsample = shortcut == DOWNSAMPLE
    n = n_bn - int(has_downsample)
    gammas = _optional(gammas)
    kernels = _uses_kernels(x)
    bn_grads = bn_relu_backward if kernels else _bn_relu_grads_torch
    bns = [BNGradInput(ys[i], means[i], invstds[i], gammas[i]) for i in range(n_bn)]

    def activation(i):
        """The input of stage i's conv: x, or the previous stage's BN + ReLU output (recomputed
        from the saved raw output, rounded to the dtype as the forward's prologue rounded it)."""
        if i == 0:
            return x
        if kernels:
            return bn_act(ys[i - 1], scales[i - 1], shifts[i - 1])
        return _bn_relu_torch(ys[i - 1], scales[i - 1], shifts[i - 1])

    def conv_backward(dy, inp, i, need_input):
        stride, padding, dilation = _unpack_geometry(geometry, i)
        return conv_op.conv_grads(dy, inp, weights[i], stride, padding, dilation,
                              (need_input, True, True), has_bias=has_conv_bias[i])

    dw, db = [None] * n_bn, [None] * n_bn
    dgamma, dbeta = [None] * n_bn, [None] * n_bn
    # The last stage's BN (and the downsample's BN, which sees the same gradient) + final ReLU.
    dy, dgamma[n - 1], dbeta[n - 1], dyd, dg_ds, db_ds, g_identity = bn_grads(
        grad, bns[n - 1], MASK_FROM_OUTPUT if relu else NO_MASK,
        mask_output=out if relu else None, second=bns[n] if has_downsample else None,
        write_g=shortcut == IDENTITY and needs_x)
    dx_shortcut = g_identity
    if has_downsample:
        dgamma[n], dbeta[n] = dg_ds, db_ds.clone()  # == dbeta[n - 1]; outputs may not alias
        dx_shortcut, dw[n], db[n] = conv_backward(dyd, x, n, needs_x)
    g = None  # dL/d(input of the stage just done): the previous stage's ReLU output
    for i in reversed(range(n)):
        if i < n - 1:
            dy, dgamma[i], dbeta[i], *_ = bn_grads(g, bns[i], MASK_FROM_AFFINE,
                                                   affine=(scales[i], shifts[i]))
        g, dw[i], db[i] = conv_backward(dy, activation(i), i, i > 0 or needs_x)
    dx = (g if dx_shortcut is None else g + dx_shortcut) if needs_x else x.new_empty(0)
    missing = lambda: x.new_empty(0)  # noqa: E731  (outputs may not alias: one each)
    acc = _stat_dtype(x)
    return ([dx.to(x.dtype)] + [d.to(x.dtype) for d in dw]
            + [missing() if d is None else d.to(x.dtype) for d in db]
            + [missing() if w is None else d.to(acc) for w, d in zip(gammas, dgamma)]
            + [missing() if w is None else d.to(acc) for w, d in zip(gammas, dbeta)])


# The backward is an op of its own so that torch.compile's autograd tracing sees one opaque
# node (with a fake implementation) instead of raw Triton launches it cannot trace.
_block_backward_op = torch.library.custom_op("fastres::block_train_backward",
                                             _block_backward_impl, mutates_args=())


@_block_backward_op.register_fake
def _block_backward_fake(grad, x, out, weights, gammas, ys, means, invstds, scales, shifts,
                         geometry, has_conv_bias, shortcut, relu, needs_x):
    acc = _stat_dtype(x)
    affine_grads = lambda: [x.new_empty(w.shape[0], dtype=acc) if g.numel() else x.new_empty(0)  # noqa: E731
                            for w, g in zip(weights, gammas)]
    return ([torch.empty_like(x) if needs_x else x.new_empty(0)]
            + [torch.empty_like(w) for w in weights]
            + [x.new_empty(w.shape[0]) if has else x.new_empty(0)
               for w, has in zip(weights, has_conv_bias)]
            + affine_grads() + affine_grads())  # fresh tensors: fake outputs must not alias


def _setup_context(ctx, inputs, output):
    (x, weights, conv_biases, bn_weights, _, _, _, _, geometry, _, _, _, shortcut, relu, _) = inputs
    n_bn = len(weights)
    ctx.n_bn, ctx.shortcut, ctx.relu, ctx.geometry = n_bn, shortcut, relu, list(geometry)
    ctx.has_conv_bias = [b.numel() > 0 for b in conv_biases]
    ctx.needs_x = ctx.needs_input_grad[0]
    # output[0] is the block output: the final ReLU's mask, and the next block's input anyway.
    ctx.save_for_backward(x, output[0], *weights, *bn_weights, *output[1:1 + 5 * n_bn])


def _backward(ctx, grads):
    n_bn = ctx.n_bn
    saved = list(ctx.saved_tensors)
    x, out = saved[0], saved[1]
    weights, gammas = saved[2:2 + n_bn], saved[2 + n_bn:2 + 2 * n_bn]
    per_bn = saved[2 + 2 * n_bn:]  # ys, means, invstds, scales, shifts
    ys, means, invstds, scales, shifts = (per_bn[j * n_bn:(j + 1) * n_bn] for j in range(5))
    res = _block_backward_op(grads[0], x, out, weights, gammas, ys, means, invstds, scales,
                             shifts, ctx.geometry, ctx.has_conv_bias, ctx.shortcut, ctx.relu,
                             ctx.needs_x)
    dx, dw = res[0], res[1:1 + n_bn]
    db, dgamma, dbeta = (res[1 + n_bn * j:1 + n_bn * (j + 1)] for j in (1, 2, 3))
    cast = lambda grads_, params: [None if t.numel() == 0 else t.to(p.dtype)  # noqa: E731
                                   for t, p in zip(grads_, params)]
    none = [None] * n_bn  # list inputs take a list of gradients (running stats: none)
    return (dx if ctx.needs_x else None, cast(dw, weights), cast(db, weights),
            cast(dgamma, gammas), cast(dbeta, gammas), none, none, none, None, None, None, None,
            None, None, None)


_block_train_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Module-level entry point

def run_train_op(convs: List[nn.Conv2d], bns: List[nn.BatchNorm2d], x: Tensor, shortcut: int,
                  relu: bool) -> Tensor:
    """Call fastres::block_train on these modules: cast for autocast, then copy the returned
    running statistics into the BN buffers and increment num_batches_tracked."""
    weights = [c.weight for c in convs]
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As eager convolutions under autocast: input and weights in the autocast dtype (the
        # cast is differentiable, so the fp32 master weights get the gradients).
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weights = [w.to(dtype) for w in weights]
    tracking = [b.track_running_stats and b.running_mean is not None for b in bns]
    geometry = [v for c in convs for v in _geometry(c)]
    missing = x.new_empty(0)  # the op's marker for "no such tensor" (see _optional)
    given = lambda tensors: [missing if t is None else t for t in tensors]  # noqa: E731
    args = (x, weights, given(c.bias for c in convs), given(b.weight for b in bns),
            given(b.bias for b in bns),
            given(b.running_mean if t else None for b, t in zip(bns, tracking)),
            given(b.running_var if t else None for b, t in zip(bns, tracking)),
            given(b.num_batches_tracked if t and b.momentum is None else None
                  for b, t in zip(bns, tracking)),
            geometry, [float(b.eps) for b in bns], [float(b.momentum or 0.0) for b in bns],
            [b.momentum is None for b in bns], shortcut, relu, conv_op.get_fp32_precision())
    with torch.autocast(device_type, enabled=False):
        results = _block_train_op(*args)
    # Only now, with the op done, the BN state changes: a call that raised has changed nothing.
    n_bn = len(bns)
    new_means, new_vars = results[1 + 5 * n_bn:1 + 6 * n_bn], results[1 + 6 * n_bn:]
    targets = [(b.running_mean, m) for b, t, m in zip(bns, tracking, new_means) if t]
    targets += [(b.running_var, v) for b, t, v in zip(bns, tracking, new_vars) if t]
    counters = [b.num_batches_tracked for b, t in zip(bns, tracking)
                if t and b.num_batches_tracked is not None]
    with torch.no_grad():
        if targets:
            torch._foreach_copy_([t for t, _ in targets], [v for _, v in targets])
        if counters:
            torch._foreach_add_(counters, 1)
    return results[0]
