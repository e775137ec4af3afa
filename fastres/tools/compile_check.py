"""Compile every Triton kernel variant fastres launches for an NVIDIA GPU, on a machine without one.

    python -m fastres compile-check [--arch 90] [--quick]

Triton's JIT is handed a driver that reports the target GPU (sm_90, the H100, by default) and
launches nothing, and every `kernel[grid](...)` call is turned into a warm-up: it compiles, down
to a cubin with Triton's bundled ptxas, exactly the specialization a real launch with those
arguments would (signature, constexpr options, config), then returns. fastres's own code paths
then run on small CPU tensors inside fastres.launch.target.compile_only(), where they take the
Triton path and the first candidate config, untimed: eval-mode blocks, the stem, and training
steps (forward and backward), in each dtype and memory format, plus every config of
fastres/launch/conv_configs.json for its problem class, each epilogue activation
(fastres.activations) on a 3x3 conv, grouped and depthwise convs, and the SE / ECA path (the
pooling epilogue, the gate pass). Nothing executes, so the numbers those paths produce are
meaningless; only the compilation is checked, and each kernel's shared memory against the
target's per-block limit.

It catches what Triton's interpreter cannot: tl.dot's shape and dtype rules, constexpr and type
errors in branches the interpreter treats loosely, and configs that overflow shared memory.
What it cannot catch: wrong results and speed - those need the GPU. Register spills and the
compiled code's cost are read off the cubins by `compile-check --sass` (fastres.tools.sass_report).
"""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastres import activations
from fastres.kernels.common import INTERPRETED
from fastres.launch import configs
from fastres.launch.conv import fused_conv2d, stats_chunks
from fastres.launch.target import Target, compile_only


@dataclass
class CompileReport:
    arch: int
    kernels: Dict[str, Dict[str, int]] = field(default_factory=dict)  # name -> hash -> shared
    failures: List[Tuple[str, str]] = field(default_factory=list)      # (scenario, error)
    over_shared_limit: List[Tuple[str, str, int]] = field(default_factory=list)  # (scenario, kernel, bytes)
    pruned: List[str] = field(default_factory=list)  # configs the autotuner drops for the dtype
    scenarios: int = 0
    current: str = ""
    # Called with each CompiledKernel (its .asm holds the cubin): compile-check --sass reads them.
    on_compile: Optional[Callable[[Any], None]] = None

    @property
    def limit(self) -> int:
        return Target.for_arch(self.arch).shared_memory_limit

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
def _compile_only(target: Target, report: CompileReport):
    """Triton compiles for GPUTarget("cuda", target.arch) and launches nothing, each compiled
    kernel recorded in the report; fastres's compile_only(target) scope makes the ops take their
    Triton paths for CPU tensors and choose configs for the target, untimed."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):  # no CUDA library to load
            pass

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", target.arch, 32)

    real_run = JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        report.record(self.__name__, kernel.hash, kernel.metadata.shared)
        if report.on_compile is not None:
            report.on_compile(kernel)
        return kernel

    previous_driver = driver._active  # None until first used (reset_active() would need a GPU)
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_without_launch
    try:
        with compile_only(target):
            yield
    finally:
        JITFunction.run = real_run
        driver._active = previous_driver


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
    epilogue (which needs BLOCK_M % STATS_CHUNK == 0) and the BN prologue."""
    problems = {"stem": (3, 7, 3, False), "small_m": (64, 1, 0, True),
                "pointwise": (64, 1, 0, False), "spatial": (64, 3, 1, False)}
    scenarios = []
    for entry in configs.load_config_table()["classes"]:
        C, R, pad, small = problems[entry["name"]]
        for dtype in dtypes:
            elem = torch.empty((), dtype=dtype).element_size()
            for cfg in configs.class_configs(entry, elem):
                for training in (False, True):
                    if training and cfg["BLOCK_M"] % configs.STATS_CHUNK:
                        continue
                    label = (f"conv config {entry['name']} {configs.launch_meta(cfg)} {dtype}"
                             + (" stats+prologue" if training else ""))
                    scenarios.append((label, _config_run(cfg, C, R, pad, small, dtype, training,
                                                         label)))
    return scenarios


def _config_run(cfg, C, R, pad, small, dtype, training, label):
    def run(report: CompileReport):
        elem = torch.empty((), dtype=dtype).element_size()
        # The target is compile_only()'s, which the scenarios run in.
        if not configs.fits_shared_memory(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
                                          cfg["num_stages"], elem, training):
            report.pruned.append(label)
            return
        N, H = (1, 8) if small else (4, 16)
        x = torch.randn(N, C, H, H, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, C, R, R, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = torch.empty(N, 64, H, H, dtype=dtype).contiguous(memory_format=torch.channels_last)
        kwargs = {}
        if training:
            kwargs = dict(stats=torch.empty(stats_chunks(N * H * H), 2, 64),
                          prologue=(torch.ones(C), torch.zeros(C)))
        fused_conv2d(x, w, None if training else torch.zeros(64), None, None, None, out, (1, 1),
                     (pad, pad), (1, 1), (1, 1), not training, "tf32", config=cfg, **kwargs)
    return run


def _activation_scenarios(dtypes) -> List[Scenario]:
    """Every epilogue activation other than ReLU and none (which the models and configs cover),
    on a 3x3 conv with a residual, with the config fastres picks first."""
    def make(name, dtype):
        def run(report: CompileReport):
            x = torch.randn(4, 64, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(64, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
            out = torch.empty_like(x)
            fused_conv2d(x, w, torch.zeros(64), torch.empty_like(x), None, None, out, (1, 1), (1, 1),
                         (1, 1), (1, 1), (name, 0.1), "tf32")
        return run
    return [(f"activation {name} {dtype}", make(name, dtype)) for dtype in dtypes
            for name in activations.NAMES if name not in ("relu", "identity")]


def _grouped_scenarios(dtypes, formats) -> List[Scenario]:
    """Grouped convs (the implicit GEMM, GROUPED: a ResNeXt 3x3 with a residual, a RegNet-like
    one with few channels per group over the flattened reduction, a 1x1 with the dual-GEMM
    shortcut) and depthwise convs (their own kernel: 3x3 and 5x5, stride 1 and 2, a residual,
    a channel multiplier), each with the config fastres picks first, and every GPU tile of
    the depthwise kernel."""
    from fastres.launch.depthwise import GPU_CONFIGS

    # (label, C, K, groups, R, stride, residual, shortcut C2, depthwise config)
    problems = [("grouped 3x3 g32 +res", 128, 128, 32, 3, 1, True, 0, None),
                ("grouped 3x3 g8 flat stride 2", 64, 64, 8, 3, 2, False, 0, None),
                ("grouped 1x1 g4 +downsample", 64, 128, 4, 1, 1, False, 32, None),
                ("depthwise 3x3", 96, 96, 96, 3, 1, False, 0, None),
                ("depthwise 5x5 stride 2", 96, 96, 96, 5, 2, False, 0, None),
                ("depthwise 3x3 +res", 96, 96, 96, 3, 1, True, 0, None),
                ("depthwise 3x3 multiplier 2", 48, 96, 48, 3, 1, False, 0, None)]
    problems += [(f"depthwise 3x3 tile {c['BLOCK_M']}x{c['BLOCK_C']}", 96, 96, 96, 3, 1, False, 0,
                  c) for c in GPU_CONFIGS[1:]]

    def make(C, K, groups, R, stride, residual, C2, config, dtype, fmt):
        def run(report: CompileReport):
            x = torch.randn(2, C, 16, 16, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(K, C // groups, R, R, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            P = 16 // stride
            out = torch.empty(2, K, P, P, dtype=dtype).contiguous(memory_format=fmt)
            res = torch.empty_like(out) if residual else None
            x2 = w2 = None
            if C2:
                x2 = torch.randn(2, C2, P, P, dtype=dtype).contiguous(memory_format=fmt)
                w2 = torch.randn(K, C2, 1, 1, dtype=dtype)
            fused_conv2d(x, w, torch.zeros(K), res, x2, w2, out, (stride, stride),
                         (R // 2, R // 2), (1, 1), (1, 1), "relu6", "tf32", config=config,
                         groups=groups)
        return run
    return [(f"{label} {dtype} {'channels_last' if fmt == torch.channels_last else 'nchw'}",
             make(*problem, dtype, fmt))
            for label, *problem in problems for dtype in dtypes for fmt in formats]


def _gate_scenarios(dtypes, formats) -> List[Scenario]:
    """The SE / ECA path: the POOL epilogue on a 1x1 conv (a plain GEMM by TMA on sm_90), a
    64-channel 3x3 (output patches: one image per tile), a grouped 3x3 and a depthwise 3x3;
    then the gate pass, with and without a residual."""
    from fastres.launch.gate import gate_act

    # (label, C, K, groups, R)
    convs = [("pool 1x1", 64, 64, 1, 1), ("pool 3x3 64", 64, 64, 1, 3),
             ("pool grouped 3x3", 64, 64, 8, 3), ("pool depthwise 3x3", 64, 64, 64, 3)]

    def conv(C, K, groups, R, dtype, fmt):
        def run(report: CompileReport):
            x = torch.randn(2, C, 16, 16, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(K, C // groups, R, R, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            out = torch.empty(2, K, 16, 16, dtype=dtype).contiguous(memory_format=fmt)
            fused_conv2d(x, w, torch.zeros(K), None, None, None, out, (1, 1), (R // 2, R // 2),
                         (1, 1), (1, 1), "silu", "tf32", groups=groups, pool=torch.zeros(2, K))
        return run

    def gate(residual, dtype, fmt):
        def run(report: CompileReport):
            y = torch.randn(2, 64, 8, 8, dtype=dtype).contiguous(memory_format=fmt)
            gate_act(y, torch.rand(2, 64, dtype=dtype), torch.empty_like(y) if residual else None,
                     "relu" if residual else "identity")
        return run

    def layout(fmt):
        return "channels_last" if fmt == torch.channels_last else "nchw"
    scenarios = [(f"{label} {dtype} {layout(fmt)}", conv(*problem, dtype, fmt))
                 for label, *problem in convs for dtype in dtypes for fmt in formats]
    scenarios += [(f"gate pass{' +res' if residual else ''} {dtype} {layout(fmt)}",
                   gate(residual, dtype, fmt))
                  for residual in (True, False) for dtype in dtypes for fmt in formats]
    return scenarios


def run(arch: int = 90, quick: bool = False) -> CompileReport:
    if INTERPRETED:
        raise RuntimeError("compile-check needs the real Triton JIT: unset TRITON_INTERPRET before "
                           "fastres is imported")
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    formats = [torch.channels_last] if quick else [torch.channels_last, torch.contiguous_format]
    report = CompileReport(arch)
    scenarios = _model_scenarios(dtypes, formats) + _config_scenarios(dtypes)
    if arch >= 90 or not quick:  # (CI's quick sm_80 run leaves the epilogue variants to sm_90's)
        scenarios += (_activation_scenarios(dtypes) + _grouped_scenarios(dtypes, formats)
                      + _gate_scenarios(dtypes, formats))
    with _compile_only(Target.for_arch(arch), report):
        for label, scenario in scenarios:
            report.scenarios += 1
            report.current = label
            try:
                scenario(report)
            except Exception:  # noqa: BLE001 - every failure is reported, then the check fails
                report.failures.append((label, traceback.format_exc(limit=-3)))
    return report
