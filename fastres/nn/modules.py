"""Drop-in conv + BN (+ ReLU) modules.

* FusedConvBNReLU: an nn.Sequential(conv, bn[, relu]) whose state_dict keys (0.*, 1.*) match
  torchvision's Conv2dNormActivation and any user Sequential(conv, bn, relu).
* FusedConv2d / FoldedBatchNorm2d / FoldedReLU: what fastres.optimize() makes, in place, of a
  conv -> bn -> relu chain whose modules are separate attributes of a parent (the ResNet stem):
  the same objects with their classes swapped (attributes, hooks, isinstance and identity are
  kept; restore() swaps back). While the chain is fused the conv computes relu?(bn(conv(x)))
  and the BN and ReLU pass their input through; whenever a module-level reason forbids fusing
  (a hook or parametrization on any of the three, global hooks, TorchScript tracing in train
  mode, a conv or BN the kernels do not take; under torch.fx tracing each records a call of
  itself), each of the three runs its own original computation instead, so hooks see exactly
  the tensors they saw before optimize().

What a call runs is decided by fastres.nn.plan; the ResNet blocks are in fastres.nn.blocks.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch.fx
from torch import Tensor, nn

from fastres import activations
from fastres.nn.anatomy import (
    bn_unfusable_reason,
    chain_reason,
    conv_unfusable_reason,
    hooks_reason,
    original_class,
    sequential_reason,
)
from fastres.nn.folding import FoldCache
from fastres.nn.plan import plan, run


def script_error(self) -> None:
    raise RuntimeError(
        f"fastres: torch.jit.script cannot compile {type(self).__name__} (fastres's fused modules "
        "choose their path in Python on every call). Call fastres.restore(model) before "
        "scripting, or use torch.jit.trace, torch.export or torch.compile on the optimized model.")


def drop_fastres_state(m: nn.Module) -> None:
    for k in [k for k in m.__dict__ if k.startswith("_fastres_")]:
        del m.__dict__[k]


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

    _fastres_unit = "sequential"

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

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why the eval forward runs the unfused modules whatever the input (None: it fuses)."""
        return sequential_reason(self, train=False)

    @property
    def train_fallback_reason(self) -> Optional[str]:
        """Why a train-mode forward runs the unfused modules whatever the input (None: fused)."""
        return sequential_reason(self, train=True)

    def forward(self, *args, **kwargs) -> Tensor:
        return run(self, plan(self, args, kwargs), args, kwargs)

    def _fastres_unfused(self, *args, **kwargs) -> Tensor:
        return nn.Sequential.forward(self, *args, **kwargs)

    __prepare_scriptable__ = script_error


# ---------------------------------------------------------------------------------------------
# conv -> bn -> relu chain whose modules are attributes of a parent (the ResNet stem)

class FusedConv2d(nn.Conv2d):
    """An nn.Conv2d that also applies the BatchNorm after it and optionally the activation after
    that: folded in eval mode, with batch statistics (fastres::block_train) in train mode for
    ReLU or none. Made by fastres.optimize() from the conv itself (its class swapped, see
    above)."""

    _fastres_unit = "chain"
    _fastres_chain_head = True  # (fastres.nn.anatomy.chain_reason checks the exact class)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module],
                  function_act: Optional[Tuple[str, float]] = None) -> "FusedConv2d":
        """Swap conv, bn (an nn.BatchNorm2d, or timm's BatchNormAct2d, whose own act the kernel
        applies) and act (the activation module after them, if it is called only there) in
        place. function_act: an idempotent activation (ReLU, ReLU6) the graph applies by a
        function or a shared module, which the kernel applies too (the op stays)."""
        conv.__class__ = cls
        conv.__dict__.update(_fastres_bn=bn, _fastres_act=act, _fastres_function_act=function_act,
                             _fastres_fold_cache=FoldCache())
        bn.__class__ = folded_class(type(bn))
        bn.__dict__["_fastres_conv"] = conv
        if act is not None:
            act.__class__ = folded_class(type(act))
            act.__dict__["_fastres_conv"] = conv
        return conv

    @property
    def fallback_reason(self) -> Optional[str]:
        return chain_reason(self)

    def forward(self, x: Tensor) -> Tensor:
        return run(self, plan(self, (x,), {}), (x,), {})

    def _fastres_unfused(self, x: Tensor) -> Tensor:
        return nn.Conv2d.forward(self, x)  # the BN and activation run themselves

    def _fastres_reference(self, x: Tensor) -> Tensor:
        """conv -> BN (-> activation) by the unfused modules' own code, with the BN's
        bookkeeping in train mode (running statistics, num_batches_tracked); the BN and
        activation modules pass this through."""
        d = self.__dict__
        bn, act = d["_fastres_bn"], d["_fastres_act"]
        out = original_class(bn).forward(bn, nn.Conv2d.forward(self, x))  # (a BatchNormAct2d's act too)
        if act is not None:
            return original_class(act).forward(act, out)
        if d["_fastres_function_act"] is not None:
            return activations.apply(out, *d["_fastres_function_act"])
        return out

    __prepare_scriptable__ = script_error


def _fx_leaf_or(module: nn.Module, x, own_forward):
    """Under torch.fx tracing (torchvision's create_feature_extractor, symbolic_trace), record
    a call of the module itself, as fx records the nn.BatchNorm2d/ReLU it stands for: the graph
    keeps the original node names, and the module decides fused or not when it runs. Otherwise
    its own forward while the chain is not fused, and the identity while it is."""
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_module", x.tracer.path_of_module(module), (x,), {})
    if chain_reason(module.__dict__["_fastres_conv"]):
        return own_forward(module, x)
    return x


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d fused into the FusedConv2d before it: an identity while the chain is fused
    (the conv applies it: folded in eval mode, with batch statistics in train mode), itself
    otherwise."""

    _fastres_folded = True
    _fastres_original_class = nn.BatchNorm2d

    def forward(self, x: Tensor) -> Tensor:
        return _fx_leaf_or(self, x, nn.BatchNorm2d.forward)

    __prepare_scriptable__ = script_error


class FoldedReLU(nn.ReLU):
    """A ReLU fused into the FusedConv2d before it: an identity while the chain is fused."""

    _fastres_folded = True
    _fastres_original_class = nn.ReLU

    def forward(self, x: Tensor) -> Tensor:
        return _fx_leaf_or(self, x, nn.ReLU.forward)

    __prepare_scriptable__ = script_error


class _Folded:
    """What the folded class of any other module (an activation, timm's BatchNormAct2d) adds to
    it: the identity while the chain is fused, its own forward otherwise (as FoldedReLU)."""

    def forward(self, x: Tensor) -> Tensor:
        return _fx_leaf_or(self, x, type(self)._fastres_original_class.forward)

    def __reduce_ex__(self, protocol):
        # Made at run time, the class cannot be found by name: pickle (and deepcopy) rebuild it
        # from the original class, which can.
        return (_rebuild_folded, (type(self)._fastres_original_class,), self.__dict__.copy())

    __prepare_scriptable__ = script_error


_folded_classes: Dict[type, type] = {nn.BatchNorm2d: FoldedBatchNorm2d, nn.ReLU: FoldedReLU}


def folded_class(original: type) -> type:
    """The class a module of class `original` gets when it is folded into a FusedConv2d: a
    subclass of it (isinstance, attributes and state_dict keys stay)."""
    cls = _folded_classes.get(original)
    if cls is None:
        cls = type(f"Folded{original.__name__}", (_Folded, original),
                   {"_fastres_folded": True, "_fastres_original_class": original,
                    "__module__": original.__module__, "__qualname__": f"Folded{original.__qualname__}"})
        _folded_classes[original] = cls
    return cls


def _rebuild_folded(original: type) -> nn.Module:
    return nn.Module.__new__(folded_class(original))


def unswap_chain_module(m: nn.Module) -> None:
    """Undo FusedConv2d.from_conv for one of its modules."""
    m.__class__ = nn.Conv2d if isinstance(m, FusedConv2d) else original_class(m)
    drop_fastres_state(m)


def is_folded(m: nn.Module) -> bool:
    """Whether m is a module fastres folded into a FusedConv2d (a BN or an activation)."""
    return bool(getattr(type(m), "_fastres_folded", False))
