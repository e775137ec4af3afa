"""The activations a fused conv applies in its epilogue: their names, the torch code they stand
for, and the modules that spell them.

An activation is a name from NAMES plus, for "leaky_relu", its negative slope. The kernel takes
it as its ACTIVATION constexpr (kernels/common.py: `activate`, ACTIVATION_CODES); the torch path
and autograd take the torch functions below, so both compute what the unfused module does.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from fastres.kernels.common import ACTIVATION_CODES

NAMES = tuple(ACTIVATION_CODES)

# A name, a resolved (name, slope) pair, or what relu=True / relu=False meant before
# activations had names.
ActivationArg = Union[bool, str, Tuple[str, float], None]


def resolve(activation: ActivationArg, negative_slope: float = 0.01) -> Tuple[str, float]:
    """(name, slope) for an activation argument: a name from NAMES, a (name, slope) pair, True
    ("relu"), False or None ("identity"). The slope is kept for "leaky_relu" only (0.0
    otherwise, so that equal activations compare equal). Raises ValueError for anything else."""
    if isinstance(activation, tuple):
        return resolve(*activation)
    if activation is True:
        return "relu", 0.0
    if activation is False or activation is None:
        return "identity", 0.0
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"fastres: unknown activation {activation!r}; supported: {', '.join(NAMES)}")
    if activation == "leaky_relu":
        slope = float(negative_slope)
        if slope != slope:
            raise ValueError("fastres: leaky_relu's negative_slope is NaN")
        return activation, slope
    return activation, 0.0


def code(name: str) -> int:
    """The kernel's ACTIVATION constexpr for a resolved name."""
    return ACTIVATION_CODES[name]


def apply(out: Tensor, name: str, slope: float = 0.0, inplace: bool = False) -> Tensor:
    """The activation by torch's own functions (in place on a fresh output where asked: the
    torch path's epilogue; out of place where autograd records it)."""
    if name == "identity":
        return out
    if name == "relu":
        return out.relu_() if inplace else F.relu(out)
    if name == "relu6":
        return F.relu6(out, inplace=inplace)
    if name == "silu":
        return F.silu(out, inplace=inplace)
    if name == "gelu":
        return F.gelu(out)
    if name == "gelu_tanh":
        return F.gelu(out, approximate="tanh")
    if name == "hardswish":
        return F.hardswish(out, inplace=inplace)
    if name == "hardsigmoid":
        return F.hardsigmoid(out, inplace=inplace)
    if name == "leaky_relu":
        return F.leaky_relu(out, slope, inplace=inplace)
    raise ValueError(f"fastres: unknown activation {name!r}")


def of_module(module: Optional[nn.Module]) -> Optional[Tuple[str, float]]:
    """(name, slope) of an activation module whose forward is exactly one of NAMES (the exact
    class: a subclass may override forward; a module fastres folded counts as its original
    class), else None. nn.Identity is "identity"."""
    kind = getattr(type(module), "_fastres_original_class", None) or type(module)
    if kind is nn.ReLU:
        return "relu", 0.0
    if kind is nn.ReLU6:
        return "relu6", 0.0
    if kind is nn.SiLU:
        return "silu", 0.0
    if kind is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if kind is nn.Hardswish:
        return "hardswish", 0.0
    if kind is nn.Hardsigmoid:
        return "hardsigmoid", 0.0
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.Identity:
        return "identity", 0.0
    return None
