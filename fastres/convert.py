"""fastres.optimize(model) / fastres.restore(model): swap fused modules into existing models.

Blocks are found by structure, not class name: a module whose children include conv1/bn1/conv2/
bn2 (BasicBlock) or also conv3/bn3 (Bottleneck), with an optional `downsample`, is a candidate.
It is fused only if every conv and BN can be folded, the shortcut is an identity or a 1x1
conv + BN, it has no parameters outside those, and - the final word - a probe run shows that its
own forward() computes exactly what a torchvision block computes (on a float64 copy with
randomised weights and statistics, so zero-initialised BNs cannot hide a difference).

Then the model (with fused blocks as leaves) is traced with torch.fx, and every conv -> BN
(-> ReLU) chain whose intermediate results feed nothing else is fused in place: the stem, and
the 1x1 convs inside blocks that were left alone (e.g. timm's resnet50d avg-pool shortcut).
Models that torch.fx cannot trace keep their chains, and the report says so.

Everything happens in place and shares the original tensors; restore() puts the original
modules back (state_dict-identical).
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.fx
from torch import nn

from fastres import reference
from fastres.modules import (FoldedBatchNorm2d, FoldedReLU, FusedBasicBlock, FusedBottleneck,
                             FusedConv2d, FusedConvBNReLU, _FusedBlock, bn_unfusable_reason,
                             conv_unfusable_reason, shortcut_unfusable_reason)

_FASTRES_MODULES = (_FusedBlock, FusedConvBNReLU, FusedConv2d, FoldedBatchNorm2d, FoldedReLU)


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


_reports: "weakref.WeakKeyDictionary[nn.Module, FusionReport]" = weakref.WeakKeyDictionary()


def fusion_report(model: nn.Module) -> Optional[FusionReport]:
    """The report of the last optimize(model) call (None if it was never optimized)."""
    return _reports.get(model)


# ---------------------------------------------------------------------------------------------
# Blocks

_BLOCK_STAGES = {"Bottleneck": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
                 "BasicBlock": ("conv1", "bn1", "conv2", "bn2")}


def block_kind(module: nn.Module) -> Optional[str]:
    """"BasicBlock", "Bottleneck" or None, judged by the module's children (not its class)."""
    if isinstance(module, _FASTRES_MODULES):
        return None
    children = dict(module.named_children())
    for kind, names in _BLOCK_STAGES.items():  # Bottleneck first: it is a superset
        if all(n in children for n in names):
            if kind == "BasicBlock" and "conv3" in children:
                return None
            return kind
    return None


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _block_unfusable_reason(block: nn.Module, kind: str) -> Optional[str]:
    names = _BLOCK_STAGES[kind]
    for conv_name, bn_name in zip(names[::2], names[1::2]):
        conv, bn = getattr(block, conv_name), getattr(block, bn_name)
        reason = conv_unfusable_reason(conv)
        if reason is None:
            reason = bn_unfusable_reason(bn, conv.out_channels)
        if reason:
            return f"{conv_name}/{bn_name}: {reason}"
    ds = getattr(block, "downsample", None)
    if ds is not None:
        reason = shortcut_unfusable_reason(ds)
        if reason:
            return reason if reason.startswith("shortcut") else f"downsample: {reason}"
    if any(True for _ in block.parameters(recurse=False)) or any(True for _ in block.buffers(recurse=False)):
        return "the block has parameters of its own"
    known = set(names) | {"downsample"}
    for name, child in block.named_children():
        if name not in known and _has_state(child):
            return f"extra submodule {name!r} ({type(child).__name__}) with parameters"
    return None


def _probe_mismatch(block: nn.Module, kind: str, training: bool = False) -> Optional[str]:
    """Run the block's own forward and the torchvision formula on a randomised float64 copy, in
    eval mode or (training=True) in train mode, where dropout-like layers and anything else that
    acts only in training would show."""
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(block).to(device="cpu", dtype=torch.float64).train(training)
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
        x = torch.randn(2, probe.conv1.in_channels, 9, 9, generator=gen, dtype=torch.float64)
        formula = reference.bottleneck_reference if kind == "Bottleneck" else reference.basic_block_reference
        try:
            got = probe(x.clone())
            want = formula(probe, x.clone())
        except Exception as exc:  # a forward that cannot even run on the probe is not a block
            return f"forward() failed on a probe input: {type(exc).__name__}: {exc}"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
        return f"forward() does not compute a torchvision {kind} (checked on a probe input)"
    return None


def _convert_blocks(model: nn.Module, report: FusionReport, verify: bool) -> None:
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, _FASTRES_MODULES):
            continue
        for name, child in list(parent.named_children()):
            kind = block_kind(child)
            if kind is None:
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            reason = _block_unfusable_reason(child, kind)
            if reason is None and verify:
                reason = _probe_mismatch(child, kind)
            if reason:
                report.add(path, kind, False, reason)
                continue
            cls = FusedBottleneck if kind == "Bottleneck" else FusedBasicBlock
            fused = cls.from_block(child)
            setattr(parent, name, fused)
            ds = " + downsample" if getattr(child, "downsample", None) is not None else ""
            detail = f"{len(cls._stages)} launches{ds}"
            train_reason = _probe_mismatch(child, kind, training=True) if verify else None
            if train_reason:
                fused.__dict__["_train_probe_reason"] = train_reason
            train_reason = fused.train_fallback_reason
            if train_reason:
                detail += f"; train mode runs unfused: {train_reason}"
            report.add(path, kind, True, detail)


# ---------------------------------------------------------------------------------------------
# conv -> bn (-> relu) chains

class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _FASTRES_MODULES) or super().is_leaf_module(m, qualname)


def _is_relu_call(node: torch.fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _convert_chains(model: nn.Module, report: FusionReport) -> None:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:
        report.add("", "conv+bn", False, "conv+BN chains outside ResNet blocks were not searched: "
                   f"the model is not torch.fx-traceable ({type(exc).__name__})")
        return
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = model.get_submodule(node.target)
        if type(conv) is not nn.Conv2d or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        if bn_node.op != "call_module" or bn_node.args[0] is not node:
            continue
        bn = model.get_submodule(bn_node.target)
        if type(bn) is not nn.BatchNorm2d:
            continue
        kind = "conv+bn"
        relu_node = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
        fuse_relu = relu_node is not None and _is_relu_call(relu_node, model)
        if fuse_relu:
            kind = "conv+bn+relu"
        if calls[node.target] > 1 or calls[bn_node.target] > 1:
            report.add(node.target, kind, False, "the conv or BN module is called more than once")
            continue
        reason = conv_unfusable_reason(conv) or bn_unfusable_reason(bn, conv.out_channels)
        if reason:
            report.add(node.target, kind, False, reason)
            continue
        # The conv follows the train/eval flag of the BN module that is in the model from now on
        # (the folded one), never of the replaced original; BN and ReLU become identities.
        folded_bn = FoldedBatchNorm2d.from_bn(bn)
        _set(model, bn_node.target, folded_bn)
        _set(model, node.target, FusedConv2d.from_conv(conv, folded_bn, fuse_relu))
        detail = f"BN {bn_node.target} folded"
        if fuse_relu and relu_node.op == "call_module" and calls[relu_node.target] == 1:
            relu = model.get_submodule(relu_node.target)
            _set(model, relu_node.target, FoldedReLU.from_relu(relu))
            detail += f", ReLU {relu_node.target} fused"
        elif fuse_relu:
            detail += ", ReLU applied in the kernel (the ReLU op also stays: it is shared)"
        report.add(node.target, kind, True, detail)


def _set(model: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, module)


# ---------------------------------------------------------------------------------------------
# Public API

def optimize(model: nn.Module, *, blocks: bool = True, chains: bool = True, verify: bool = True,
             verbose: bool = False) -> nn.Module:
    """Swap fused modules into `model` in place and return it.

    blocks: fuse BasicBlock/Bottleneck-shaped blocks (found by structure).
    chains: fuse conv -> BN (-> ReLU) chains elsewhere (the stem), found with torch.fx.
    verify: probe each candidate block on a float64 copy before fusing it (recommended).
    The report (fastres.fusion_report(model)) lists what was fused and what was left alone, and
    why. Works in either train or eval mode: fused modules run fused kernels only when their
    BatchNorms are in eval mode.
    """
    if isinstance(model, _FASTRES_MODULES):
        raise ValueError("optimize(): pass the model that contains the blocks, not a fastres module")
    report = FusionReport()
    if blocks:
        _convert_blocks(model, report, verify)
    if chains:
        _convert_chains(model, report)
    _reports[model] = report
    if verbose:
        print(report)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo optimize(): put the original modules back, in place; return the model."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _FusedBlock) and child._original is not None:
                original = child._original
                original._modules.update(child._modules)
                original.training = child.training
                setattr(parent, name, original)
            elif isinstance(child, (FusedConv2d, FoldedBatchNorm2d, FoldedReLU)):
                original = child.__dict__["_fastres_original"]
                original.training = child.training
                setattr(parent, name, original)
    _reports.pop(model, None)
    return model


def refresh(model: nn.Module) -> None:
    """Drop every cached folded weight in `model`. Only needed after editing parameters through
    `.data` in place, which PyTorch's version counters (and so fastres's cache) cannot see."""
    for m in model.modules():
        caches = []
        if isinstance(m, _FusedBlock):
            caches = list(m._fold_caches.values())
        elif isinstance(m, (FusedConvBNReLU,)):
            caches = [m._fold_cache]
        elif isinstance(m, FusedConv2d):
            caches = [m.__dict__["_fold_cache"]]
        for c in caches:
            c.clear()
