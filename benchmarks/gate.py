"""The timing-free half of the perf-regression gate: launches and bytes, checked on any machine.

For torchvision resnet18 and resnet50 (batch 1, 3x224x224, float32, channels_last), and for each
distinct block configuration in them, it traces one forward of the original and of the
fastres-optimized module (fastres.tools.optrace.trace_ops: ops that do work and the bytes each
reads and writes) and compares the numbers with the committed expectations in
benchmarks/baselines/cpu_gate.json. A change that unfuses something (more launches) or adds
traffic (more bytes) fails; so does one that improves them, until the new numbers are blessed
(`python -m fastres gate --bless`), which records the change in git.

Totals depend on how the installed torch decomposes its own ops (batch_norm, max_pool, ...), so
they are compared only under the torch version that blessed the file; fastres's own ops
(fastres_launches, fastres_bytes) are compared under any version.

A checkout-only tool: `python -m fastres gate` loads this file from the source checkout.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import fastres
from fastres.nn.anatomy import block_kind
from fastres.tools.optrace import OpTrace, trace_ops

BASELINES = Path(__file__).resolve().parent / "baselines"
DEFAULT_EXPECTED = BASELINES / "cpu_gate.json"
MODELS = ("resnet18", "resnet50")
CONFIG = dict(batch=1, size=224, dtype="float32", memory_format="channels_last")
FUSED_OP = "fastres.conv_bn_act"


def _summary(trace: OpTrace) -> dict:
    fused = [op for op in trace.ops if op.name == FUSED_OP]
    return {"launches": trace.launches, "bytes": trace.bytes_moved,
            "fastres_launches": len(fused),
            "fastres_bytes": sum(op.bytes_read + op.bytes_written for op in fused)}


def _block_label(model_name: str, path: str, block: nn.Module, x: torch.Tensor) -> str:
    kind = block_kind(block) or type(block).__name__
    last = block.conv3 if kind == "Bottleneck" else block.conv2
    stride = max(block.conv1.stride + block.conv2.stride)
    ds = " +downsample" if getattr(block, "downsample", None) is not None else ""
    return (f"{model_name} {kind} {block.conv1.in_channels}->{last.out_channels} stride {stride}"
            f"{ds} @{x.shape[2]}x{x.shape[3]}")


def measure() -> dict:
    """Launch and byte counts for the gate's models and their distinct blocks.

    Runs on the CPU's folded torch path whatever the environment (the counts are the same as
    the kernels', which take the same arguments; Triton's interpreter would take minutes)."""
    previous = os.environ.get("FASTRES_BACKEND")
    os.environ["FASTRES_BACKEND"] = "torch"
    try:
        return _measure()
    finally:
        if previous is None:
            del os.environ["FASTRES_BACKEND"]
        else:
            os.environ["FASTRES_BACKEND"] = previous


def _measure() -> dict:
    try:
        import torchvision  # the gate's models; fastres itself never needs it
    except ImportError as missing:
        raise ImportError("the gate measures torchvision's resnet18 and resnet50: "
                          "pip install torchvision") from missing

    result = {"config": dict(CONFIG, torch=torch.__version__.split("+")[0]), "models": {},
              "blocks": {}}
    for name in MODELS:
        torch.manual_seed(0)
        original = torchvision.models.get_model(name, weights=None).eval()
        original = original.to(memory_format=torch.channels_last)
        optimized = fastres.optimize(copy.deepcopy(original))
        x = torch.randn(CONFIG["batch"], 3, CONFIG["size"], CONFIG["size"])
        x = x.contiguous(memory_format=torch.channels_last)

        with torch.inference_mode():
            optimized(x)  # fold the BatchNorms now: the one-time folding is not per-forward work
        inputs: Dict[str, torch.Tensor] = {}
        hooks = []
        def recorder(path):
            def hook(module, args):  # returns None: the input goes on unchanged
                inputs.setdefault(path, args[0])
            return hook

        for path, module in original.named_modules():
            if block_kind(module):
                hooks.append(module.register_forward_pre_hook(recorder(path)))
        result["models"][name] = {"original": _summary(trace_ops(lambda: original(x))),
                                  "fastres": _summary(trace_ops(lambda: optimized(x)))}
        for h in hooks:
            h.remove()
        for path, inp in inputs.items():
            block = original.get_submodule(path)
            label = _block_label(name, path, block, inp)
            if label not in result["blocks"]:
                fused = optimized.get_submodule(path)
                result["blocks"][label] = {
                    "original": _summary(trace_ops(lambda: block(inp))),
                    "fastres": _summary(trace_ops(lambda: fused(inp)))}
    return result


def compare(expected: dict, measured: dict) -> Tuple[bool, List[str]]:
    """(ok, table lines): every case, with the differences marked."""
    same_torch = expected["config"].get("torch") == measured["config"]["torch"]
    lines, ok = [], True
    header = f"{'case':<62} {'':<9} {'launches':>9} {'bytes':>13}   status"
    lines.append(header)
    for section in ("models", "blocks"):
        names = sorted(set(expected[section]) | set(measured[section]))
        for name in names:
            exp, got = expected[section].get(name), measured[section].get(name)
            if exp is None or got is None:
                ok = False
                lines.append(f"{name:<62} {'missing in ' + ('expected' if exp is None else 'measured')}")
                continue
            for side in ("original", "fastres"):
                keys = ("fastres_launches", "fastres_bytes")
                if same_torch:
                    keys = ("launches", "bytes") + keys
                diffs = [k for k in keys if exp[side][k] != got[side][k]]
                status = "ok"
                if diffs:
                    ok = False
                    status = "CHANGED " + ", ".join(f"{k} {exp[side][k]} -> {got[side][k]}" for k in diffs)
                lines.append(f"{name if side == 'original' else '':<62} {side:<9} "
                             f"{got[side]['launches']:>9} {got[side]['bytes']:>13}   {status}")
    if not same_torch:
        lines.append(f"note: expectations were blessed under torch {expected['config'].get('torch')}, "
                     f"this is torch {measured['config']['torch']}: only fastres's own ops "
                     "(fastres_launches, fastres_bytes) are compared; totals are shown")
    return ok, lines


def run(expected_path: Optional[Path] = None, bless: bool = False) -> int:
    """Check (exit code 0/1) or bless the expectations; prints the table."""
    path = Path(expected_path or DEFAULT_EXPECTED)
    measured = measure()
    if bless:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n")
        print(f"gate: blessed {len(measured['models'])} models and {len(measured['blocks'])} "
              f"blocks into {path}")
        return 0
    if not path.is_file():
        print(f"gate: no expectations at {path}; create them with --bless")
        return 1
    ok, lines = compare(json.loads(path.read_text()), measured)
    print("\n".join(lines))
    print("gate: PASS" if ok else f"gate: FAIL (launches or bytes differ from {path}; if the "
          "change is intended, bless it with `python -m fastres gate --bless` and commit)")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# The GPU half: timings against a stored per-GPU baseline.
#
# What is compared is fastres's speedup over eager channels_last on each case, measured side by
# side in the same run, not raw times: a slower clock, a warmer card or another driver moves
# both providers alike and cancels out of the ratio, while a change that slows fastres does not.
# Threshold: a case fails when its speedup falls by more than 10%. Triton's do_bench medians
# over rotated inputs repeat to within a few percent from run to run; 10% leaves room for that
# on both sides of the ratio. It is a starting value: re-derive it from the spread of repeated
# GPU runs (benchmarks/results/) and change DEFAULT_THRESHOLD with that evidence.

DEFAULT_THRESHOLD = 0.10


def baseline_path_for(device_name: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return BASELINES / f"{slug}.json"


def _speedups(rows: List[dict]) -> Dict[Tuple[str, str, str], dict]:
    return {(r["level"], r["case"], r["dtype"]): r for r in rows if "speedup_vs_eager_cl" in r}


def compare_timings(baseline: dict, current: dict, threshold: float = DEFAULT_THRESHOLD
                    ) -> Tuple[bool, List[str]]:
    base, cur = _speedups(baseline["rows"]), _speedups(current["rows"])
    lines = [f"baseline: {baseline['environment'].get('device')} commit "
             f"{baseline['environment'].get('commit', '?')[:12]}; this run: "
             f"{current['environment'].get('device')} commit {current['environment'].get('commit', '?')[:12]}",
             f"{'case':<60} {'speedup base':>12} {'now':>7} {'change':>8}   status"]
    ok, unchanged = True, 0
    for key in sorted(set(base) & set(cur)):
        b, c = base[key]["speedup_vs_eager_cl"], cur[key]["speedup_vs_eager_cl"]
        change = c / b - 1
        if change < -threshold:
            ok, status = False, "REGRESSION"
        elif change > threshold:
            status = "improvement"
        else:
            unchanged += 1
            continue
        lines.append(f"{' '.join(key)[:60]:<60} {b:11.2f}x {c:6.2f}x {100 * change:+7.1f}%   {status}")
    lines.append(f"{unchanged} case(s) within +-{100 * threshold:.0f}% of the baseline")
    for key in sorted(set(cur) - set(base)):
        lines.append(f"new case, not in the baseline: {' '.join(key)}")
    for key in sorted(set(base) - set(cur)):
        lines.append(f"not measured in this run: {' '.join(key)}")
    return ok, lines


def run_timings(results_path: Path, baseline: Optional[Path] = None, bless: bool = False,
                threshold: float = DEFAULT_THRESHOLD) -> int:
    """Check a `python -m fastres bench` results.json against the baseline (or bless it)."""
    current = json.loads(Path(results_path).read_text())
    path = Path(baseline) if baseline else baseline_path_for(current["environment"]["device"])
    if bless:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")
        print(f"gate: blessed {results_path} as the baseline {path}")
        return 0
    if not path.is_file():
        print(f"gate: no baseline at {path}; bless one with --timings {results_path} --bless")
        return 1
    ok, lines = compare_timings(json.loads(path.read_text()), current, threshold)
    print("\n".join(lines))
    print("gate: PASS" if ok else f"gate: FAIL (fastres's speedup fell by more than "
          f"{100 * threshold:.0f}% on the cases above)")
    return 0 if ok else 1
