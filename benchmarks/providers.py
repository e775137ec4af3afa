"""The implementations a benchmark compares, side by side in one run.

eager_nchw / eager_cl      the unfused module, NCHW-contiguous / channels_last
eager_folded               BN folded into the conv by torch.fx.experimental.optimization.fuse
                           (what torch.nn.utils.fusion.fuse_conv_bn_eval does per pair), channels_last
compile / compile_max_autotune   torch.compile of the unfused module (default / "max-autotune"),
                           channels_last
fastres                    fastres's fused kernels (the functional op for a layer, the fused block,
                           or fastres.optimize() for a model), channels_last

Training steps (level train_block / train_model): forward + backward of the module in train mode
(batch-statistics BN), gradients set to None first. Weights stay fp32; float16/bfloat16 mean
torch.autocast to that dtype (AMP), float32 means plain fp32. Providers: eager_nchw, eager_cl,
compile (torch.compile of the unfused module, channels_last) and fastres.
"""
from __future__ import annotations

import copy
from typing import Callable, Tuple

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse_conv_bn

import fastres
from fastres import FusedBasicBlock, FusedBottleneck
from fastres.nn.folding import fold_modules
from fastres.ops.conv_bn_act import execution_plan

PROVIDERS = ("eager_nchw", "eager_cl", "eager_folded", "compile", "compile_max_autotune", "fastres")
TRAIN_PROVIDERS = ("eager_nchw", "eager_cl", "compile", "fastres")
COMPILED = ("compile", "compile_max_autotune")


def memory_format(provider: str) -> torch.memory_format:
    return torch.contiguous_format if provider == "eager_nchw" else torch.channels_last


def _layer_fastres(module) -> Callable:
    """One fused launch: the layer's conv + BN (+ residual or downsample) + ReLU."""
    case = module.case
    # The weight layout the fused modules would use here (channels_last for the kernel).
    _, fmt = execution_plan(module.conv.weight)
    w, b = fold_modules(module.conv, module.bn, fmt)
    if case.epilogue == "shortcut":
        w2, b2 = fold_modules(module.downsample[0], module.downsample[1], fmt)
        b = b + b2

        def run(x, extra):
            return fastres.conv_bn_act(x, w, b, stride=case.stride, padding=case.padding,
                                       shortcut=(extra, w2, case.stride2))
    elif case.epilogue == "residual":
        def run(x, extra):
            return fastres.conv_bn_act(x, w, b, stride=case.stride, padding=case.padding,
                                       residual=extra)
    else:
        def run(x):
            return fastres.conv_bn_act(x, w, b, stride=case.stride, padding=case.padding)
    return run


def build(provider: str, module: nn.Module, level: str, dtype: torch.dtype,
          device: torch.device) -> Callable:
    """A callable taking the case's inputs, for `provider`, on a private copy of `module`."""
    m = copy.deepcopy(module).eval().to(device=device, dtype=dtype,
                                        memory_format=memory_format(provider))
    if provider in ("eager_nchw", "eager_cl"):
        return m
    if provider == "eager_folded":
        return fx_fuse_conv_bn(m)
    if provider == "compile":
        return torch.compile(m)
    if provider == "compile_max_autotune":
        return torch.compile(m, mode="max-autotune")
    if provider == "fastres":
        if level == "layer":
            with torch.no_grad():
                return _layer_fastres(m)
        if level == "block":
            cls = FusedBottleneck if hasattr(m, "conv3") else FusedBasicBlock
            return cls.from_block(m)
        return fastres.optimize(m)
    raise ValueError(f"unknown provider {provider!r}")


def inputs_for(level: str, module: nn.Module, case, dtype, device, provider) -> Tuple[torch.Tensor, ...]:
    fmt = memory_format(provider)
    if level == "layer":
        return module.make_inputs(dtype, device, fmt)
    C, H = (3, 224) if level == "model" else (case.C, case.H)
    x = torch.randn(case.N, C, H, H, dtype=dtype, device=device)
    return (x.contiguous(memory_format=fmt),)


def build_train(provider: str, module: nn.Module, level: str, dtype: torch.dtype,
                device: torch.device) -> Callable:
    """A training step for `provider` on a private copy of `module` (fp32 weights, train mode):
    step(x) runs forward (under autocast unless dtype is float32) and backward of a scalar loss."""
    m = copy.deepcopy(module).train().to(device=device, memory_format=memory_format(provider))
    params = list(m.parameters())
    if provider == "fastres":
        if level == "train_block":
            cls = FusedBottleneck if hasattr(m, "conv3") else FusedBasicBlock
            m = cls.from_block(m)
        else:
            m = fastres.optimize(m)
    elif provider == "compile":
        m = torch.compile(m)
    elif provider not in ("eager_nchw", "eager_cl"):
        raise ValueError(f"unknown training provider {provider!r}")
    amp = dtype != torch.float32

    def step(x):
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = m(x)
        out.float().square().mean().backward()
        return out

    return step


def train_inputs(level: str, case, dtype, device, provider) -> Tuple[torch.Tensor, ...]:
    """Model: fp32 images (autocast casts them). Block: the activation a block receives inside
    an AMP network (the autocast dtype), requiring grad as every block input but the image does."""
    fmt = memory_format(provider)
    if level == "train_model":
        return (torch.randn(case.N, 3, 224, 224, device=device).contiguous(memory_format=fmt),)
    x = torch.randn(case.N, case.C, case.H, case.W, device=device, dtype=dtype)
    return (x.contiguous(memory_format=fmt).requires_grad_(),)
