"""The GPU a launch is for: its compute capability and the shared memory one program may use.

Normally that is the current CUDA device (or, with none, the H100 the configs were written
for). `compile_only(target)` makes every launch in its scope compile for `target` instead:
`python -m fastres compile-check` uses it on machines without a GPU, where the ops then take
the Triton path for CPU tensors and no launch is timed (no autotuning).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

# Shared memory a block may use (the opt-in maximum), by compute capability x10.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCH = 90  # the H100 / H200, which the configs in conv_configs.json were written for


@dataclass(frozen=True)
class Target:
    arch: int
    shared_memory_limit: int
    compile_only: bool = False

    @classmethod
    def for_arch(cls, arch: int, compile_only: bool = False) -> "Target":
        limit = SHARED_MEMORY_LIMIT.get(arch, SHARED_MEMORY_LIMIT[DEFAULT_ARCH])
        return cls(arch, limit, compile_only)


_detected: list = []
_override: Optional[Target] = None


def current_target() -> Target:
    """The target of launches made now: the compile_only() target in its scope, else the
    current CUDA device (read once), else the default H100."""
    if _override is not None:
        return _override
    if not _detected:
        target = Target.for_arch(DEFAULT_ARCH)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            target = Target(props.major * 10 + props.minor,
                            getattr(props, "shared_memory_per_block_optin",
                                    target.shared_memory_limit))
        _detected.append(target)
    return _detected[0]


def compiling_only() -> bool:
    """Whether launches only compile (inside compile_only())."""
    return _override is not None and _override.compile_only


@contextlib.contextmanager
def compile_only(target: Target) -> Iterator[Target]:
    """Within this scope launches are compiled for `target` and not run (the caller hands
    Triton a driver that launches nothing): configs are chosen and pruned for its shared memory,
    CPU tensors take the Triton path, and the first config of each shape class is used."""
    global _override
    previous = _override
    _override = Target(target.arch, target.shared_memory_limit, compile_only=True)
    try:
        yield _override
    finally:
        _override = previous
