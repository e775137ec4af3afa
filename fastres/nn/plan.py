"""What a fused module runs for one call: `plan(module, args, kwargs)` decides, `run()` does it.

Every fused module's forward is `run(self, plan(self, args, kwargs), args, kwargs)`, so the
whole decision - which path, with which folded weights - is made here, in one function, from
the rules in fastres.nn.anatomy and the caches in fastres.nn.folding:

  UNFUSED    the module's own forward, as before optimize(): a hook or parametrization a kernel
             would bypass, global hooks, torch.fx / TorchScript tracing that must see the
             modules, other call arguments, a non-4-D input, modules the kernels do not take,
             mixed train/eval BNs, or train mode where the Triton kernels do not run;
  REFERENCE  a fused chain's conv -> BN (-> ReLU) computed by the conv with the unfused torch
             modules, while its BN and ReLU pass their input through (float64 input, or train
             mode where the kernels do not run);
  FOLDED     eval mode: every BN folded into its conv, one fused launch per conv (the block's
             shortcut in the last launch's epilogue);
  TRAIN      every BN in train mode: fastres::block_train (fastres.ops.block_train);
  FX_LEAF    torch.fx is tracing a chain module: record a call of the module itself.

`plan()` has no side effects beyond the fold caches; `run()` also invalidates every cached
fold when a BN runs in train mode (its running statistics change in place, unversioned).
Debugging: `fastres.nn.plan.plan(model.layer1[0], (x,), {})` shows what a call would do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn

from fastres import activations
from fastres.nn.anatomy import (
    block_pairs,
    block_reason,
    call_reason,
    chain_activation,
    chain_reason,
    grouped_train_reason,
    input_reason,
    sequential_reason,
    train_kernels_run,
)
from fastres.nn.folding import cached_fold, cached_fold_with_shortcut, invalidate_all
from fastres.ops.block_train import DOWNSAMPLE, IDENTITY, NO_SHORTCUT, run_train_op
from fastres.ops.conv_bn_act import conv_bn_act, conv_padding, execution_plan, torch_conv_bn_act

UNFUSED, REFERENCE, FOLDED, TRAIN, FX_LEAF = "unfused", "reference", "folded", "train", "fx_leaf"
RELU = ("relu", 0.0)
# The activations the fused training path (fastres::block_train) applies; chains with any other
# run their modules unfused in train mode.
TRAIN_ACTIVATIONS = ("relu", "identity")


@dataclass(frozen=True)
class Launch:
    """One fused conv of a FOLDED plan: act(conv(h, weight) + bias [+ x] [+ conv1x1(x)])
    with h the previous launch's output (the unit's input x for the first)."""
    conv: nn.Conv2d
    weight: Tensor
    bias: Tensor
    activation: Tuple[str, float]  # (name, slope): fastres.activations
    residual: bool = False  # add x: the identity shortcut
    shortcut: Optional[Tuple[Tensor, Tuple[int, int]]] = None  # (folded 1x1 weight, stride) on x


@dataclass(frozen=True)
class Plan:
    path: str
    reason: Optional[str] = None  # why UNFUSED or REFERENCE
    training: bool = False        # a BN runs in train mode
    x: Optional[Tensor] = None    # the input as the fused path takes it (autocast applied)
    launches: Tuple[Launch, ...] = ()  # FOLDED
    eager_torch: bool = False     # FOLDED: call the folded torch path directly (see execution_plan)
    train_op: Optional[Tuple[List[nn.Conv2d], List[nn.BatchNorm2d], int, bool]] = None
    # TRAIN: (convs, bns, shortcut kind, final ReLU) for fastres.ops.block_train.run_train_op


def plan(module: nn.Module, args: tuple, kwargs: dict) -> Plan:
    """The plan for calling `module` (a FusedConvBNReLU, a fused block or a FusedConv2d heading
    a chain) with these arguments."""
    unit = type(module)._fastres_unit
    if unit == "block":
        return _plan_block(module, args, kwargs)
    if unit == "sequential":
        return _plan_sequential(module, args, kwargs)
    return _plan_chain(module, args[0])


def run(module: nn.Module, p: Plan, args: tuple, kwargs: dict) -> Tensor:
    """Carry out plan `p` for this call of `module`."""
    if p.training and not torch.compiler.is_compiling():
        invalidate_all()
    if p.path == UNFUSED:
        return module._fastres_unfused(*args, **kwargs)
    if p.path == REFERENCE:
        return module._fastres_reference(args[0])
    if p.path == FX_LEAF:
        x = args[0]
        return x.tracer.create_proxy("call_module", x.tracer.path_of_module(module), (x,), {})
    if p.path == TRAIN:
        convs, bns, shortcut, relu = p.train_op
        return run_train_op(convs, bns, p.x, shortcut, relu)
    out = p.x
    for launch in p.launches:
        out = _fused_conv(out, p.x, launch, p.eager_torch)
    return out


# ---------------------------------------------------------------------------------------------
# Per unit

def _plan_sequential(seq: nn.Module, args: tuple, kwargs: dict) -> Plan:
    mods = list(seq._modules.values())
    train = len(mods) > 1 and mods[1].training
    reason = call_reason(args, kwargs, train) or sequential_reason(seq, train)
    if reason:
        return Plan(UNFUSED, reason, train)
    conv, bn, relu = mods[0], mods[1], len(mods) > 2
    return _plan_conv_bn(seq._fold_cache, conv, bn, relu, args[0], "0", UNFUSED)


def _plan_chain(conv: nn.Module, x) -> Plan:
    d = conv.__dict__
    bn = d["_fastres_bn"]
    if isinstance(x, torch.fx.Proxy):
        return Plan(FX_LEAF)
    reason = chain_reason(conv)
    if reason:
        return Plan(UNFUSED, reason, bn.training)
    if x.dim() != 4:  # the BN this conv stands for would refuse it
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    return _plan_conv_bn(d["_fastres_fold_cache"], conv, bn, chain_activation(conv), x, "conv",
                         REFERENCE)


def _plan_conv_bn(cache, conv, bn, activation, x: Tensor, conv_name: str, fallback: str) -> Plan:
    """conv -> BN (-> activation) once the modules may fuse: by the input (and the mode), fused
    or `fallback`. activation: (name, slope), or a bool for ReLU or none."""
    activation = activations.resolve(activation)
    if bn.training:
        if activation[0] not in TRAIN_ACTIVATIONS:
            return Plan(fallback, f"train mode: {activation[0]} is fused in eval mode only", True)
        reason = grouped_train_reason(conv)
        if reason:
            return Plan(fallback, f"train mode: {reason}", True)
        if not train_kernels_run(x):
            return Plan(fallback, _no_train_kernels(x), True)
        return Plan(TRAIN, training=True, x=prepare_input(x, [(conv_name, conv)]),
                    train_op=([conv], [bn], NO_SHORTCUT, activation[0] == "relu"))
    reason = input_reason(x)
    if reason:
        return Plan(fallback, reason)
    x = prepare_input(x, [(conv_name, conv)])
    eager_torch, fmt = execution_plan(x)
    weight, bias = cached_fold(cache, conv, bn, fmt, x.dtype)
    return Plan(FOLDED, x=x, launches=(Launch(conv, weight, bias, activation),),
                eager_torch=eager_torch)


def _plan_block(block: nn.Module, args: tuple, kwargs: dict) -> Plan:
    d = block.__dict__
    stages = block._fastres_stages
    pairs = block_pairs(block, stages) if "_fastres_caches" in d else None
    training = [bn.training for _, bn in pairs or ()]
    train = any(training)
    reason = (("its children no longer have a block's shape" if pairs is None else None)
              or call_reason(args, kwargs, train)
              or ("its BNs are in mixed train/eval modes" if train and not all(training) else None)
              or block_reason(block, train, call=True))
    if reason:
        return Plan(UNFUSED, reason, train)
    x = args[0]
    reason = _no_train_kernels(x) if train and not train_kernels_run(x) else (
        None if train else input_reason(x))
    if reason:  # float64, or train mode where the kernels do not run
        return Plan(UNFUSED, reason, train)
    x = prepare_input(x, [(name, conv) for name, (conv, _) in
                          zip(stages + ("downsample",), pairs)])
    n = len(stages)
    if train:
        return Plan(TRAIN, training=True, x=x,
                    train_op=([c for c, _ in pairs], [b for _, b in pairs],
                              DOWNSAMPLE if len(pairs) > n else IDENTITY, True))
    eager_torch, fmt = execution_plan(x)  # the intermediates are on x's device and layout
    caches = d["_fastres_caches"]
    # Every stage but the last: conv + folded BN + ReLU.
    launches = [Launch(conv, *cached_fold(caches[name], conv, bn, fmt, x.dtype), RELU)
                for name, (conv, bn) in zip(stages[:-1], pairs[:n - 1])]
    # Last stage: conv + folded BN + shortcut + ReLU in one launch.
    last, last_bn = pairs[n - 1]
    if len(pairs) == n:
        weight, bias = cached_fold(caches["last"], last, last_bn, fmt, x.dtype)
        launches.append(Launch(last, weight, bias, RELU, residual=True))
    else:
        ds_conv, ds_bn = pairs[n]
        weight, weight2, bias = cached_fold_with_shortcut(caches["last"], last, last_bn, ds_conv,
                                                          ds_bn, fmt, x.dtype)
        launches.append(Launch(last, weight, bias, RELU,
                               shortcut=(weight2, tuple(ds_conv.stride))))
    return Plan(FOLDED, x=x, launches=tuple(launches), eager_torch=eager_torch)


# ---------------------------------------------------------------------------------------------
# Input and launch

def _no_train_kernels(x: Tensor) -> str:
    return (input_reason(x) or
            f"train mode runs the Triton kernels only (CUDA, or TRITON_INTERPRET); {x.device} here")


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype eager convolutions would compute x in under an active autocast (None: no
    autocast for x's device, or x is float64, which autocast leaves alone)."""
    if (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(x.device.type)
    return None


def prepare_input(x: Tensor, named_convs) -> Tensor:
    """x cast to the autocast dtype when autocast is on. Checks that the convs' weights are on
    x's device and, without autocast, of x's dtype (under autocast the weights are cast, as
    eager convolutions cast them)."""
    cast = autocast_dtype(x)
    if cast is not None:
        x = x.to(cast)
    for name, conv in named_convs:
        w = conv.weight
        if cast is None and w.dtype != x.dtype:
            raise TypeError(f"fastres: input dtype {x.dtype} does not match {name}.weight dtype {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"fastres: input is on {x.device} but {name}.weight is on {w.device}")
    return x


def _fused_conv(h: Tensor, x: Tensor, launch: Launch, eager_torch: bool) -> Tensor:
    conv = launch.conv
    residual = x if launch.residual else None
    shortcut = (x,) + launch.shortcut if launch.shortcut is not None else None
    if eager_torch:
        # The plan already checked dtypes and devices, and nothing here needs autograd.
        x2, w2, s2 = shortcut if shortcut is not None else (None, None, None)
        return torch_conv_bn_act(h, launch.weight, launch.bias, residual, x2, w2, conv.stride,
                                 conv_padding(conv), conv.dilation, s2, launch.activation,
                                 conv.groups)
    name, slope = launch.activation
    return conv_bn_act(h, launch.weight, launch.bias, stride=conv.stride,
                       padding=conv_padding(conv), dilation=conv.dilation, groups=conv.groups,
                       residual=residual,
                       shortcut=shortcut, activation=name, negative_slope=slope)
