"""Drop-in modules that run fused kernels.

* FusedConvBNReLU: an nn.Sequential(conv, bn[, relu]) whose state_dict keys (0.*, 1.*) match
  torchvision's Conv2dNormActivation and any user Sequential(conv, bn, relu).
* FusedBasicBlock / FusedBottleneck: the torchvision blocks (same constructor, same child names,
  so state_dicts load both ways with strict=True); eval forward = 2 / 3 kernel launches, the
  downsample conv1x1+BN (if any) reduced into the last conv's accumulator.
* What fastres.optimize() does to existing modules, in place (the same objects, whose class is
  swapped, so attributes, hooks, isinstance and identity are all kept; restore() swaps back):
  - a block of class B becomes a `FusedB`, a subclass of both B and FusedBasicBlock /
    FusedBottleneck (fused_block_class); whenever the fused path does not apply, B.forward runs;
  - a conv -> bn -> relu chain whose modules are separate attributes of a parent (the ResNet
    stem): the conv becomes a FusedConv2d that applies BN and ReLU, the BN a FoldedBatchNorm2d
    and the ReLU a FoldedReLU, which pass their input through while the chain is fused.

Which path runs is decided on every call:
* the unfused modules (exactly the original computation) whenever a fused kernel could not keep
  the original's behaviour: a hook or parametrization on a module the kernel replaces, global
  module hooks, torch.fx tracing, TorchScript tracing in train mode, a call with other arguments
  than one tensor, a non-4-D input (nn.BatchNorm2d's own error then), a conv/BN/child the
  kernels do not take, and for probed (unknown) block forwards, children or plain attributes
  that differ from the ones optimize() probed;
* otherwise the BatchNorms' own `training` flags: all in eval -> the folded path (differentiable:
  with autograd recording the BN is folded afresh and gradients reach the conv and BN
  parameters, so frozen-BN training runs fused); all in train mode -> fastres::block_train
  (fastres.training) where the kernels run (CUDA, or the CPU under TRITON_INTERPRET), else the
  unfused modules; a mix -> the unfused modules.
Under autocast, inputs and conv weights are cast to the autocast dtype as eager convolutions
cast them; BN parameters and running statistics stay in their own dtype. Within the fused
path, dtypes other than float32/float16/bfloat16 (float64) run the reference computation.
Input that is simply wrong (mismatched dtypes or devices, wrong residual shape) raises a clear
error instead.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fastres import reference
from fastres.anatomy import (KnownForward, attributes_changed, block_modules_reason,
                             bn_train_unfusable_reason, bn_unfusable_reason, conv_padding,
                             conv_unfusable_reason, global_hooks_registered, hooks_reason,
                             known_forward_reason, structure_changed, submodule_hooks_reason)
from fastres.folding import FoldCache, conv_bn_sources, fold_modules, invalidate_all
from fastres.ops import (SUPPORTED_DTYPES, backend_for, conv_bn_act, execution_plan,
                         torch_conv_bn_act)
from fastres.training import block_train, chain_train


# ---------------------------------------------------------------------------------------------
# Per call: what the input and the context allow

def _kernels_train(x: Tensor) -> bool:
    """Whether the fused training op runs for x: the Triton kernels on x's device (CUDA, or the
    CPU under TRITON_INTERPRET) and a dtype they take."""
    return _fallback_reason(x) is None and backend_for(x) == "triton"


def _fallback_reason(x: Tensor) -> Optional[str]:
    """Why this call cannot take the fused path (None: it can)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (the kernel supports float32, float16, bfloat16)"
    return None


def _call_reason(args: tuple, kwargs: dict, training: bool) -> Optional[str]:
    """Why this call must run the unfused modules, whatever the modules are (None: it may fuse)."""
    if kwargs or len(args) != 1:
        return "called with other arguments than one input tensor"
    x = args[0]
    if not isinstance(x, Tensor):
        return "input is not a tensor (torch.fx tracing: the unfused modules are traced)"
    if x.dim() != 4:
        return f"{x.dim()}-D input (nn.BatchNorm2d takes 4-D input only)"
    if training and torch.jit.is_tracing():
        return "TorchScript tracing in train mode traces the unfused modules"
    if global_hooks_registered():
        return "global module hooks are registered"
    return None


def _note_training() -> None:
    """A BN ran (or is about to run) in train mode: its running statistics change in place
    without a version bump, so every cached fold must be recomputed."""
    if not torch.compiler.is_compiling():
        invalidate_all()


def _fused_conv_bn(x: Tensor, conv: nn.Conv2d, folded: Tuple[Tensor, Tensor], relu: bool,
                   eager_torch: bool, residual: Optional[Tensor] = None, shortcut=None,
                   bias: Optional[Tensor] = None):
    weight, shift = folded
    bias = shift if bias is None else bias
    if eager_torch:
        # The module already checked dtypes and devices and never needs autograd here.
        x2, w2, s2 = shortcut if shortcut is not None else (None, None, None)
        return torch_conv_bn_act(x, weight, bias, residual, x2, w2, conv.stride,
                                 conv_padding(conv), conv.dilation, s2, relu)
    return conv_bn_act(x, weight, bias, stride=conv.stride, padding=conv_padding(conv),
                       dilation=conv.dilation, residual=residual, shortcut=shortcut, relu=relu)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype eager convolutions would compute x in under an active autocast (None: no
    autocast for x's device, or x is float64, which autocast leaves alone)."""
    if (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _prepare_input(x: Tensor, named_convs) -> Tensor:
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


def _fold(cache: FoldCache, conv: nn.Conv2d, bn: nn.BatchNorm2d, fmt: torch.memory_format,
          dtype: torch.dtype):
    return cache.get(conv_bn_sources(conv, bn), (bn.eps, fmt, dtype),
                     lambda: fold_modules(conv, bn, fmt, dtype))


def _script_error(self) -> None:
    raise RuntimeError(
        f"fastres: torch.jit.script cannot compile {type(self).__name__} (fastres's fused modules "
        "choose their path in Python on every call). Call fastres.restore(model) before "
        "scripting, or use torch.jit.trace, torch.export or torch.compile on the optimized model.")


# ---------------------------------------------------------------------------------------------
# conv + BN (+ ReLU) as a Sequential

class FusedConvBNReLU(nn.Sequential):
    """conv2d + BatchNorm2d (+ ReLU) in one kernel launch in eval mode.

    Same children (0: Conv2d, 1: BatchNorm2d, 2: ReLU) and hence the same state_dict keys as
    torchvision.ops.Conv2dNormActivation and nn.Sequential(conv, bn, relu).

        block = FusedConvBNReLU(64, 128, kernel_size=3, stride=2).eval()
        y = block(x)                       # one fused launch on CUDA
        block = FusedConvBNReLU.from_modules(conv, bn, relu=True)   # wrap existing modules
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, bias: bool = False,
                 relu: bool = True, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                            bias=bias, device=device, dtype=dtype),
                  nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self._fold_cache = FoldCache()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> "FusedConvBNReLU":
        """Wrap existing modules (shared, not copied). Raises ValueError if they cannot fuse."""
        reason = (conv_unfusable_reason(conv) or bn_unfusable_reason(bn, conv.out_channels)
                  or hooks_reason(conv) or hooks_reason(bn))
        if reason:
            raise ValueError(f"FusedConvBNReLU.from_modules: {reason}")
        self = cls.__new__(cls)
        layers = [conv, bn] + ([nn.ReLU(inplace=True)] if relu else [])
        nn.Sequential.__init__(self, *layers)
        self._fold_cache = FoldCache()
        return self

    def __getitem__(self, idx):
        # nn.Sequential slices by calling type(self)(OrderedDict); a slice of a fused module is
        # just a plain Sequential of the same (shared) children.
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def _modules_reason(self, bn_reason) -> Optional[str]:
        conv, bn = self[0], self[1]
        if len(self) > 3 or (len(self) == 3 and type(self[2]) is not nn.ReLU):
            return "the Sequential holds other modules than conv, BN and an nn.ReLU"
        for m in self:
            reason = hooks_reason(m)
            if reason:
                return reason
        return conv_unfusable_reason(conv) or bn_reason(bn, conv.out_channels)

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why the eval forward runs the unfused modules whatever the input (None: it fuses)."""
        return self._modules_reason(bn_unfusable_reason)

    @property
    def train_fallback_reason(self) -> Optional[str]:
        """Why a train-mode forward runs the unfused modules whatever the input (None: fused)."""
        return self._modules_reason(bn_train_unfusable_reason)

    def forward(self, *args, **kwargs) -> Tensor:
        conv, bn, relu = self[0], self[1], len(self) > 2
        if bn.training:
            _note_training()
            if (_call_reason(args, kwargs, True) or self.train_fallback_reason
                    or not _kernels_train(args[0])):
                return super().forward(*args, **kwargs)
            return chain_train(conv, bn, relu, _prepare_input(args[0], [("0", conv)]))
        if (_call_reason(args, kwargs, False) or self.fallback_reason
                or _fallback_reason(args[0])):
            return super().forward(*args, **kwargs)
        x = _prepare_input(args[0], [("0", conv)])
        eager_torch, fmt = execution_plan(x)
        return _fused_conv_bn(x, conv, _fold(self._fold_cache, conv, bn, fmt, x.dtype), relu,
                              eager_torch)

    __prepare_scriptable__ = _script_error


# ---------------------------------------------------------------------------------------------
# conv -> bn -> relu chain whose modules are attributes of a parent (the ResNet stem)
#
# optimize() swaps the classes of the three modules in place. While the chain is fused, the
# conv computes relu?(bn(conv(x))) and the BN and ReLU pass their input through; whenever a
# module-level reason forbids fusing (a hook or parametrization on any of the three, global
# hooks, TorchScript tracing in train mode, a conv or BN the kernels do not take; under torch.fx
# tracing each records a call of itself), each of the three runs its own
# original computation instead, so hooks see exactly the tensors they saw before optimize().

def _chain_modules_reason(conv: "FusedConv2d") -> Optional[str]:
    """Why the chain that `conv` heads runs as three plain modules right now (None: fused)."""
    d = conv.__dict__
    bn, relu = d["_fastres_bn"], d["_fastres_relu"]
    if bn.training and torch.jit.is_tracing():
        return "TorchScript tracing in train mode traces the unfused modules"
    if type(bn) is not FoldedBatchNorm2d or (relu is not None and type(relu) is not FoldedReLU):
        return "the BN or ReLU was replaced or changed class"
    for m in (conv, bn, relu):
        if m is not None:
            reason = hooks_reason(m)
            if reason:
                return reason
    if global_hooks_registered():
        return "global module hooks are registered"
    bn_reason = bn_train_unfusable_reason if bn.training else bn_unfusable_reason
    return (conv_unfusable_reason(conv, FusedConv2d)
            or bn_reason(bn, conv.out_channels, (FoldedBatchNorm2d,)))


def _fx_leaf(module: nn.Module, x: "torch.fx.Proxy"):
    """Under torch.fx tracing (torchvision's create_feature_extractor, symbolic_trace), record
    a call of the module itself, as fx records the nn.Conv2d/BatchNorm2d/ReLU it stands for:
    the graph keeps the original node names, and the module decides fused or not when it runs."""
    return x.tracer.create_proxy("call_module", x.tracer.path_of_module(module), (x,), {})


class FusedConv2d(nn.Conv2d):
    """An nn.Conv2d that also applies the BatchNorm after it and optionally the following ReLU:
    folded in eval mode, with batch statistics (fastres.training.chain_train) in train mode.
    Made by fastres.optimize() from the conv itself (its class swapped, see above)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: Optional[nn.ReLU],
                  fuse_relu: bool) -> "FusedConv2d":
        """Swap conv, bn (and relu, the ReLU module after them, if it is called only there)
        in place; fuse_relu: apply a ReLU in the kernel (a functional or shared one stays)."""
        conv.__class__ = cls
        conv.__dict__.update(_fastres_bn=bn, _fastres_relu=relu, _fastres_fuse_relu=fuse_relu,
                             _fastres_fold_cache=FoldCache())
        bn.__class__ = FoldedBatchNorm2d
        bn.__dict__["_fastres_conv"] = conv
        if relu is not None:
            relu.__class__ = FoldedReLU
            relu.__dict__["_fastres_conv"] = conv
        return conv

    @property
    def fallback_reason(self) -> Optional[str]:
        return _chain_modules_reason(self)

    def forward(self, x: Tensor) -> Tensor:
        d = self.__dict__
        bn, fuse_relu = d["_fastres_bn"], d["_fastres_fuse_relu"]
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if bn.training:
            _note_training()
        if _chain_modules_reason(self):
            return nn.Conv2d.forward(self, x)  # the BN and ReLU run themselves
        if x.dim() != 4:  # the BN this conv stands for would refuse it
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if bn.training:
            if not _kernels_train(x):
                # Exactly the unfused modules: nn.BatchNorm2d's own train-mode forward
                # (running statistics, num_batches_tracked), then the ReLU.
                out = nn.BatchNorm2d.forward(bn, nn.Conv2d.forward(self, x))
                return F.relu(out) if fuse_relu else out
            return chain_train(self, bn, fuse_relu, _prepare_input(x, [("conv", self)]))
        if _fallback_reason(x):
            out = F.batch_norm(nn.Conv2d.forward(self, x), bn.running_mean, bn.running_var,
                               bn.weight, bn.bias, False, 0.0, bn.eps)
            return F.relu(out) if fuse_relu else out
        x = _prepare_input(x, [("conv", self)])
        eager_torch, fmt = execution_plan(x)
        folded = _fold(d["_fastres_fold_cache"], self, bn, fmt, x.dtype)
        return _fused_conv_bn(x, self, folded, fuse_relu, eager_torch)

    __prepare_scriptable__ = _script_error


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d fused into the FusedConv2d before it: an identity while the chain is fused
    (the conv applies it: folded in eval mode, with batch statistics in train mode), itself
    otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if _chain_modules_reason(self.__dict__["_fastres_conv"]):
            return nn.BatchNorm2d.forward(self, x)
        return x

    __prepare_scriptable__ = _script_error


class FoldedReLU(nn.ReLU):
    """A ReLU fused into the FusedConv2d before it: an identity while the chain is fused."""

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if _chain_modules_reason(self.__dict__["_fastres_conv"]):
            return nn.ReLU.forward(self, x)
        return x

    __prepare_scriptable__ = _script_error


_CHAIN_ORIGINALS = {FusedConv2d: nn.Conv2d, FoldedBatchNorm2d: nn.BatchNorm2d, FoldedReLU: nn.ReLU}


def _drop_fastres_state(m: nn.Module) -> None:
    for k in [k for k in m.__dict__ if k.startswith("_fastres_")]:
        del m.__dict__[k]


def unswap_chain_module(m: nn.Module) -> None:
    """Undo FusedConv2d.from_conv for one of the three modules."""
    m.__class__ = _CHAIN_ORIGINALS[type(m)]
    _drop_fastres_state(m)


# ---------------------------------------------------------------------------------------------
# ResNet blocks

def _conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class _FusedBlock(nn.Module):
    """The fused forward of a ResNet block, shared by FusedBasicBlock/FusedBottleneck and the
    classes optimize() swaps into existing blocks. Per-instance state lives in `_fastres_*`
    entries of the instance dict (not registered: the state_dict is the original's):
      _fastres_caches   a FoldCache per stage (and "last" for the last conv + shortcut)
      _fastres_spec     the KnownForward of the block's own forward, or None when probed
      _fastres_probed   for probed forwards: (submodules, plain attributes) as probed
      _fastres_train_probe_reason   why the train-mode probe failed (None: it passed)
    """

    _fastres_stages: Tuple[str, ...] = ()
    _fastres_reference: Callable = None  # the torchvision formula of the kind
    _fastres_original_class: Optional[type] = None  # set on classes made by fused_block_class

    def _fastres_init(self, spec: Optional[KnownForward], probed=None,
                      train_probe_reason: Optional[str] = None) -> None:
        d = self.__dict__
        d["_fastres_caches"] = {name: FoldCache() for name in self._fastres_stages + ("last",)}
        d["_fastres_spec"] = spec
        d["_fastres_probed"] = probed
        d["_fastres_train_probe_reason"] = train_probe_reason

    def _fastres_pairs(self) -> Optional[List[Tuple[nn.Module, nn.Module]]]:
        """(conv, bn) of each stage, then of the downsample if any; None when the children no
        longer have that shape (a stage removed, the downsample replaced by a lone module).
        Reads the child dict directly: nn.Module.__getattr__ is slow enough to matter on small
        inputs."""
        mods = self._modules
        try:
            pairs = [(mods[name], mods["bn" + name[-1]]) for name in self._fastres_stages]
            ds = mods.get("downsample")
            if ds is not None:
                pairs.append((ds[-2], ds[-1]))  # after any leading nn.Identity
        except (KeyError, TypeError, IndexError):
            return None
        return None if any(m is None for pair in pairs for m in pair) else pairs

    def _fastres_modules_reason(self, train: bool, call: bool = False) -> Optional[str]:
        """Why the block runs its own (unfused) forward whatever the input, for a call with
        every BN in train mode (train=True) or in eval mode (None: it fuses). call: judge the
        modules' current train/eval flags too (on a call; the properties describe the modes)."""
        d = self.__dict__
        if "_fastres_caches" not in d:
            return "made without fastres's set-up (e.g. by calling its class directly)"
        reason = block_modules_reason(self, self._fastres_stages,
                                      bn_train_unfusable_reason if train else bn_unfusable_reason)
        if reason:
            return reason
        reason = submodule_hooks_reason(self)
        if reason:
            return reason
        spec = d["_fastres_spec"]
        if spec is not None:
            # On a call the children's own flags decide; the properties assume the mode.
            return known_forward_reason(self, spec, None if call else train)
        probed = d["_fastres_probed"]
        if probed is None:
            return "its forward is neither known to fastres nor probed"
        reason = structure_changed(self, probed[0]) or attributes_changed(self, probed[1])
        if reason:
            return reason
        # A probed forward was checked with every module in one mode.
        if call and any(m.training != train for m in self.modules()):
            return f"not every submodule is in {'train' if train else 'eval'} mode (probed that way)"
        if train:
            return d["_fastres_train_probe_reason"]
        return None

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why the eval forward runs the unfused block whatever the input (None: it fuses)."""
        return self._fastres_modules_reason(False)

    @property
    def train_fallback_reason(self) -> Optional[str]:
        """Why the train-mode forward runs the unfused block whatever the input (None: fused
        where the kernels run)."""
        return self._fastres_modules_reason(True)

    def _fastres_unfused(self, *args, **kwargs):
        original = type(self)._fastres_original_class
        if original is not None:
            return original.forward(self, *args, **kwargs)
        return type(self)._fastres_reference(self, *args, **kwargs)

    def forward(self, *args, **kwargs) -> Tensor:
        pairs = self._fastres_pairs() if "_fastres_caches" in self.__dict__ else None
        training = [bn.training for _, bn in pairs or ()]
        train = any(training)
        if train:
            _note_training()
        if (not pairs or _call_reason(args, kwargs, train) or (train and not all(training))
                or self._fastres_modules_reason(train, call=True)):
            return self._fastres_unfused(*args, **kwargs)
        x = args[0]
        fusable = _kernels_train(x) if train else _fallback_reason(x) is None
        if not fusable:  # float64, or train mode where the kernels do not run
            return self._fastres_unfused(x)
        x = _prepare_input(x, [(name, conv) for name, (conv, _) in
                               zip(self._fastres_stages + ("downsample",), pairs)])
        if train:
            return block_train(self, x)
        eager_torch, fmt = execution_plan(x)  # the intermediates are on x's device and layout
        dtype = x.dtype
        caches = self.__dict__["_fastres_caches"]
        n = len(self._fastres_stages)
        out = x
        # Every stage but the last: conv + folded BN + ReLU.
        for name, (conv, bn) in zip(self._fastres_stages[:-1], pairs[:n - 1]):
            out = _fused_conv_bn(out, conv, _fold(caches[name], conv, bn, fmt, dtype), True,
                                 eager_torch)
        # Last stage: conv + folded BN + shortcut + ReLU in one launch.
        last, last_bn = pairs[n - 1]
        if len(pairs) == n:
            return _fused_conv_bn(out, last, _fold(caches["last"], last, last_bn, fmt, dtype),
                                  True, eager_torch, residual=x)
        ds_conv, ds_bn = pairs[n]
        w, w2, bias = caches["last"].get(
            conv_bn_sources(last, last_bn) + conv_bn_sources(ds_conv, ds_bn),
            (last_bn.eps, ds_bn.eps, fmt, dtype),
            lambda: self._fastres_fold_with_shortcut(last, last_bn, ds_conv, ds_bn, fmt, dtype))
        return _fused_conv_bn(out, last, (w, None), True, eager_torch,
                              shortcut=(x, w2, ds_conv.stride), bias=bias)

    @staticmethod
    def _fastres_fold_with_shortcut(conv, bn, ds_conv, ds_bn, fmt, dtype):
        w, b = fold_modules(conv, bn, fmt, dtype)
        w2, b2 = fold_modules(ds_conv, ds_bn, fmt, dtype)
        return w, w2, b + b2

    @classmethod
    def from_block(cls, block: nn.Module, trust: tuple = ()) -> nn.Module:
        """Fuse an existing block (torchvision, timm or user) in place and return it: the same
        object, its class swapped for one that is also a subclass of its own (see
        fused_block_class). Raises ValueError (and changes nothing) if it cannot be fused.
        Forwards fastres does not know are probed first (fastres.anatomy); `trust` lists block
        classes whose forward the caller vouches for instead."""
        from fastres.convert import fuse_block  # convert builds on this module
        if isinstance(block, cls):
            return block  # already fused
        reason = fuse_block(block, trust=trust)
        if reason:
            raise ValueError(f"{cls.__name__}.from_block: {reason}")
        return block

    def __reduce_ex__(self, protocol):
        original = type(self)._fastres_original_class
        if original is None:
            return super().__reduce_ex__(protocol)
        # The swapped class is made at run time and cannot be found by name: pickle (and
        # deepcopy) rebuild it from the user's class, which can.
        return (_rebuild_fused_block, (original, self._fastres_stages[-1] == "conv3"),
                self.__dict__.copy())

    __prepare_scriptable__ = _script_error


_fused_classes: Dict[Tuple[type, bool], type] = {}


def fused_block_class(original: type, bottleneck: bool) -> type:
    """The class optimize() gives a block of class `original`: a subclass of FusedBasicBlock or
    FusedBottleneck (the fused forward) and of `original` (isinstance checks, methods). Where
    both define a name - other than forward and fastres's own - the original's wins
    (its __init__, `expansion`, ...)."""
    key = (original, bottleneck)
    cls = _fused_classes.get(key)
    if cls is None:
        base = FusedBottleneck if bottleneck else FusedBasicBlock
        ours = {n for c in base.__mro__ if c not in nn.Module.__mro__ for n in vars(c)}
        theirs = {n for c in original.__mro__ if c not in nn.Module.__mro__ for n in vars(c)}
        keep = {"forward", "fallback_reason", "train_fallback_reason", "from_block",
                "__reduce_ex__", "__prepare_scriptable__"}
        shadowed = {n for n in ours & theirs if n not in keep and not n.startswith("_fastres")
                    and (n == "__init__" or not (n.startswith("__") and n.endswith("__")))}
        namespace = {n: inspect.getattr_static(original, n) for n in shadowed}
        namespace.update(_fastres_original_class=original, __module__=original.__module__,
                         __qualname__=f"Fused{original.__qualname__}")
        cls = type(f"Fused{original.__name__}", (base, original), namespace)
        _fused_classes[key] = cls
    return cls


def _rebuild_fused_block(original: type, bottleneck: bool) -> nn.Module:
    return nn.Module.__new__(fused_block_class(original, bottleneck))


def unswap_block(block: _FusedBlock) -> None:
    """Undo from_block: the block's own class back, fastres's entries gone."""
    block.__class__ = type(block)._fastres_original_class
    _drop_fastres_state(block)


class FusedBasicBlock(_FusedBlock):
    """torchvision's BasicBlock (same constructor and child names); eval forward = 2 launches:
    conv1+bn1+relu, then conv2+bn2 (+ downsample conv1x1+bn as a second GEMM) + residual + relu."""

    expansion = 1
    _fastres_reference = reference.basic_block_reference
    _fastres_stages = ("conv1", "conv2")

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._fastres_init(_OWN_FORWARD)


class FusedBottleneck(_FusedBlock):
    """torchvision's Bottleneck (v1.5, stride on the 3x3; same constructor and child names);
    eval forward = 3 launches, the downsample fused into the last one."""

    expansion = 4
    _fastres_reference = reference.bottleneck_reference
    _fastres_stages = ("conv1", "conv2", "conv3")

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._fastres_init(_OWN_FORWARD)


# fastres's own blocks: their unfused forward is the formula itself, through the children.
_OWN_FORWARD = KnownForward("fastres")
