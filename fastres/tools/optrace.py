"""Deterministic performance facts that need no timing: kernel launches and bytes moved.

`trace_ops(fn)` runs fn under a TorchDispatchMode and records every op that does work - the
CPU's stand-in for a kernel launch - with the bytes it reads and writes:
  * an op whose outputs all alias its inputs (a view, a reshape or .to() that did not copy) moved
    nothing and is not recorded; in-place ops are (they rewrite their argument);
  * allocations (empty, empty_strided, ...) launch nothing and are not recorded;
  * the mode is off while an op runs, so fastres::conv_bn_act is recorded once, like the one
    kernel it launches on a GPU, whatever it runs inside;
  * bytes read = every distinct tensor argument once; bytes written = every output (for an
    in-place op, the rewritten argument). This is the minimum traffic of each op taken alone:
    exactly the quantity fusion reduces, and independent of caches and timing.
The perf-regression gate (benchmarks/gate.py) compares these numbers with committed expectations, so a
change that unfuses something or adds traffic fails CI on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}


@dataclass
class OpRecord:
    name: str
    bytes_read: int
    bytes_written: int


@dataclass
class OpTrace:
    ops: List[OpRecord] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def bytes_moved(self) -> int:
        return sum(op.bytes_read + op.bytes_written for op in self.ops)

    def by_op(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        return counts


def _tensors(tree) -> List[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def _nbytes(tensors: List[Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _Tracer(TorchDispatchMode):
    def __init__(self, trace: OpTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _ALLOCATIONS:
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        in_storages = {t.untyped_storage().data_ptr() for t in inputs}
        aliases_only = all(t.untyped_storage().data_ptr() in in_storages for t in outputs)
        if func._schema.is_mutable or not aliases_only:
            self.trace.ops.append(OpRecord(f"{func.namespace}.{name}", _nbytes(inputs), _nbytes(outputs)))
        return out


def trace_ops(fn: Callable[[], object]) -> OpTrace:
    """Run fn() once (under inference_mode) and return the ops it ran that do work."""
    trace = OpTrace()
    with torch.inference_mode(), _Tracer(trace):
        fn()
    return trace
