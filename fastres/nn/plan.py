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
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastres import activations
from fastres.launch import conv as conv_launch
from fastres.launch.gate import gate_act
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
from fastres.nn.residual import (
    Gate,
    Norm,
    Segment,
    Stage,
    dual_gemm_shortcut,
    final_activation,
    gate_modules,
    residual_block_reason,
    run_norm,
    segment_modules,
    stage_activation,
)
from fastres.ops.block_train import DOWNSAMPLE, IDENTITY, NO_SHORTCUT, run_train_op
from fastres.ops.conv_bn_act import (
    backend_for,
    conv_bn_act,
    conv_padding,
    empty_output,
    execution_plan,
    get_fp32_precision,
    output_size,
    torch_conv_bn_act,
)

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
class GateStep:
    """An SE / ECA gate of a FOLDED residual plan on the launch before it (which also pools its
    output): z * module(mean of z, z), the product fused with what follows it (the add and the
    activation when it ends the branch)."""
    module: nn.Module  # the gate's torch.fx module, (pooled, z) -> gate (residual.gate_modules)
    keepdim: bool


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
    residual: Optional[tuple] = None
    # FOLDED residual block (fastres.nn.residual): (prefix steps, branch steps, shortcut steps,
    # last launch, final activation, steps of each extra term), a step a Launch, a GateStep or a
    # module (or a block's BN -> activation) run as it is, branch, shortcut and extra terms
    # starting where the prefix ends (the extra terms are added to the residual); the last launch
    # adds the shortcut's result (or reduces its 1x1 conv as the second GEMM on the shortcut's
    # input) before its activation. A branch that ends in a gate has no last launch: its gate
    # pass adds the shortcut and applies the activation.


def plan(module: nn.Module, args: tuple, kwargs: dict) -> Plan:
    """The plan for calling `module` (a FusedConvBNReLU, a fused block or a FusedConv2d heading
    a chain) with these arguments."""
    unit = type(module)._fastres_unit
    if unit == "block":
        return _plan_block(module, args, kwargs)
    if unit == "sequential":
        return _plan_sequential(module, args, kwargs)
    if unit == "residual":
        return _plan_residual(module, args, kwargs)
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
    if p.residual is not None:
        return _run_residual(p)
    out = p.x
    for launch in p.launches:
        out = _fused_conv(out, p.x, launch, p.eager_torch)
    return out


def _run_residual(p: Plan) -> Tensor:
    prefix, branch, shortcut, last, act, extra = p.residual
    s = h = p.x
    for step in prefix:
        s = h = _fused_conv(h, h, step, p.eager_torch) if isinstance(step, Launch) else step(h)
    start = h
    for step in shortcut:
        s = _fused_conv(s, s, step, p.eager_torch) if isinstance(step, Launch) else step(s)
    residual = None  # the extra terms' sum (with s unless s is the second GEMM's input)
    for term in extra:
        t = start
        for step in term:
            t = _fused_conv(t, t, step, p.eager_torch) if isinstance(step, Launch) else step(t)
        residual = t if residual is None else residual + t
    if last is None or not last.shortcut:
        residual = s if residual is None else residual + s
    pooled = None
    for i, step in enumerate(branch):
        if isinstance(step, GateStep):
            ends = last is None and i == len(branch) - 1  # the gate pass ends the block
            h = _gate(h, pooled, step, residual if ends else None,
                      act if ends else ("identity", 0.0))
        elif isinstance(step, Launch):
            if i + 1 < len(branch) and isinstance(branch[i + 1], GateStep):
                h, pooled = _fused_conv_pooled(h, step)
            else:
                h = _fused_conv(h, h, step, p.eager_torch)
        else:
            h = step(h)
    return h if last is None else _fused_conv(h, s, last, p.eager_torch, residual)


def _fused_conv_pooled(h: Tensor, launch: Launch) -> Tuple[Tensor, Tensor]:
    """(z, the mean of z over each image) for the conv of `launch` (no residual): the mean from
    the sums the kernel's POOL epilogue adds up as it stores z (fp32, rounded to z's dtype as
    z.mean would round it); on the torch path, z.mean itself."""
    conv = launch.conv
    stride, padding, dilation = conv.stride, conv_padding(conv), conv.dilation
    if backend_for(h) == "torch":
        z = torch_conv_bn_act(h, launch.weight, launch.bias, None, None, None, stride, padding,
                              dilation, None, launch.activation, conv.groups)
        return z, z.mean((2, 3))
    N, _, H, W = h.shape
    K, _, R, S = launch.weight.shape
    P = output_size(H, R, stride[0], padding[0], dilation[0])
    Q = output_size(W, S, stride[1], padding[1], dilation[1])
    z = empty_output(h, (N, K, P, Q))
    sums = torch.zeros(N, K, dtype=torch.float32, device=h.device)
    conv_launch.fused_conv2d(h, launch.weight, launch.bias, None, None, None, z, stride, padding,
                             dilation, (1, 1), launch.activation, get_fp32_precision(),
                             groups=conv.groups, pool=sums)
    return z, (sums / (P * Q)).to(z.dtype)


def _gate(z: Tensor, pooled: Tensor, step: GateStep, residual: Optional[Tensor],
          act: Tuple[str, float]) -> Tensor:
    """act(z * gate + residual), gate = the gate's network on z's pooled means."""
    N, K = pooled.shape
    g = step.module(pooled.view(N, K, 1, 1) if step.keepdim else pooled, z)
    if backend_for(z) == "torch":
        out = z * g
        if residual is not None:
            out += residual
        return activations.apply(out, *act, inplace=True)
    if g.dim() == 4 and tuple(g.shape[2:]) != (1, 1):
        if g.stride(2) or g.stride(3):
            raise RuntimeError("fastres: an SE gate that varies over the image")
        g = g[:, :, :1, :1]  # (expand_as: one value per image and channel)
    return gate_act(z, g.reshape(N, K), residual, act)


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


def _plan_residual(block: nn.Module, args: tuple, kwargs: dict) -> Plan:
    d = block.__dict__
    r = d.get("_fastres_residual")
    train = r is None or any(m.training for m in block.modules())
    reason = call_reason(args, kwargs, train) or residual_block_reason(block, train, call=True)
    if reason:
        return Plan(UNFUSED, reason, train)
    x = args[0]
    reason = input_reason(x)
    if reason:
        return Plan(UNFUSED, reason)
    get = block.get_submodule
    stages = [op for op in r.prefix + r.branch + r.shortcut if isinstance(op, Stage)]
    gated = any(isinstance(op, Gate) for op in r.branch)
    if gated:
        reason = _gate_context_reason(block, x)
        if reason:
            return Plan(UNFUSED, reason)
    x = prepare_input(x, [(op.conv, get(op.conv)) for op in stages])
    eager_torch, fmt = execution_plan(x)
    caches = d["_fastres_caches"]

    def bn(op):
        return get(op.bn) if op.bn is not None else None

    def step(op):
        if isinstance(op, Stage):
            return Launch(get(op.conv), *cached_fold(caches[op.conv], get(op.conv), bn(op), fmt,
                                                     x.dtype), stage_activation(block, op))
        if isinstance(op, Gate):
            return GateStep(gate_modules(block)[op.index], op.keepdim)
        if isinstance(op, Norm):
            return partial(run_norm, block, op)
        if isinstance(op, Segment):
            return segment_modules(block)[op.index]
        return get(op.module)

    def steps(ops):
        return tuple(step(op) for op in ops)

    last, act = r.branch[-1], final_activation(block, r)
    prefix = steps(r.prefix)
    extra = tuple(steps(term) for term in r.extra)
    if isinstance(last, Gate):
        return Plan(FOLDED, x=x, eager_torch=eager_torch,
                    residual=(prefix, steps(r.branch), steps(r.shortcut), None, act, extra))
    conv, last_bn = get(last.conv), bn(last)
    if dual_gemm_shortcut(block, r):
        ds = r.shortcut[-1]
        ds_conv = get(ds.conv)
        weight, weight2, bias = cached_fold_with_shortcut(caches["last"], conv, last_bn, ds_conv,
                                                          bn(ds), fmt, x.dtype)
        final = Launch(conv, weight, bias, act, residual=bool(r.extra),
                       shortcut=(weight2, tuple(ds_conv.stride)))
        shortcut = steps(r.shortcut[:-1])
    else:
        final = Launch(conv, *cached_fold(caches["last"], conv, last_bn, fmt, x.dtype), act,
                       residual=True)
        shortcut = steps(r.shortcut)
    return Plan(FOLDED, x=x, eager_torch=eager_torch,
                residual=(prefix, steps(r.branch[:-1]), shortcut, final, act, extra))


def _gate_context_reason(block: nn.Module, x: Tensor) -> Optional[str]:
    """Why a residual block with an SE / ECA gate runs its own forward for this call (None: it
    fuses): the gate's pass is fused for inference only."""
    # (its Triton path launches the kernels directly, not through a registered op: no fake
    # tensors; the torch path is torch ops, which dispatch modes such as fastres's op counter see)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (_get_current_dispatch_mode() is not None and backend_for(x) == "triton")):
        return ("an SE / ECA gate fuses in eager inference only (not under torch.compile, "
                "tracing or a dispatch mode)")
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return "an SE / ECA gate fuses in inference only (autograd is recording)"
    return None


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


def _fused_conv(h: Tensor, x: Tensor, launch: Launch, eager_torch: bool,
                residual: Optional[Tensor] = None) -> Tensor:
    """The launch's conv of h, x its shortcut GEMM's input and its residual unless `residual`
    is given."""
    conv = launch.conv
    if launch.residual and residual is None:
        residual = x
    elif not launch.residual:
        residual = None
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
