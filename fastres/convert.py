"""fastres.optimize(model) / fastres.restore(model): fuse existing models in place.

Blocks are found by structure, not class name: a module whose children include conv1/bn1/conv2/
bn2 (BasicBlock) or also conv3/bn3 (Bottleneck), with an optional `downsample`, is a candidate.
It is fused only if every conv and BN can be folded, the shortcut is an identity or a 1x1
conv + BN, no module inside it has hooks or parametrizations, and its forward is one fastres
knows (torchvision's, timm's, or one the caller trusts) or passes the probe (fastres.nn.anatomy).
Any other module (not a container) with convs inside, and a named block left alone, is traced
with torch.fx: if its output is act(f(x) + s(x)) it is a residual block (fastres.nn.residual),
fused in eval mode when f and s are chains of conv -> BN (-> activation) stages, pools and SE /
ECA gates and a probe agrees, else reported with the reason.

Then the model (fused BasicBlock/Bottleneck blocks and hooked modules as leaves; residual blocks
of other shapes traced through, for their train mode) is traced with torch.fx, and every
conv -> BN (-> activation) chain whose intermediate results feed nothing else is fused in
place: the stem, and the convs inside blocks that were left alone. Models that torch.fx cannot
trace keep their chains, and the report says so.

Fusing swaps the class of the existing module objects (fastres.nn.modules, fastres.nn.blocks);
nothing is copied or replaced, and restore() swaps the classes back.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import nn

from fastres import activations
from fastres.nn.anatomy import (
    BLOCK_STAGES,
    block_kind,
    bn_act_reason,
    bn_train_unfusable_reason,
    bn_unfusable_reason,
    conv_unfusable_reason,
    function_activation,
    global_hooks_registered,
    grouped_train_reason,
    hooks_reason,
    is_bn_act,
    submodule_hooks_reason,
)
from fastres.nn.blocks import (
    FusedBlockBase,
    FusedResidualBase,
    fuse_block,
    fuse_residual,
    residual_detail,
    unswap_block,
)
from fastres.nn.modules import (
    FusedConv2d,
    FusedConvBNReLU,
    is_folded,
    unswap_chain_module,
)
from fastres.nn.plan import TRAIN_ACTIVATIONS

_FASTRES_MODULES = (FusedBlockBase, FusedConvBNReLU, FusedConv2d)


def _is_fastres(m: nn.Module) -> bool:
    return isinstance(m, _FASTRES_MODULES) or is_folded(m)


@dataclass
class FusionEntry:
    path: str
    kind: str          # "BasicBlock", "Bottleneck", "conv+bn+relu", "conv+bn"
    fused: bool
    detail: str = ""


@dataclass
class FusionReport:
    entries: List[FusionEntry] = field(default_factory=list)

    def add(self, path, kind, fused, detail=""):
        self.entries.append(FusionEntry(path or "<model>", kind, fused, detail))

    def find(self, path: str) -> FusionEntry:
        return next(e for e in self.entries if e.path == path)

    @property
    def fused(self) -> List[FusionEntry]:
        return [e for e in self.entries if e.fused]

    @property
    def left_alone(self) -> List[FusionEntry]:
        return [e for e in self.entries if not e.fused]

    def summary(self) -> str:
        counts = {}
        for e in self.fused:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        parts = [f"{n} {k}" for k, n in counts.items()]
        return (f"fused: {', '.join(parts) if parts else 'nothing'}; "
                f"left alone: {len(self.left_alone)}")

    def __str__(self) -> str:
        lines = [self.summary()]
        for e in self.entries:
            status = "fused     " if e.fused else "left alone"
            lines.append(f"  {status}  {e.kind:<13} {e.path}" + (f"  ({e.detail})" if e.detail else ""))
        return "\n".join(lines)


def fusion_report(model: nn.Module) -> Optional[FusionReport]:
    """What optimize(model) fused and left alone (None if it was never optimized). The report
    lives on the model, so copies (deepcopy, pickling, torch.save/load) keep it."""
    return model.__dict__.get("_fastres_report")


# ---------------------------------------------------------------------------------------------
# Blocks

def _convert_blocks(model: nn.Module, report: FusionReport, verify: bool, trust: tuple) -> None:
    done = {}  # id(block) -> path, for blocks reachable under several names
    inside = set()  # the modules inside residual blocks (not candidates themselves)
    for parent_name, parent in list(model.named_modules()):
        if _is_fastres(parent) or id(parent) in inside:
            continue
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            if id(child) in done:
                if done[id(child)] != path:
                    first = report.find(done[id(child)])
                    report.add(path, first.kind, first.fused,
                               f"the same module as {first.path}" + (f": {first.detail}" if first.detail else ""))
                continue
            if _is_fastres(child):
                continue
            kind = block_kind(child)
            reason = None
            if kind is not None:
                done[id(child)] = path
                reason = fuse_block(child, verify, trust)
                if reason is None:
                    ds = " + downsample" if getattr(child, "downsample", None) is not None else ""
                    detail = f"{len(BLOCK_STAGES[kind])} launches{ds}"
                    train_reason = child.train_fallback_reason
                    if train_reason:
                        detail += f"; train mode runs unfused: {train_reason}"
                    report.add(path, kind, True, detail)
                    continue
            if _may_be_residual(child):
                # Residual blocks of any other shape, read from their traced forward
                candidate, residual_reason = fuse_residual(child, verify)
                if candidate:
                    done[id(child)] = path
                    inside.update(id(m) for m in child.modules())
                    if residual_reason is None:
                        report.add(path, "residual", True, residual_detail(child))
                        continue
                    if kind is None:
                        report.add(path, "residual", False, residual_reason)
                        continue
            if kind is not None:
                report.add(path, kind, False, reason)


def _may_be_residual(m: nn.Module) -> bool:
    """Whether m is worth tracing as a residual block: a module of its own (not a container,
    conv or BN) with convs inside."""
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv2d,
                      nn.modules.batchnorm._BatchNorm)) or not m._modules:
        return False
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


# ---------------------------------------------------------------------------------------------
# conv -> bn (-> relu) chains

class _LeafTracer(torch.fx.Tracer):
    """Fused modules are leaves, and so is any module with hooks: torch.fx would otherwise call
    it, firing user hooks on proxies (optimize() never runs user hooks). timm's BatchNormAct2d
    is a leaf too: a BN with its activation, one node the chain search can fold."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # (a fused residual block is traced through: its conv -> BN chains fuse as chains too,
        # for its train mode, which runs its own forward)
        return ((_is_fastres(m) and not isinstance(m, FusedResidualBase))
                or hooks_reason(m) is not None or is_bn_act(m) or _bn_like(m)
                or super().is_leaf_module(m, qualname))


# Activations the graph may apply by a function (or a module shared with other users), which
# then runs anyway: the kernel may apply them too only where doing it twice changes nothing.
_IDEMPOTENT = ("relu", "relu6", "identity")


def _bn_like(m: nn.Module) -> bool:
    """What the chain search takes for a BN after a conv (and reports, if it is not one it
    folds): nn.BatchNorm2d and its relatives (SyncBatchNorm is a _BatchNorm too), and
    torchvision's FrozenBatchNorm2d, which is not one (looked up only if torchvision is loaded)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    frozen = getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)
    return frozen is not None and isinstance(m, frozen)


def _chain_kind(activation: Optional[Tuple[str, float]]) -> str:
    return "conv+bn" if activation is None or activation[0] == "identity" else f"conv+bn+{activation[0]}"


def _convert_chains(model: nn.Module, report: FusionReport) -> None:
    if global_hooks_registered():
        report.add("", "conv+bn", False, "conv+BN chains outside ResNet blocks were not searched: "
                   "global module hooks are registered (torch.fx would fire them)")
        return
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:
        report.add("", "conv+bn", False, "conv+BN chains outside ResNet blocks were not searched: "
                   f"the model is not torch.fx-traceable ({type(exc).__name__})")
        return
    calls = {}  # per module object: a module reachable under two names is still one module
    for node in graph.nodes:
        if node.op == "call_module":
            key = id(model.get_submodule(node.target))
            calls[key] = calls.get(key, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = model.get_submodule(node.target)
        if not isinstance(conv, nn.Conv2d) or _is_fastres(conv):
            continue
        bn_nodes = [u for u in node.users if u.op == "call_module"
                    and _bn_like(model.get_submodule(u.target))]
        if not bn_nodes:
            continue
        # Every conv -> BN pair is reported, fused or not: nothing is skipped silently.
        if len(node.users) != 1:
            report.add(node.target, "conv+bn", False, "the conv's output is used by more than its BN")
            continue
        bn_node = bn_nodes[0]
        if bn_node.args[0] is not node or len(bn_node.args) != 1 or bn_node.kwargs:
            report.add(node.target, "conv+bn", False, "the BN is called with more than the conv's output")
            continue
        bn = model.get_submodule(bn_node.target)
        bn_act = is_bn_act(bn)
        if type(conv) is not nn.Conv2d or (type(bn) is not nn.BatchNorm2d and not bn_act):
            report.add(node.target, "conv+bn", False,
                       conv_unfusable_reason(conv) or f"{type(bn).__name__} is not a plain nn.BatchNorm2d "
                       "or timm's BatchNormAct2d")
            continue
        act = function_act = None
        if bn_act:
            activation = activations.of_module(bn.act)
            detail_act = f"its act ({type(bn.act).__name__}) fused"
        else:
            activation, detail_act = None, ""
            act_node = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
            if act_node is not None and act_node.args and act_node.args[0] is bn_node:
                if act_node.op == "call_module":
                    module = model.get_submodule(act_node.target)
                    activation = activations.of_module(module) if len(act_node.args) == 1 else None
                    if activation is not None and calls[id(module)] == 1:
                        act, detail_act = module, f"{type(module).__name__} {act_node.target} fused"
                else:
                    activation = function_activation(act_node)
                if activation is not None and act is None:
                    if activation[0] in _IDEMPOTENT:
                        function_act = activation
                        detail_act = (f"{activation[0]} applied in the kernel (the op also stays: "
                                      "it is a function or a shared module)")
                    else:
                        activation = None  # it runs after the chain, unfused
        kind = _chain_kind(activation)
        if calls[id(conv)] > 1 or calls[id(bn)] > 1:
            report.add(node.target, kind, False, "the conv or BN module is called more than once")
            continue
        reason = (conv_unfusable_reason(conv)
                  or bn_unfusable_reason(bn, conv.out_channels, (type(bn),))
                  or hooks_reason(conv) or hooks_reason(bn) or (act is not None and hooks_reason(act))
                  or (bn_act and (submodule_hooks_reason(bn) or bn_act_reason(bn))))
        if reason:
            report.add(node.target, kind, False, reason)
            continue
        detail = f"{type(bn).__name__} {bn_node.target} folded" + (f", {detail_act}" if detail_act else "")
        FusedConv2d.from_conv(conv, bn, act, function_act)
        train_reason = bn_train_unfusable_reason(bn, conv.out_channels, (type(bn),))
        if not train_reason and activation is not None and activation[0] not in TRAIN_ACTIVATIONS:
            train_reason = f"{activation[0]} is fused in eval mode only"
        train_reason = train_reason or grouped_train_reason(conv)
        detail += f"; train mode runs unfused: {train_reason}" if train_reason else "; trains fused"
        report.add(node.target, kind, True, detail)


# ---------------------------------------------------------------------------------------------
# Public API

def _check_report(model: nn.Module, report: FusionReport) -> None:
    """Make every "fused" entry true: the module at its path is a fastres module that fuses now.
    (A module can change between optimize() calls, or be rewritten by a later pass.)"""
    for e in report.fused:
        try:
            m = model.get_submodule("" if e.path == "<model>" else e.path)
        except AttributeError:
            e.fused, e.detail = False, "no longer in the model"
            continue
        if not isinstance(m, (FusedBlockBase, FusedConv2d)):
            e.fused, e.detail = False, f"no longer fused: it is a {type(m).__name__}"
            continue
        reason = m.fallback_reason
        if reason:
            e.fused, e.detail = False, f"runs unfused: {reason}"


def optimize(model: nn.Module, *, blocks: bool = True, chains: bool = True, verify: bool = True,
             trust: tuple = (), verbose: bool = False) -> nn.Module:
    """Fuse `model`'s ResNet blocks and conv -> BN (-> ReLU) chains in place; return the model.

    blocks: fuse BasicBlock/Bottleneck-shaped blocks (found by structure).
    chains: fuse conv -> BN (-> ReLU) chains elsewhere (the stem), found with torch.fx.
    verify: probe blocks whose forward fastres does not know on a float64 copy before fusing
        them (without it, only torchvision's, timm's and trusted blocks are fused).
    trust: block classes whose forward you vouch computes torchvision's formula from its
        children: fused without a probe.
    The modules stay the same objects (their classes swapped; restore() swaps back), so hooks,
    attributes, isinstance, pickling and state_dict keys are kept. optimize() never runs user
    hooks, and leaves alone modules whose hooks or parametrizations a kernel would bypass.
    The report (fastres.fusion_report(model)) lists what was fused, what was left alone, and
    why; calling optimize() again adds to it. Works in train or eval mode.
    """
    if _is_fastres(model):
        raise ValueError("optimize(): pass the model that contains the blocks, not a fastres module")
    previous = fusion_report(model)
    report = FusionReport()
    if previous is not None:
        report.entries = [e for e in previous.entries if e.fused]
    if blocks:
        _convert_blocks(model, report, verify, tuple(trust))
    if chains:
        _convert_chains(model, report)
    _check_report(model, report)
    model.__dict__["_fastres_report"] = report
    if verbose:
        print(report)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo optimize(): every swapped module gets its own class back, in place; return the
    model (state_dict, hooks and attributes as they are now)."""
    for m in list(model.modules()):
        if isinstance(m, FusedBlockBase) and type(m)._fastres_original_class is not None:
            unswap_block(m)
        elif isinstance(m, FusedConv2d) or is_folded(m):
            unswap_chain_module(m)
    model.__dict__.pop("_fastres_report", None)
    return model


def refresh(model: nn.Module) -> None:
    """Drop every cached folded weight in `model`. Needed only after writes that PyTorch's
    version counters do not see and no optimizer step or train-mode forward followed: in-place
    edits through `param.data`, foreign kernels, a DDP buffer broadcast of values changed on
    another rank outside training (see fastres.nn.folding)."""
    for m in model.modules():
        caches = []
        if isinstance(m, FusedBlockBase):
            caches = list(m.__dict__.get("_fastres_caches", {}).values())
        elif isinstance(m, FusedConvBNReLU):
            caches = [m._fold_cache]
        elif isinstance(m, FusedConv2d):
            caches = [m.__dict__["_fastres_fold_cache"]]
        for c in caches:
            c.clear()
