"""Fused ResNet blocks: FusedBasicBlock / FusedBottleneck (torchvision's constructors and child
names, so state_dicts load both ways with strict=True) and what fastres.optimize() makes of an
existing block.

* eval forward = 2 / 3 kernel launches, the downsample conv1x1+BN (if any) reduced into the last
  conv's accumulator; train mode = fastres::block_train; what a call runs is decided by
  fastres.nn.plan, from the rules in fastres.nn.anatomy.
* fuse_block(block): in place, a block of class B becomes a `FusedB`, a subclass of both B and
  FusedBasicBlock / FusedBottleneck (fused_block_class), so attributes, hooks, isinstance and
  identity are kept; whenever the fused path does not apply, B.forward runs. unswap_block()
  swaps back.
Under autocast, inputs and conv weights are cast to the autocast dtype as eager convolutions
cast them; BN parameters and running statistics stay in their own dtype. Input that is simply
wrong (mismatched dtypes or devices) raises a clear error.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fastres import reference
from fastres.nn.anatomy import (
    BLOCK_STAGES,
    KnownForward,
    attribute_snapshot,
    block_kind,
    block_modules_reason,
    block_pairs,
    block_reason,
    global_hooks_registered,
    known_forward,
    known_forward_reason,
    module_structure,
    probe_reason,
    submodule_hooks_reason,
)
from fastres.nn.folding import FoldCache
from fastres.nn.modules import (
    FusedConv2d,
    FusedConvBNReLU,
    drop_fastres_state,
    is_folded,
    script_error,
)
from fastres.nn.plan import plan, run
from fastres.nn.residual import (
    NotResidual,
    Residual,
    Stage,
    Unfusable,
    dual_gemm_shortcut,
    find_residual,
    launches,
    ops_reason,
    probe_residual,
    residual_block_reason,
)
from fastres.ops.block_train import DOWNSAMPLE, IDENTITY, run_train_op


def _conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class FusedBlockBase(nn.Module):
    """The fused forward of a ResNet block, shared by FusedBasicBlock/FusedBottleneck and the
    classes optimize() swaps into existing blocks. Per-instance state lives in `_fastres_*`
    entries of the instance dict (not registered: the state_dict is the original's):
      _fastres_caches   a FoldCache per stage (and "last" for the last conv + shortcut)
      _fastres_spec     the KnownForward of the block's own forward, or None when probed
      _fastres_probed   for probed forwards: (submodules, plain attributes) as probed
      _fastres_train_probe_reason   why the train-mode probe failed (None: it passed)
    """

    _fastres_unit = "block"
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

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why the eval forward runs the unfused block whatever the input (None: it fuses)."""
        return block_reason(self, train=False)

    @property
    def train_fallback_reason(self) -> Optional[str]:
        """Why the train-mode forward runs the unfused block whatever the input (None: fused
        where the kernels run)."""
        return block_reason(self, train=True)

    def _fastres_unfused(self, *args, **kwargs):
        original = type(self)._fastres_original_class
        if original is not None:
            return original.forward(self, *args, **kwargs)
        return type(self)._fastres_reference(self, *args, **kwargs)

    def forward(self, *args, **kwargs) -> Tensor:
        return run(self, plan(self, args, kwargs), args, kwargs)

    @classmethod
    def from_block(cls, block: nn.Module, trust: tuple = ()) -> nn.Module:
        """Fuse an existing block (torchvision, timm or user) in place and return it: the same
        object, its class swapped for one that is also a subclass of its own (see
        fused_block_class). Raises ValueError (and changes nothing) if it cannot be fused.
        Forwards fastres does not know are probed first (fastres.nn.anatomy); `trust` lists block
        classes whose forward the caller vouches for instead."""
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

    __prepare_scriptable__ = script_error


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


def unswap_block(block: FusedBlockBase) -> None:
    """Undo from_block: the block's own class back, fastres's entries gone."""
    block.__class__ = type(block)._fastres_original_class
    drop_fastres_state(block)


class FusedBasicBlock(FusedBlockBase):
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


class FusedBottleneck(FusedBlockBase):
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

# ---------------------------------------------------------------------------------------------
# Fusing an existing block in place

def _is_fastres_module(m: nn.Module) -> bool:
    return isinstance(m, (FusedBlockBase, FusedConvBNReLU, FusedConv2d)) or is_folded(m)


def _block_unfusable_reason(block: nn.Module, kind: str) -> Optional[str]:
    """What keeps `block` from being fused whatever its forward computes (None: nothing)."""
    if "forward" in block.__dict__:
        return "forward is overridden on the instance"
    reason = block_modules_reason(block, BLOCK_STAGES[kind])
    if reason:
        return reason
    if any(True for _ in block.parameters(recurse=False)) or any(True for _ in block.buffers(recurse=False)):
        return "the block has parameters of its own"
    return submodule_hooks_reason(block)


def _extra_state_reason(block: nn.Module, kind: str) -> Optional[str]:
    """For probed forwards: a child with parameters outside the stages and the shortcut is one
    the probe cannot vouch for (its weights may make it matter only later)."""
    known = {n for s in BLOCK_STAGES[kind] for n in (s, "bn" + s[-1])} | {"downsample"}
    for name, child in block.named_children():
        if name not in known and (any(True for _ in child.parameters())
                                  or any(True for _ in child.buffers())):
            return f"extra submodule {name!r} ({type(child).__name__}) with parameters"
    return None


def fuse_block(block: nn.Module, verify: bool = True, trust: tuple = ()) -> Optional[str]:
    """Fuse one block in place (swap its class, see fused_block_class); return why it was left
    alone instead (None: fused). Changes nothing when it returns a reason."""
    if _is_fastres_module(block):
        return "already a fastres module"
    kind = block_kind(block)
    if kind is None:
        return "not a ResNet block: needs children conv1/bn1/conv2/bn2[/conv3/bn3]"
    reason = _block_unfusable_reason(block, kind)
    if reason:
        return reason
    spec = known_forward(type(block), trust)
    probed = train_reason = None
    if spec is not None:
        reason = known_forward_reason(block, spec, training=False)  # fusable in eval mode
        if reason:
            return f"{spec.source}: {reason}"
    elif not verify:
        return "its forward is not one fastres knows, and verify=False skips the probe"
    else:
        reason = _extra_state_reason(block, kind)
        if reason is None and global_hooks_registered():
            reason = ("global module hooks are registered: fastres does not run them on its "
                      "probe (torchvision/timm blocks need no probe)")
        if reason is None:
            reason = probe_reason(block, kind, training=False)
        if reason:
            return reason
        train_reason = probe_reason(block, kind, training=True)
        probed = (module_structure(block), attribute_snapshot(block))
    block.__class__ = fused_block_class(type(block), kind == "Bottleneck")
    block._fastres_init(spec, probed, train_reason)
    return None


# ---------------------------------------------------------------------------------------------
# Residual blocks of any other shape (fastres.nn.residual)

class FusedResidualBase(FusedBlockBase):
    """The fused forward of a residual block read by fastres.nn.residual: in eval mode one
    launch per conv stage (the shortcut's last 1x1 conv as the second GEMM of f's last), the
    add and the activation in the last launch's epilogue. Per-instance state (instance dict):
      _fastres_residual  the Residual structure
      _fastres_caches    a FoldCache per stage conv (and "last" for the last conv + shortcut)
      _fastres_probed    (submodules, plain attributes) as traced and probed
    """

    _fastres_unit = "residual"

    def _fastres_init_residual(self, residual: Residual, probed) -> None:
        d = self.__dict__
        ops = residual.prefix + residual.branch + residual.shortcut + tuple(
            op for term in residual.extra for op in term)
        convs = [op.conv for op in ops if isinstance(op, Stage)]
        d["_fastres_residual"] = residual
        d["_fastres_caches"] = {name: FoldCache() for name in convs + ["last"]}
        d["_fastres_probed"] = probed
        d["_fastres_spec"] = None

    @property
    def fallback_reason(self) -> Optional[str]:
        return residual_block_reason(self, train=False)

    @property
    def train_fallback_reason(self) -> Optional[str]:
        return residual_block_reason(self, train=True)

    def _fastres_unfused(self, *args, **kwargs):
        return type(self)._fastres_original_class.forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # (the gates' torch.fx modules are rebuilt from a fresh trace: residual.gate_modules)
        state = {k: v for k, v in self.__dict__.items() if k != "_fastres_traced"}
        return (_rebuild_fused_residual, (type(self)._fastres_original_class,), state)


_fused_residual_classes: Dict[type, type] = {}


def fused_residual_class(original: type) -> type:
    """The class a residual block of class `original` gets: a subclass of FusedResidualBase
    (the fused forward) and of `original`, whose own names win except forward and fastres's."""
    cls = _fused_residual_classes.get(original)
    if cls is None:
        keep = {"forward", "fallback_reason", "train_fallback_reason", "from_block",
                "__reduce_ex__", "__prepare_scriptable__"}
        ours = {n for c in FusedResidualBase.__mro__ if c not in nn.Module.__mro__ for n in vars(c)}
        theirs = {n for c in original.__mro__ if c not in nn.Module.__mro__ for n in vars(c)}
        shadowed = {n for n in ours & theirs if n not in keep and not n.startswith("_fastres")
                    and (n == "__init__" or not (n.startswith("__") and n.endswith("__")))}
        namespace = {n: inspect.getattr_static(original, n) for n in shadowed}
        namespace.update(_fastres_original_class=original, __module__=original.__module__,
                         __qualname__=f"Fused{original.__qualname__}")
        cls = type(f"Fused{original.__name__}", (FusedResidualBase, original), namespace)
        _fused_residual_classes[original] = cls
    return cls


def _rebuild_fused_residual(original: type) -> nn.Module:
    return nn.Module.__new__(fused_residual_class(original))


def fuse_residual(block: nn.Module, verify: bool = True) -> Tuple[bool, Optional[str]]:
    """Fuse a residual block of any shape in place (fastres.nn.residual). Returns (candidate,
    reason): candidate = whether block is a residual block at all; reason = why it was left
    alone (None: fused). Changes nothing unless it fuses."""
    if _is_fastres_module(block):
        return False, None
    try:
        residual = find_residual(block)
    except NotResidual:
        return False, None
    except Unfusable as exc:
        return True, str(exc)
    if "forward" in block.__dict__:
        return True, "forward is overridden on the instance"
    reason = submodule_hooks_reason(block)
    if reason:
        return True, reason
    if not verify:
        return True, "its forward is not one fastres knows, and verify=False skips the probe"
    if global_hooks_registered():
        return True, ("global module hooks are registered: fastres does not run them on its "
                      "probe")
    reason = ops_reason(block, residual, training=False) or probe_residual(block, residual)
    if reason:
        return True, reason
    probed = (module_structure(block), attribute_snapshot(block))
    block.__class__ = fused_residual_class(type(block))
    block._fastres_init_residual(residual, probed)
    return True, None


def residual_detail(block: FusedResidualBase) -> str:
    """The report's line for a fused residual block."""
    r = block.__dict__["_fastres_residual"]
    dual = dual_gemm_shortcut(block, r)
    n = launches(r, dual)
    detail = f"{n} launch{'es' if n != 1 else ''}: {r.describe()}"
    if dual:
        detail += f" ({r.shortcut[-1].conv} as the second GEMM)"
    return detail + f"; train mode runs unfused: {block.train_fallback_reason}"


# ---------------------------------------------------------------------------------------------
# The training op on a plain (unfused) block

def block_train(block: nn.Module, x: Tensor) -> Tensor:
    """Training-mode forward of a torchvision-style ResNet block (every BN in train mode) through
    fastres::block_train: differentiable with respect to x and every conv/BN parameter; updates
    the BNs' running statistics and num_batches_tracked exactly as the unfused block does.
    Under autocast the convs run in the autocast dtype, as eager's do, with the BN parameters
    and statistics kept in their own (fp32) dtype."""
    kind = block_kind(block)
    pairs = block_pairs(block, BLOCK_STAGES[kind]) if kind else None
    if pairs is None:
        raise ValueError(f"block_train: {type(block).__name__} is not a ResNet block")
    n = len(BLOCK_STAGES[kind])
    return run_train_op([c for c, _ in pairs], [b for _, b in pairs], x,
                        DOWNSAMPLE if len(pairs) > n else IDENTITY, True)


def block_train_forward(block: nn.Module, x: Tensor) -> Tensor:
    """block_train without autograd (under no_grad): the training-mode forward alone."""
    with torch.no_grad():
        return block_train(block, x)
