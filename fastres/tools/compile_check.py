"""Compile every Triton kernel variant fastres launches for an NVIDIA GPU, on a machine without one.

    python -m fastres compile-check [--arch 90] [--quick]

Triton's JIT is handed a driver that reports the target GPU (sm_90, the H100, by default) and
launches nothing, and every `kernel[grid](...)` call is turned into a warm-up: it compiles, down
to a cubin with Triton's bundled ptxas, exactly the specialization a real launch with those
arguments would (signature, constexpr options, config), then returns. fastres's own code paths
then run on small CPU tensors with the backend forced to "triton": eval-mode blocks, the stem,
and training steps (forward and backward), in each dtype and memory format, plus every config of
kernels/conv_configs.json for its problem class. Nothing executes, so the numbers those paths
produce are meaningless; only the compilation is checked, and each kernel's shared memory
against the target's per-block limit.

It catches what Triton's interpreter cannot: tl.dot's shape and dtype rules, constexpr and type
errors in branches the interpreter treats loosely, and configs that overflow shared memory.
What it cannot catch: wrong results, register spills (known only when a binary is loaded) and
speed - those need the GPU.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

# Shared memory a block may use (the opt-in maximum), by compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class CompileReport:
    arch: int
    kernels: Dict[str, Dict[str, int]] = field(default_factory=dict)  # name -> hash -> shared
    failures: List[Tuple[str, str]] = field(default_factory=list)      # (scenario, error)
    over_shared_limit: List[Tuple[str, str, int]] = field(default_factory=list)  # (scenario, kernel, bytes)
    pruned: List[str] = field(default_factory=list)  # configs the autotuner drops for the dtype
    scenarios: int = 0
    current: str = ""

    @property
    def limit(self) -> int:
        return SHARED_MEMORY_LIMIT.get(self.arch, SHARED_MEMORY_LIMIT[90])

    def record(self, name: str, key: str, shared: int) -> None:
        self.kernels.setdefault(name, {})[key] = shared
        if shared > self.limit:
            self.over_shared_limit.append((self.current, name, shared))

    @property
    def ok(self) -> bool:
        return not self.failures and not self.over_shared_limit

    def format(self) -> str:
        limit = self.limit
        lines = [f"compile-check for sm_{self.arch}: {self.scenarios} scenarios, "
                 f"{sum(len(v) for v in self.kernels.values())} distinct kernels compiled"]
        for name, variants in sorted(self.kernels.items()):
            lines.append(f"  {name:<32} {len(variants):4d} variants, max shared memory "
                         f"{max(variants.values()) / 1024:6.1f} KiB (limit {limit // 1024} KiB)")
        for scenario in self.pruned:
            lines.append(f"  not compiled (dropped by the autotune prune: too little shared "
                         f"memory left): {scenario}")
        for scenario, name, shared in self.over_shared_limit:
            lines.append(f"  OVER THE SHARED-MEMORY LIMIT: {name} needs {shared / 1024:.1f} KiB "
                         f"in {scenario}")
        for scenario, error in self.failures:
            lines.append(f"  FAILED {scenario}:\n{error}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


@contextlib.contextmanager
def _compile_only(arch: int, report: CompileReport):
    """Triton compiles for GPUTarget("cuda", arch) and launches nothing; fastres takes its
    Triton paths for CPU tensors; FASTRES_AUTOTUNE=0 (autotuning would have to time launches)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from fastres import modules, ops

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):  # no CUDA library to load
            pass

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    real_run = JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        report.record(self.__name__, kernel.hash, kernel.metadata.shared)
        return kernel

    from fastres.kernels import conv as conv_kernels

    saved = (ops.backend_for, modules.backend_for, os.environ.get("FASTRES_AUTOTUNE"),
             list(conv_kernels._shared_limit))
    conv_kernels._shared_limit[:] = [report.limit]  # the prune judges configs for the target
    previous_driver = driver._active  # None until first used (reset_active() would need a GPU)
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_without_launch
    ops.backend_for = modules.backend_for = lambda x: "triton"
    os.environ["FASTRES_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        JITFunction.run = real_run
        driver._active = previous_driver
        ops.backend_for, modules.backend_for = saved[:2]
        conv_kernels._shared_limit[:] = saved[3]
        if saved[2] is None:
            del os.environ["FASTRES_AUTOTUNE"]
        else:
            os.environ["FASTRES_AUTOTUNE"] = saved[2]


def _blocks() -> List[Tuple[str, Callable[[], nn.Module], int]]:
    from fastres import FusedBasicBlock, FusedBottleneck

    def ds(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
    return [("BasicBlock", lambda: FusedBasicBlock(32, 32), 32),
            ("BasicBlock+downsample", lambda: FusedBasicBlock(32, 64, 2, ds(32, 64)), 32),
            ("Bottleneck", lambda: FusedBottleneck(64, 16), 64),
            ("Bottleneck+downsample", lambda: FusedBottleneck(32, 16, 2, ds(32, 64)), 32)]


# A scenario is (label, run): run(report) exercises one code path (the report records the
# compiled kernels through the patched JIT; config scenarios also note configs the prune drops).
Scenario = Tuple[str, Callable[[CompileReport], None]]


def _model_scenarios(dtypes, formats) -> List[Scenario]:
    """Eval forward and a training step of each block kind and of the stem."""
    from fastres import FusedConvBNReLU, set_fp32_precision

    def step(make, channels, dtype, fmt, train):
        def run(report: CompileReport):
            model = make().to(dtype=dtype, memory_format=fmt).train(train)
            x = torch.randn(2, channels, 12, 12, dtype=dtype).contiguous(memory_format=fmt)
            if train:
                model(x.requires_grad_()).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
        return run

    def with_precision(run, precision):
        def wrapped(report: CompileReport):
            set_fp32_precision(precision)
            try:
                run(report)
            finally:
                set_fp32_precision(None)
        return wrapped

    stem = ("stem 7x7", lambda: FusedConvBNReLU(3, 32, 7, stride=2, padding=3), 3)
    scenarios = []
    for dtype in dtypes:
        for fmt in formats:
            for name, make, channels in _blocks() + [stem]:
                for train in (False, True):
                    label = (f"{name} {'train step' if train else 'eval'} {dtype} "
                             f"{'channels_last' if fmt == torch.channels_last else 'nchw'}")
                    run = step(make, channels, dtype, fmt, train)
                    precisions = ("tf32", "ieee") if dtype == torch.float32 else (None,)
                    scenarios += [(label + (f" {p}" if p else ""), with_precision(run, p))
                                  for p in precisions]
    return scenarios


def _config_scenarios(dtypes) -> List[Scenario]:
    """Every curated conv config on a problem of its class, with and without the statistics
    epilogue (which needs BLOCK_M % 64 == 0) and the BN prologue."""
    from fastres.kernels import conv as conv_kernels
    problems = {"stem": (3, 7, 3, False), "small_m": (64, 1, 0, True),
                "pointwise": (64, 1, 0, False), "spatial": (64, 3, 1, False)}
    scenarios = []
    for entry in conv_kernels.load_config_table()["classes"]:
        C, R, pad, small = problems[entry["name"]]
        for cfg in entry["configs"]:
            meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            for dtype in dtypes:
                for training in (False, True):
                    if training and cfg["BLOCK_M"] % conv_kernels.STATS_CHUNK:
                        continue
                    label = f"conv config {entry['name']} {meta} {dtype}" + (" stats+prologue" if training else "")
                    scenarios.append((label, _config_run(conv_kernels, meta, C, R, pad, small,
                                                         dtype, training, label)))
    return scenarios


def _config_run(conv_kernels, meta, C, R, pad, small, dtype, training, label):
    def run(report: CompileReport):
        elem = torch.empty((), dtype=dtype).element_size()
        if not conv_kernels.fits_shared_memory(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"],
                                               meta["num_stages"], elem, training):
            report.pruned.append(label)
            return
        N, H = (1, 8) if small else (4, 16)
        x = torch.randn(N, C, H, H, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, C, R, R, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = torch.empty(N, 64, H, H, dtype=dtype).contiguous(memory_format=torch.channels_last)
        kwargs = {}
        if training:
            kwargs = dict(stats=torch.empty(conv_kernels.stats_chunks(N * H * H), 2, 64),
                          prologue=(torch.ones(C), torch.zeros(C)))
        real = conv_kernels._kernel_and_meta
        conv_kernels._kernel_and_meta = lambda *a, **k: (conv_kernels.fused_conv2d_kernel, dict(meta))
        try:
            conv_kernels.fused_conv2d(x, w, None if training else torch.zeros(64), None, None, None,
                                      out, (1, 1), (pad, pad), (1, 1), (1, 1), not training,
                                      "tf32", **kwargs)
        finally:
            conv_kernels._kernel_and_meta = real
    return run


def run(arch: int = 90, quick: bool = False) -> CompileReport:
    from fastres.kernels import conv as conv_kernels
    if conv_kernels.INTERPRETED:
        raise RuntimeError("compile-check needs the real Triton JIT: unset TRITON_INTERPRET before "
                           "fastres is imported")
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    formats = [torch.channels_last] if quick else [torch.channels_last, torch.contiguous_format]
    report = CompileReport(arch)
    scenarios = _model_scenarios(dtypes, formats) + _config_scenarios(dtypes)
    with _compile_only(arch, report):
        for label, scenario in scenarios:
            report.scenarios += 1
            report.current = label
            try:
                scenario(report)
            except Exception:  # noqa: BLE001 - every failure is reported, then the check fails
                report.failures.append((label, traceback.format_exc(limit=-3)))
    return report
