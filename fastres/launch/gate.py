"""Host side of the gate kernel (kernels/gate.py): act(y * gate[n, c] (+ residual)), one pass."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from fastres import activations
from fastres.kernels.common import INTERPRETED
from fastres.kernels.gate import gate_act_kernel
from fastres.launch import alloc
from fastres.launch.bn import _layout, same_layout

# Under the interpreter each program costs milliseconds whatever its size, so tiles are large.
GATE_BLOCK = 4096 if INTERPRETED else 1024


def gate_act(y: torch.Tensor, gate: torch.Tensor, residual: Optional[torch.Tensor],
             activation) -> torch.Tensor:
    """act(y * gate[n, c] + residual) into a new tensor of y's dtype and memory format.

    y: (N, C, H, W), NCHW-contiguous or channels_last; gate: (N, C) or (N, C, 1, 1) of any
    float dtype; residual: y's shape (copied into y's memory format first if it is in another)
    or None; activation: anything fastres.activations.resolve takes."""
    act, slope = activations.resolve(activation)
    channels_last = _layout(y)
    N, C, H, W = y.shape
    gate = gate.reshape(N, C).contiguous()
    if residual is not None and not same_layout(residual, y):
        residual = residual.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out = alloc.empty_like(y)
    grid = (triton.cdiv(y.numel(), GATE_BLOCK),)
    gate_act_kernel[grid](y, gate, residual if residual is not None else y, out, y.numel(), C,
                          H * W, slope, HAS_RESIDUAL=residual is not None,
                          ACTIVATION=activations.code(act), CHANNELS_LAST=channels_last,
                          BLOCK=GATE_BLOCK)
    return out
