"""Benchmark cases derived from the torchvision models themselves (never typed in).

Three levels, each case knows its FLOPs and its minimum memory traffic (every input read once,
every output written once) for the roofline:
  layer: every distinct conv of resnet18/resnet50 with the epilogue it has in the model:
         conv+BN+ReLU, or the block's last conv+BN (+ identity residual | + downsample) + ReLU;
  block: every distinct BasicBlock/Bottleneck configuration;
  model: the whole network at a given batch, 3x224x224.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torchvision
from torch import nn

from fastres.nn.anatomy import block_kind

MODEL_NAMES = ("resnet18", "resnet50")
IMAGE = 224


@dataclass(frozen=True)
class LayerCase:
    """One fused convolution: conv(K, C, R x S, stride, padding) + BN, then the epilogue."""
    model: str
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int
    padding: int
    epilogue: str           # "relu" | "residual" (+x, relu) | "shortcut" (+conv1x1+BN of x2, relu)
    C2: int = 0              # shortcut input channels
    H2: int = 0
    stride2: int = 1
    count: int = 1           # how many times the model has this layer

    @property
    def P(self) -> int:
        return (self.H + 2 * self.padding - self.R) // self.stride + 1

    @property
    def Q(self) -> int:
        return (self.W + 2 * self.padding - self.S) // self.stride + 1

    @property
    def name(self) -> str:
        extra = {"relu": "", "residual": " +res", "shortcut": f" +ds{self.C2}s{self.stride2}"}[self.epilogue]
        return (f"{self.model} {self.C}@{self.H}->{self.K} {self.R}x{self.S} s{self.stride}{extra} "
                f"N{self.N}")

    def flops(self) -> float:
        flops = 2.0 * self.N * self.P * self.Q * self.K * self.C * self.R * self.S
        if self.epilogue == "shortcut":
            flops += 2.0 * self.N * self.P * self.Q * self.K * self.C2
        return flops

    def min_bytes(self, elem: int) -> float:
        out = self.N * self.K * self.P * self.Q
        total = self.N * self.C * self.H * self.W + self.K * self.C * self.R * self.S + out
        if self.epilogue == "residual":
            total += out
        if self.epilogue == "shortcut":
            total += self.N * self.C2 * self.H2 * self.H2 + self.K * self.C2
        return elem * total + 4.0 * self.K  # + the fp32 bias

    def with_batch(self, N: int) -> "LayerCase":
        return LayerCase(**{**self.__dict__, "N": N})


class LayerModule(nn.Module):
    """The unfused reference of a LayerCase, as eager PyTorch runs it."""

    def __init__(self, case: LayerCase) -> None:
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(case.C, case.K, (case.R, case.S), case.stride, case.padding, bias=False)
        self.bn = nn.BatchNorm2d(case.K)
        self.downsample = None
        if case.epilogue == "shortcut":
            self.downsample = nn.Sequential(nn.Conv2d(case.C2, case.K, 1, case.stride2, bias=False),
                                            nn.BatchNorm2d(case.K))

    def forward(self, x, extra=None):
        y = self.bn(self.conv(x))
        if self.case.epilogue == "residual":
            y = y + extra
        elif self.case.epilogue == "shortcut":
            y = y + self.downsample(extra)
        return torch.relu(y)

    def make_inputs(self, dtype, device, memory_format) -> Tuple[torch.Tensor, ...]:
        c = self.case
        x = torch.randn(c.N, c.C, c.H, c.W, dtype=dtype, device=device)
        inputs = [x]
        if c.epilogue == "residual":
            inputs.append(torch.randn(c.N, c.K, c.P, c.Q, dtype=dtype, device=device))
        elif c.epilogue == "shortcut":
            inputs.append(torch.randn(c.N, c.C2, c.H2, c.H2, dtype=dtype, device=device))
        return tuple(t.contiguous(memory_format=memory_format) for t in inputs)


@dataclass(frozen=True)
class BlockCase:
    model: str
    path: str              # the first block of the model with this configuration
    kind: str
    N: int
    C: int
    H: int
    W: int
    count: int = 1

    @property
    def name(self) -> str:
        return f"{self.model} {self.kind} {self.path} {self.C}@{self.H} N{self.N}"


@dataclass(frozen=True)
class ModelCase:
    model: str
    N: int

    @property
    def name(self) -> str:
        return f"{self.model} N{self.N}"


def _trace_model(name: str):
    """One CPU forward of the model at batch 1 with hooks: every conv's input shape and every
    block's input shape, in execution order."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    conv_inputs: Dict[str, Tuple[int, ...]] = {}
    block_inputs: Dict[str, Tuple[int, ...]] = {}
    hooks = []

    def recorder(store, path):
        def hook(module, args):  # returns None: the input goes on unchanged
            store.setdefault(path, tuple(args[0].shape))
        return hook

    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(recorder(conv_inputs, path)))
        elif block_kind(m):
            hooks.append(m.register_forward_pre_hook(recorder(block_inputs, path)))
    with torch.no_grad():
        model(torch.randn(1, 3, IMAGE, IMAGE))
    for h in hooks:
        h.remove()
    return model, conv_inputs, block_inputs


def layer_cases(name: str, batch: int) -> List[LayerCase]:
    """Distinct fused convolutions of the model, each with its epilogue; count = occurrences."""
    model, conv_inputs, block_inputs = _trace_model(name)
    found: Dict[LayerCase, int] = {}
    for path in conv_inputs:
        conv = model.get_submodule(path)
        parent_path, _, leaf = path.rpartition(".")
        if parent_path.endswith("downsample"):
            continue  # reduced into the block's last conv (the "shortcut" epilogue)
        parent = model.get_submodule(parent_path) if parent_path else model
        kind = block_kind(parent)
        last = {"BasicBlock": "conv2", "Bottleneck": "conv3"}.get(kind)
        _, C, H, W = conv_inputs[path]
        epilogue, C2, H2, stride2 = "relu", 0, 0, 1
        if leaf == last:
            if parent.downsample is None:
                epilogue = "residual"
            else:
                epilogue = "shortcut"
                ds_conv = parent.downsample[0]
                _, C2, H2, _ = block_inputs[parent_path]
                stride2 = ds_conv.stride[0]
        case = LayerCase(name, batch, C, H, W, conv.out_channels, conv.kernel_size[0],
                         conv.kernel_size[1], conv.stride[0], conv.padding[0], epilogue, C2, H2, stride2)
        found[case] = found.get(case, 0) + 1
    return [LayerCase(**{**c.__dict__, "count": n}) for c, n in found.items()]


def block_cases(name: str, batch: int) -> List[BlockCase]:
    model, _, block_inputs = _trace_model(name)
    found: Dict[tuple, BlockCase] = {}
    counts: Dict[tuple, int] = {}
    for path, shape in block_inputs.items():
        block = model.get_submodule(path)
        key = (block_kind(block), shape, block.conv1.out_channels, block.stride,
               block.downsample is not None)
        counts[key] = counts.get(key, 0) + 1
        found.setdefault(key, BlockCase(name, path, key[0], batch, shape[1], shape[2], shape[3]))
    return [BlockCase(**{**c.__dict__, "count": counts[k]}) for k, c in found.items()]


def build_block(case: BlockCase) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(case.model, weights=None).eval()
    return copy.deepcopy(model.get_submodule(case.path))


def build_model(case: ModelCase) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(case.model, weights=None).eval()


def block_flops_bytes(case: BlockCase, elem: int) -> Tuple[float, float]:
    """FLOPs and minimum traffic of a fused block: the sum over its fused convolutions."""
    flops = traffic = 0.0
    for layer in _block_layers(case):
        flops += layer.flops()
        traffic += layer.min_bytes(elem)
    return flops, traffic


def _block_layers(case: BlockCase) -> List[LayerCase]:
    block = build_block(case)
    kind = case.kind
    names = ["conv1", "conv2"] + (["conv3"] if kind == "Bottleneck" else [])
    layers, H, C = [], case.H, case.C
    for i, n in enumerate(names):
        conv = getattr(block, n)
        last = i == len(names) - 1
        epilogue, C2, H2, s2 = "relu", 0, 0, 1
        if last:
            epilogue = "residual" if block.downsample is None else "shortcut"
            if block.downsample is not None:
                C2, H2, s2 = case.C, case.H, block.downsample[0].stride[0]
        layer = LayerCase(case.model, case.N, C, H, H, conv.out_channels, conv.kernel_size[0],
                          conv.kernel_size[1], conv.stride[0], conv.padding[0], epilogue, C2, H2, s2)
        layers.append(layer)
        H, C = layer.P, conv.out_channels
    return layers


def model_flops_bytes(case: ModelCase, elem: int) -> Tuple[float, float]:
    """FLOPs and minimum traffic of the fused convolutions of the whole model (pooling and the
    classifier are small and left out)."""
    flops = traffic = 0.0
    for layer in layer_cases(case.model, case.N):
        flops += layer.count * layer.flops()
        traffic += layer.count * layer.min_bytes(elem)
    return flops, traffic


def rotation_sets(bytes_per_set: float, cache_bytes: float, cap: int = 32) -> int:
    """How many input sets to cycle through so that no timed call finds its inputs in cache."""
    return max(2, min(cap, math.ceil(2 * cache_bytes / max(bytes_per_set, 1.0))))


def dtype_elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
