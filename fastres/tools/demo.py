"""`python -m fastres demo`: what fastres.optimize() buys on a torchvision ResNet.

It converts the model and shows:
  1. the fusion report: what was fused, what was left alone and why;
  2. a numerical check of the optimized model against an untouched copy of the original;
  3. kernel launches per forward, before and after;
  4. time per forward, before and after, with its spread, and the speed ratio's: "within noise"
     (no speedup or slowdown claimed) when the ratio's interquartile range includes 1;
  5. without a GPU, the check once more through the Triton kernels themselves, run by Triton's
     interpreter in a subprocess (TRITON_INTERPRET must be set before fastres is imported).
The exit code is 0 when every check passes and 1 otherwise.
fastres.tools.cli parses the options and checks, before importing this module, that torchvision
is installed and the model is one of demo_models().
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torchvision
import triton
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

import fastres
from fastres.convert import FusionEntry
from fastres.kernels.common import INTERPRETED
from fastres.launch.conv import launch_count
from fastres.ops.conv_bn_act import backend_for
from fastres.reference import randomize_batchnorms
from fastres.testing import model_tolerance
from fastres.tools.optrace import trace_ops

# The interpreter check's problem: every layer of the model still has a distinct shape (the
# 7x7 stem, all four stages, the downsample shortcuts), and the interpreter stays affordable
# (resnet50: ~12 s for the one interpreted forward on an idle 2-core machine).
INTERPRETER_BATCH = 1
INTERPRETER_SIZE = 64

# Forwards before timing on a GPU, on top of the check and the launch count (the first call
# autotunes the Triton kernels and folds the BatchNorms): clocks and caches settle.
CUDA_WARMUP = 5


# ---------------------------------------------------------------------------------------------
# Model, input, check

# torchvision's classification models with ResNet-style blocks or conv -> BN -> act chains
DEMO_FAMILIES = ("resnet", "wide_resnet", "resnext", "regnet_", "mobilenet_v2", "efficientnet_b")


def demo_models() -> List[str]:
    """The torchvision models the demo can build: its ResNets, Wide ResNets and ResNeXts, and
    the RegNets, MobileNetV2 and EfficientNets (grouped and depthwise convs, SE gates)."""
    return sorted(name for name in torchvision.models.list_models(torchvision.models)
                  if name.startswith(DEMO_FAMILIES))


def build_model(name: str, seed: int, device: torch.device, dtype: torch.dtype,
                channels_last: bool) -> nn.Module:
    """torchvision's `name` with random weights (weights=None: nothing is downloaded) and random
    BatchNorms, in eval mode, on `device` in `dtype`."""
    torch.manual_seed(seed)  # torchvision initialises the conv and fc weights from the global RNG
    model = torchvision.models.get_model(name, weights=None)
    randomize_batchnorms(model, torch.Generator().manual_seed(seed))
    model.eval().to(device=device, dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_input(batch: int, size: int, seed: int, device: torch.device, dtype: torch.dtype,
               channels_last: bool) -> Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device=device, dtype=dtype, memory_format=fmt)


def compare(reference: Tensor, result: Tensor) -> Tuple[float, float]:
    """(max abs error, max abs error / max |reference|), in float64. NaN if either is not finite."""
    ref, res = reference.double(), result.double()
    err = (res - ref).abs().max().item()
    return err, err / ref.abs().max().item()


def describe_backend(x: Tensor) -> str:
    """What runs the fused convolutions for input x."""
    if x.device.type == "cuda":
        return "Triton kernels"
    if backend_for(x) == "triton":
        return "Triton kernels through Triton's interpreter"
    return "folded torch path, not the Triton kernels"


# ---------------------------------------------------------------------------------------------
# Launch counts and timing

def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches of one fn() call: the CUDA kernels torch.profiler sees on a GPU, the ops
    that do work (fastres.tools.optrace.trace_ops) on a CPU."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
                       and not e.name.startswith(("Memcpy", "Memset")))
    return trace_ops(fn).launches


def interleaved_times_ms(fns: List[Callable[[], object]], device: torch.device,
                         iters: int) -> List[List[float]]:
    """Time of each of `iters` calls of each fn in ms: CUDA events on a GPU, wall clock on a CPU.
    The fns take turns within every iteration, so clock, thermal and background-load drift
    hits them alike instead of whichever happened to be timed second, and the ratio of their
    times in one iteration compares them under the same conditions."""
    times: List[List[float]] = [[] for _ in fns]
    with torch.inference_mode():
        if device.type == "cuda":
            for _ in range(CUDA_WARMUP):
                for fn in fns:
                    fn()
        # (on a CPU the check and the launch count have already run each model twice)
        for _ in range(iters):
            for fn, fn_times in zip(fns, times):
                if device.type == "cuda":
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    fn_times.append(start.elapsed_time(end))
                else:
                    start = time.perf_counter()
                    fn()
                    fn_times.append((time.perf_counter() - start) * 1e3)
    return times


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of some measurements; None quartiles for a single one."""
    median: float
    q1: Optional[float]
    q3: Optional[float]

    @classmethod
    def of(cls, values: List[float]) -> "Spread":
        if len(values) < 2:
            return cls(values[0], None, None)
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median, q1, q3)

    def format(self, unit: str, digits: int) -> str:
        if self.q1 is None:
            return f"{self.median:.{digits}f}{unit} [no spread: 1 iteration]"
        return f"{self.median:.{digits}f}{unit} [IQR {self.q1:.{digits}f} - {self.q3:.{digits}f}]"


def speed_verdict(ratio: Spread) -> str:
    """What the per-iteration speed ratio original / fastres supports: a speedup or a slowdown
    only when its whole interquartile range lies on one side of 1."""
    if ratio.q1 is None:
        return "one iteration has no spread: no speed claim"
    if ratio.q1 <= 1.0 <= ratio.q3:
        return "within noise: no speedup or slowdown claimed"
    return f"fastres {'faster' if ratio.q1 > 1.0 else 'slower'}"


# ---------------------------------------------------------------------------------------------
# demo

def _first_fused_blocks(report: fastres.FusionReport) -> Dict[str, FusionEntry]:
    """The first fused block of each kind ("BasicBlock", "Bottleneck") in the model."""
    blocks = {}
    for entry in report.fused:
        if entry.kind in ("BasicBlock", "Bottleneck"):
            blocks.setdefault(entry.kind, entry)
    return blocks


def _capture_inputs(model: nn.Module, paths: List[str]) -> Tuple[Dict[str, Tensor], list]:
    """Record the input each submodule in `paths` gets in the next forwards; returns the dict
    that fills up and the hook handles, to remove."""
    inputs: Dict[str, Tensor] = {}
    handles = []
    for path in paths:
        def hook(module, args, path=path):
            inputs.setdefault(path, args[0])
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    return inputs, handles


def print_launches(original: nn.Module, model: nn.Module, x: Tensor,
                   blocks: Dict[str, FusionEntry],
                   block_inputs: Dict[str, Tensor]) -> None:
    """Launches per forward of both models, and of one block of each fused kind."""
    device = x.device
    if device.type == "cuda":
        print("\nlaunches per forward: CUDA kernels (torch.profiler)")
    else:
        print("\nlaunches per forward: CPU stand-in, ops that do work (views excluded);\n"
              "  a fastres conv_bn_act counts once, as it is one kernel launch on a GPU")
    rows = [("model", count_launches(lambda: original(x), device),
             count_launches(lambda: model(x), device), "")]
    for kind, entry in blocks.items():
        original_block = original.get_submodule(entry.path)
        fused_block = model.get_submodule(entry.path)
        inp = block_inputs[entry.path]
        rows.append((f"one {kind}", count_launches(lambda: original_block(inp), device),
                     count_launches(lambda: fused_block(inp), device),
                     f"({entry.path}, {entry.detail})"))
    for label, before, after, note in rows:
        print(f"  {label:<16} original {before:>4} -> fastres {after:>4}   {note}".rstrip())


def print_timing(original: nn.Module, model: nn.Module, x: Tensor, iters: int,
                 backend: str) -> None:
    device = x.device
    runs = f"{iters} interleaved forward{'s' if iters > 1 else ''} per model"
    if device.type == "cuda":
        print(f"\ntiming: {torch.cuda.get_device_name(device)}, {runs} (CUDA events) after "
              f"{CUDA_WARMUP} warm-up; median [interquartile range]")
    else:
        print(f"\ntiming: CPU ({backend}), {runs} (wall clock); median [interquartile range]")
    base, fast = interleaved_times_ms([lambda: original(x), lambda: model(x)], device, iters)
    batch = x.shape[0]
    for label, times in (("original", base), ("fastres", fast)):
        spread = Spread.of(times)
        print(f"  {label:<10} {spread.format(' ms/iter', 2)}   "
              f"{batch * 1e3 / spread.median:.1f} img/s")
    ratio = Spread.of([b / f for b, f in zip(base, fast)])
    print(f"  ratio      {ratio.format('x', 2)}   original / fastres per iteration; "
          f"{speed_verdict(ratio)}")


def run_interpreter_check(args: argparse.Namespace) -> Tuple[int, float]:
    """Run `demo-interpret` in a fresh Python with TRITON_INTERPRET=1 (read when fastres's kernels
    are imported: too late in this process) and relay its output. Returns (exit code, seconds)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.pop("FASTRES_BACKEND", None)  # the point is the Triton kernels, whatever we were told
    # The child imports the same fastres as this process, whether installed or from a checkout.
    source_root = str(Path(fastres.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    layout = "--channels-last" if args.channels_last else "--no-channels-last"
    cmd = [sys.executable, "-m", "fastres", "demo-interpret", "--model", args.model,
           "--seed", str(args.seed), layout]
    start = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            print("  " + line.rstrip(), flush=True)
    return proc.returncode, time.perf_counter() - start


def demo(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    batch = args.batch or (8 if on_gpu else 2)
    size = args.size or (224 if on_gpu else 112)
    dtype_name = args.dtype or ("float16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    iters = args.iters or (50 if on_gpu else 5)

    model = build_model(args.model, args.seed, device, dtype, args.channels_last)
    original = copy.deepcopy(model)
    fastres.optimize(model)
    report = fastres.fusion_report(model)
    x = make_input(batch, size, args.seed, device, dtype, args.channels_last)
    backend = describe_backend(x)
    failures = []

    layout = "channels_last" if args.channels_last else "NCHW"
    where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} threads"
    print(f"fastres demo: {args.model}, batch {batch}, 3x{size}x{size}, {dtype_name}, "
          f"{layout}, seed {args.seed}")
    print(f"  device     {device} ({where})")
    print(f"  versions   torch {torch.__version__}, triton {triton.__version__}, "
          f"fastres {fastres.__version__}")
    print(f"  fused ops  {backend}")

    print("\nfusion report")
    print("\n".join("  " + line for line in str(report).splitlines()))

    blocks = _first_fused_blocks(report)
    block_inputs, hooks = _capture_inputs(original, [e.path for e in blocks.values()])
    with torch.inference_mode():
        ref = original(x)
        out = model(x)
    for hook in hooks:
        hook.remove()
    abs_err, rel_err = compare(ref, out)
    tol = model_tolerance(dtype, device)
    passed = rel_err <= tol
    print("\ncheck: fastres vs original on the same input (torch.inference_mode)")
    print(f"  max abs error  {abs_err:.2e}")
    print(f"  max rel error  {rel_err:.2e}   (max |diff| / max |original|; threshold {tol:.0e})"
          f"   {'ok' if passed else 'FAIL'}")
    if not passed:
        failures.append(f"max rel error {rel_err:.2e} > {tol:.0e}")

    print_launches(original, model, x, blocks, block_inputs)
    print_timing(original, model, x, iters, backend)

    if not on_gpu and args.interpreter_check:
        print("\ninterpreter check: the Triton kernels through TRITON_INTERPRET=1, in a "
              f"subprocess (batch {INTERPRETER_BATCH}, {INTERPRETER_SIZE}x{INTERPRETER_SIZE}, "
              "float32)", flush=True)
        code, seconds = run_interpreter_check(args)
        print(f"  subprocess     {seconds:.1f} s, exit code {code}")
        if code != 0:
            failures.append(f"interpreter check exited with code {code}")

    # Speed is shown above, with its noise; only the checks decide the verdict.
    print("\ndemo: " + (f"FAIL ({'; '.join(failures)})" if failures else
                        "PASS (the checks above; speed is not a pass criterion)"))
    return 1 if failures else 0


def demo_interpret(args: argparse.Namespace) -> int:
    """Hidden `demo-interpret`: the demo's check through the Triton kernels under the interpreter.
    Run by demo in a subprocess whose environment sets TRITON_INTERPRET=1."""
    if not INTERPRETED:
        print("demo-interpret: TRITON_INTERPRET=1 must be set before fastres is imported")
        return 2
    device, dtype = torch.device("cpu"), torch.float32
    model = build_model(args.model, args.seed, device, dtype, args.channels_last)
    original = copy.deepcopy(model)
    fastres.optimize(model)
    x = make_input(INTERPRETER_BATCH, INTERPRETER_SIZE, args.seed, device, dtype,
                   args.channels_last)
    with torch.inference_mode():
        ref = original(x)
        launches = launch_count()
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
        launches = launch_count() - launches
    abs_err, rel_err = compare(ref, out)
    tol = model_tolerance(dtype, device)
    passed = rel_err <= tol and launches > 0  # no launch at all: nothing was checked
    print(f"max abs error  {abs_err:.2e}")
    print(f"max rel error  {rel_err:.2e}   (threshold {tol:.0e})   "
          f"{'ok' if rel_err <= tol else 'FAIL'}")
    print(f"launches       {launches} fused-kernel launches per forward"
          + ("" if launches else "   FAIL: no fused kernel ran"))
    print(f"forward        {seconds:.1f} s (interpreted)")
    return 0 if passed else 1
