"""`python -m fastres coverage MODEL...`: how much of a model optimize() fuses.

For each model (random weights, eval mode, on the CPU): the conv + BN pairs fused out of all
(a pair: a conv whose only user is a BatchNorm2d or timm's BatchNormAct2d, found by torch.fx;
models torch.fx cannot trace count their BN modules instead), the candidate residual blocks
fused out of all (BasicBlock / Bottleneck by their child names, any other module by its traced
forward: fastres.nn.residual), and the ops one forward runs before and after (fastres.tools.optrace: a
fastres::conv_bn_act counts once, like the kernel launch it is on a GPU). The models run the
folded torch path, so this works without a GPU or Triton's interpreter.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import List

import torch
import torch.fx
from torch import nn

# fusion_report() kinds of residual blocks: the ResNet blocks known by their child names, and
# residual blocks of any other shape (fastres.nn.residual)
BLOCK_KINDS = ("BasicBlock", "Bottleneck", "residual")


@dataclass
class Coverage:
    model: str
    pairs: int
    pairs_fused: int
    blocks: int
    blocks_fused: int
    launches_before: int
    launches_after: int
    pairs_counted_by: str  # "fx" or "BN modules"


def build(name: str) -> nn.Module:
    """A model by name, random weights: `tv:NAME` (torchvision), `timm:NAME`, or a bare name,
    looked up in torchvision first, then timm."""
    import torchvision

    source, _, bare = name.rpartition(":")
    if source in ("", "tv") and hasattr(torchvision.models, bare) and bare[0].islower():
        return getattr(torchvision.models, bare)()
    if source in ("", "timm"):
        import timm

        return timm.create_model(bare, pretrained=False)
    raise ValueError(f"unknown model {name!r} (use tv:NAME or timm:NAME)")


def conv_bn_pairs(model: nn.Module):
    """(count, how): the conv -> BN pairs of an unconverted model."""
    from fastres.convert import _LeafTracer

    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: count the BNs
        return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "BN modules"
    count = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module"
                and isinstance(model.get_submodule(users[0].target), nn.BatchNorm2d)):
            count += 1
    return count, "fx"


def fused_pairs(model: nn.Module) -> int:
    """The conv + BN pairs an optimized model runs fused: its chains and its fused BasicBlock /
    Bottleneck blocks' convs (with the downsample's); a residual block of another shape fuses
    its convs as chains too (for its train mode), so they are counted as chains."""
    from fastres.nn.blocks import FusedBlockBase, FusedResidualBase
    from fastres.nn.modules import FusedConv2d

    n = 0
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            n += 1
        elif isinstance(m, FusedBlockBase) and not isinstance(m, FusedResidualBase):
            n += len(m._fastres_stages) + (getattr(m, "downsample", None) is not None)
    return n


def measure(name: str, size: int = 64) -> Coverage:
    import fastres
    from fastres.reference import randomize_batchnorms
    from fastres.tools.optrace import trace_ops

    torch.manual_seed(0)
    model = build(name).eval()
    randomize_batchnorms(model, torch.Generator().manual_seed(1), shift_scale=0.5)
    pairs, how = conv_bn_pairs(model)
    x = torch.randn(1, 3, size, size)
    before = trace_ops(lambda: model(x)).launches
    fused = fastres.optimize(copy.deepcopy(model))
    with torch.no_grad():
        fused(x)  # folds the BNs once (cached): a forward after that is what is counted
    after = trace_ops(lambda: fused(x)).launches
    entries = [e for e in fastres.fusion_report(fused).entries if e.kind in BLOCK_KINDS]
    return Coverage(name, pairs, fused_pairs(fused), len(entries), sum(e.fused for e in entries),
                    before, after, how)


def table(rows: List[Coverage]) -> str:
    lines = ["| model | conv+BN pairs fused | candidate blocks fused | ops per forward: before -> after |",
             "|---|---|---|---|"]
    for r in rows:
        note = "" if r.pairs_counted_by == "fx" else " (BN modules: not fx-traceable)"
        lines.append(f"| {r.model} | {r.pairs_fused}/{r.pairs}{note} | {r.blocks_fused}/{r.blocks} | "
                     f"{r.launches_before} -> {r.launches_after} |")
    if len(rows) > 1:
        pairs, fused = sum(r.pairs for r in rows), sum(r.pairs_fused for r in rows)
        blocks, blocks_fused = sum(r.blocks for r in rows), sum(r.blocks_fused for r in rows)
        lines.append(f"| all {len(rows)} | {fused}/{pairs} ({100 * fused / max(pairs, 1):.1f}%) | "
                     f"{blocks_fused}/{blocks} | {sum(r.launches_before for r in rows)} -> "
                     f"{sum(r.launches_after for r in rows)} |")
    return "\n".join(lines)


def main(models: List[str], size: int) -> int:
    previous = os.environ.get("FASTRES_BACKEND")
    os.environ["FASTRES_BACKEND"] = "torch"  # the folded torch path: fast, no interpreter
    try:
        rows = [measure(name, size) for name in models]
    except ValueError as exc:
        print(f"coverage: {exc}")
        return 2
    finally:
        if previous is None:
            del os.environ["FASTRES_BACKEND"]
        else:
            os.environ["FASTRES_BACKEND"] = previous
    print(table(rows))
    return 0
