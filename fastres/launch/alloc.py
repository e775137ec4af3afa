"""The one allocator of every tensor a fused op or kernel launch returns.

An output a kernel writes is allocated uninitialised (torch.empty), which is what a real launch
wants and what hides a missed element: leftover memory can look plausible. fastres.testing's
`poisoned_outputs()` makes these allocations start as NaN instead, so an element no kernel wrote
shows up in any comparison.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

_fill: Optional[float] = None


def empty(shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None,
          memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """An output of `shape` on like's device (in `dtype`, default like's)."""
    out = torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device,
                      memory_format=memory_format)
    return out if _fill is None else out.fill_(_fill)


def empty_like(t: Tensor) -> Tensor:
    """An output of t's shape, dtype, device and strides."""
    out = torch.empty_like(t)
    return out if _fill is None else out.fill_(_fill)


@contextlib.contextmanager
def filled_with(value: float) -> Iterator[None]:
    """Within this scope outputs start filled with `value` (see fastres.testing)."""
    global _fill
    previous = _fill
    _fill = value
    try:
        yield
    finally:
        _fill = previous
