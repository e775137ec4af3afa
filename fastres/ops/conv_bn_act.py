"""Functional entry point of the fused convolution, registered as a torch custom op.

`conv_bn_act` computes  act( conv(x, weight) + bias + shortcut_conv(x2, weight2) + residual )
with the BatchNorm already folded into `weight`/`bias` (see fastres.nn.folding). Where it runs:

* CUDA tensors: the Triton kernel (kernels/conv.py, launched by fastres.launch.conv).
* CPU tensors with TRITON_INTERPRET=1 set before fastres was imported: the same Triton kernel
  through Triton's interpreter (this is how the test-suite checks the kernels without a GPU).
* other CPU tensors: plain torch ops on the folded weights (a conv with bias, in-place add/ReLU):
  fewer ops than the unfused conv + BatchNorm + ReLU and, as measured (README, "Where it runs"),
  at parity with or slightly faster than the original model.
* inside fastres.launch.target.compile_only() (compile-check): the Triton path, compiled only.

`FASTRES_BACKEND=torch|triton` (read on every call) overrides the choice, for tests and debugging.
The op is a `torch.library.custom_op` with a fake implementation, so `torch.compile(fullgraph=True)`
sees one opaque node per fused convolution.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastres import activations
from fastres.kernels.common import INTERPRETED
from fastres.launch import alloc
from fastres.launch import conv as conv_launch
from fastres.launch.target import compiling_only

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP32_PRECISIONS = ("ieee", "tf32")
_fp32_precision_override: Optional[str] = None

IntPair = Union[int, Sequence[int]]


def set_fp32_precision(precision: Optional[str]) -> None:
    """Choose how fp32 convolutions multiply on the GPU: "ieee" (exact fp32 products), "tf32"
    (tensor cores, ~1e-3 relative error) or None (the default: follow
    torch.backends.cudnn.allow_tf32, i.e. do what PyTorch's own fp32 convolutions do)."""
    global _fp32_precision_override
    if precision is not None and precision not in _FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {_FP32_PRECISIONS} or None, got {precision!r}")
    _fp32_precision_override = precision


def get_fp32_precision() -> str:
    """The precision fp32 convolutions use on the GPU now ("ieee" or "tf32")."""
    if _fp32_precision_override is not None:
        return _fp32_precision_override
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def backend_for(x: Tensor) -> str:
    """"triton" or "torch": which implementation runs for a tensor on x's device."""
    if compiling_only():
        return "triton"
    forced = os.environ.get("FASTRES_BACKEND", "").strip().lower()
    if forced in ("torch", "triton"):
        if forced == "triton" and x.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError("FASTRES_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set "
                               "before fastres is imported")
        return forced
    if forced:
        raise ValueError(f"FASTRES_BACKEND must be 'torch' or 'triton', got {forced!r}")
    if x.device.type == "cuda" or INTERPRETED:
        return "triton"
    return "torch"


def conv_padding(conv: torch.nn.Conv2d) -> Optional[Tuple[int, int]]:
    """The conv's padding as a pair, or None when it is not a symmetric zero padding."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def _pair(value: IntPair, name: str) -> List[int]:
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return value


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The output keeps the input's memory format: channels_last stays channels_last."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_args(x, weight, bias, residual, x2, weight2, stride, padding, dilation, stride2,
                groups, fp32_precision) -> Tuple[int, int, int, int]:
    """Validate everything the kernel relies on; return the output shape (N, K, P, Q)."""
    if x.dim() != 4:
        raise ValueError(f"fastres conv: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"fastres conv: weight must be 4-D (K, C, R, S), got shape {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fastres conv: input dtype {x.dtype} is not supported "
                        f"(supported: float32, float16, bfloat16)")
    if weight.dtype != x.dtype:
        raise TypeError(f"fastres conv: input dtype {x.dtype} does not match weight dtype {weight.dtype}")
    tensors = {"weight": weight, "bias": bias, "residual": residual, "shortcut input": x2,
               "shortcut weight": weight2}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"fastres conv: {name} is on {t.device} but the input is on {x.device}")
    N, C, H, W = x.shape
    K, Cw, R, S = weight.shape
    if groups < 1 or C % groups or K % groups:
        raise ValueError(f"fastres conv: groups={groups} must divide the input's {C} and the "
                         f"weight's {K} channels")
    if Cw * groups != C:
        raise ValueError(f"fastres conv: weight expects {Cw * groups} input channels "
                         f"({Cw} per group, {groups} groups), input has {C}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"fastres conv: bad stride {stride} / padding {padding} / dilation {dilation}")
    P = output_size(H, R, stride[0], padding[0], dilation[0])
    Q = output_size(W, S, stride[1], padding[1], dilation[1])
    if P < 1 or Q < 1:
        raise ValueError(f"fastres conv: input {H}x{W} is too small for a {R}x{S} kernel with "
                         f"padding {padding} and dilation {dilation}")
    if bias is not None and (bias.shape != (K,) or bias.dtype != torch.float32):
        raise ValueError(f"fastres conv: bias must be float32 of shape ({K},), got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    if residual is not None:
        if tuple(residual.shape) != (N, K, P, Q):
            raise ValueError(f"fastres conv: residual has shape {tuple(residual.shape)}, "
                             f"the output is {(N, K, P, Q)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"fastres conv: residual dtype {residual.dtype} does not match input dtype {x.dtype}")
    if (x2 is None) != (weight2 is None):
        raise ValueError("fastres conv: shortcut input and shortcut weight must be given together")
    if x2 is not None:
        if x2.dim() != 4 or x2.shape[0] != N:
            raise ValueError(f"fastres conv: shortcut input must be 4-D with batch {N}, got {tuple(x2.shape)}")
        if x2.dtype != x.dtype or weight2.dtype != x.dtype:
            raise TypeError(f"fastres conv: shortcut tensors must be {x.dtype}, got {x2.dtype} and {weight2.dtype}")
        if tuple(weight2.shape) != (K, x2.shape[1], 1, 1):
            raise ValueError(f"fastres conv: shortcut weight must be ({K}, {x2.shape[1]}, 1, 1), "
                             f"got {tuple(weight2.shape)}")
        if min(stride2) < 1:
            raise ValueError(f"fastres conv: bad shortcut stride {stride2}")
        P2 = output_size(x2.shape[2], 1, stride2[0], 0, 1)
        Q2 = output_size(x2.shape[3], 1, stride2[1], 0, 1)
        if (P2, Q2) != (P, Q):
            raise ValueError(f"fastres conv: shortcut output is {P2}x{Q2}, main output is {P}x{Q}")
    if fp32_precision not in _FP32_PRECISIONS:
        raise ValueError(f"fastres conv: fp32_precision must be one of {_FP32_PRECISIONS}")
    return N, K, P, Q


def empty_output(x: Tensor, shape) -> Tensor:
    """A fused conv's output of `shape`: x's dtype, device and memory format."""
    return alloc.empty(shape, x, memory_format=output_memory_format(x))


def _conv_bn_act_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                      shortcut_input: Optional[Tensor], shortcut_weight: Optional[Tensor],
                      stride: List[int], padding: List[int], dilation: List[int],
                      shortcut_stride: List[int], groups: int, activation: str,
                      negative_slope: float, fp32_precision: str) -> Tensor:
    shape = _check_args(x, weight, bias, residual, shortcut_input, shortcut_weight, stride, padding,
                        dilation, shortcut_stride, groups, fp32_precision)
    if backend_for(x) == "triton":
        out = empty_output(x, shape)
        if out.numel() == 0:
            return out
        return conv_launch.fused_conv2d(x, weight, bias, residual, shortcut_input, shortcut_weight,
                                        out, stride, padding, dilation, shortcut_stride,
                                        (activation, negative_slope), fp32_precision,
                                        groups=groups)
    out = torch_conv_bn_act(x, weight, bias, residual, shortcut_input, shortcut_weight, stride,
                            padding, dilation, shortcut_stride, (activation, negative_slope),
                            groups)
    # The fake implementation promises the input's memory format; keep that promise.
    return out.contiguous(memory_format=output_memory_format(x))


def torch_conv_bn_act(x, weight, bias, residual, shortcut_input, shortcut_weight, stride, padding,
                      dilation, shortcut_stride, activation, groups: int = 1) -> Tensor:
    """The folded torch path: one conv with the BN shift as its bias, then in-place epilogue ops
    on the fresh output. activation: anything fastres.activations.resolve takes (a name, a
    (name, slope) pair, or a bool for ReLU). Shapes are not validated here (F.conv2d checks
    its own)."""
    out = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation,
                   groups)
    if shortcut_input is not None:
        out.add_(F.conv2d(shortcut_input, shortcut_weight, None, shortcut_stride))
    if residual is not None:
        out.add_(residual)
    return activations.apply(out, *activations.resolve(activation), inplace=True)


def execution_plan(x: Tensor) -> Tuple[bool, torch.memory_format]:
    """Decided once per module call for input x: (eager_torch, weight_memory_format).

    eager_torch: the call runs the torch path eagerly with no tool watching (no torch.compile,
    no dispatch mode), so the modules call torch_conv_bn_act directly: on small CPU inputs the
    per-call Python of the checked op is a visible share of the time.
    weight_memory_format: layout of the folded weights. The kernel reduces in (r, s, c) order, so
    it wants channels_last; the torch path keeps the original weight's strides, because PyTorch
    picks a conv's algorithm and output layout from the input's and the weight's layouts (a
    channels_last weight makes it run an NCHW input's conv in channels_last, for one)."""
    backend = backend_for(x)
    eager_torch = (backend == "torch" and not torch.compiler.is_compiling()
                   and _get_current_dispatch_mode() is None)
    return eager_torch, torch.channels_last if backend == "triton" else torch.preserve_format


# The registered op: for torch.compile (one opaque node with a fake implementation) and for
# autograd (the backward below), so frozen-BN training and eval-mode gradients run fused too.
_conv_bn_act = torch.library.custom_op("fastres::conv_bn_act", _conv_bn_act_impl, mutates_args=())


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, x2, w2, stride, padding, dilation, stride2, groups, act, _,
     _) = inputs
    relu = act == "relu"  # (conv_bn_act records other activations outside the op)
    # The output doubles as the ReLU mask (it is the next layer's input anyway, so saving it
    # costs no extra memory); no pre-activation copy is kept.
    ctx.save_for_backward(x, weight, x2, w2, output if relu else None)
    ctx.conv = (list(stride), list(padding), list(dilation), list(stride2), groups)
    ctx.has = (bias is not None, residual is not None)


def conv_grads(g, x, weight, stride, padding, dilation, needs, has_bias: bool = False,
               groups: int = 1):
    """(dL/dx, dL/dweight, dL/dbias) of conv2d(x, weight[, bias], groups=groups) for upstream
    gradient g, by aten's convolution_backward (cuDNN on GPUs); needs = which of the three to
    compute."""
    needs = (needs[0], needs[1], has_bias and needs[2])
    if not any(needs):
        return None, None, None
    return torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, list(needs))


def _backward(ctx, grad):
    x, weight, x2, w2, out = ctx.saved_tensors
    stride, padding, dilation, stride2, groups = ctx.conv
    has_bias, has_residual = ctx.has
    needs = ctx.needs_input_grad
    # torch's own ReLU backward, (out <= 0 ? 0 : grad): grad * (out > 0) would turn an inf
    # gradient at a masked position into NaN and drop the gradient at a NaN output.
    g = grad if out is None else torch.ops.aten.threshold_backward(grad, out, 0)
    dx, dw, _ = conv_grads(g, x, weight, stride, padding, dilation, (needs[0], needs[1], False),
                           groups=groups)
    db = g.float().sum((0, 2, 3)) if has_bias and needs[2] else None
    dres = g if has_residual and needs[3] else None
    dx2 = dw2 = None
    if x2 is not None:
        dx2, dw2, _ = conv_grads(g, x2, w2, stride2, [0, 0], [1, 1], (needs[4], needs[5], False))
    return dx, dw, db, dres, dx2, dw2, None, None, None, None, None, None, None, None


_conv_bn_act.register_autograd(_backward, setup_context=_setup_context)


@_conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, bias, residual, shortcut_input, shortcut_weight, stride, padding,
                      dilation, shortcut_stride, groups, activation, negative_slope, fp32_precision):
    shape = _check_args(x, weight, bias, residual, shortcut_input, shortcut_weight, stride, padding,
                        dilation, shortcut_stride, groups, fp32_precision)
    return empty_output(x, shape)


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride: IntPair = 1,
                padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                residual: Optional[Tensor] = None,
                shortcut: Optional[Tuple[Tensor, Tensor, IntPair]] = None, relu: bool = True,
                activation: Optional[str] = None, negative_slope: float = 0.01,
                fp32_precision: Optional[str] = None) -> Tensor:
    """act(conv2d(x, weight, stride, padding, dilation) + bias [+ shortcut] [+ residual]).

    x: (N, C, H, W) float32/float16/bfloat16, NCHW-contiguous, channels_last or any strides.
    weight: (K, C // groups, R, S) of x's dtype (BatchNorm already folded in: see
        fastres.fold_conv_bn).
    groups: a grouped conv, as nn.Conv2d's groups (depthwise when groups = C: its own direct-conv
        kernel). The shortcut is never grouped.
    bias: (K,) per-output-channel shift, computed in float32 (other dtypes are converted).
    residual: (N, K, P, Q) added before the activation (the identity shortcut of a ResNet block).
    shortcut: (x2, weight2, stride2): a 1x1 conv of x2 with stride2 added before the activation
        (the folded downsample of a ResNet block; put its BN shift into `bias`).
    relu: the activation is ReLU (True) or none (False), unless `activation` is given.
    activation: one of fastres.activations.NAMES ("identity", "relu", "relu6", "silu", "gelu",
        "gelu_tanh", "hardswish", "hardsigmoid", "leaky_relu"), computed as torch computes it
        (NaN and inf included); negative_slope: leaky_relu's.
    fp32_precision: "ieee" or "tf32" for float32 inputs on the GPU; default get_fp32_precision().
    Returns (N, K, P, Q) in x's memory format. Raises ValueError/TypeError on bad input.
    Gradients: the op's own backward for ReLU and none; other activations are recorded by
    autograd as the torch function after the op (one more elementwise pass, only then).
    """
    act, slope = activations.resolve(relu if activation is None else activation, negative_slope)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    x2 = w2 = None
    stride2 = [1, 1]
    if shortcut is not None:
        x2, w2, s2 = shortcut
        stride2 = _pair(s2, "shortcut stride")
    operands = (x, weight, bias, residual, x2, w2, _pair(stride, "stride"), _pair(padding, "padding"),
                _pair(dilation, "dilation"), stride2, int(groups))
    precision = fp32_precision or get_fp32_precision()
    args = operands + (act, slope, precision)
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual, x2, w2))
    if recording and act not in ("relu", "identity"):
        # The op's backward knows the ReLU mask (its output); other activations need their
        # input, so autograd records the activation itself after an identity epilogue.
        return activations.apply(_conv_bn_act(*operands, "identity", 0.0, precision), act, slope)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or _get_current_dispatch_mode() is not None) or recording:
        return _conv_bn_act(*args)
    # Plain eager calls with nothing to differentiate skip the dispatcher's custom-op machinery,
    # which costs more than a small convolution; the implementation is the same function.
    # (Under a dispatch mode - fake tensors, op counters - and TorchScript tracing, tools see
    # the one registered op.)
    return _conv_bn_act_impl(*args)
