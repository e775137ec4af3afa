"""The fastres command line: `python -m fastres {demo,bench,gate,compile-check} [options]`.

Only the parsing and the dispatch live here; each command's work is in its own module, imported
when the command runs, so that `--help` and a usage error stay fast and need nothing optional:
  demo           fastres.tools.demo (needs torchvision)
  compile-check  fastres.tools.compile_check (with --sass: fastres.tools.sass_report, which
                 reads benchmarks/cases.py and the baseline of a checkout when there is one)
  bench, gate    benchmarks/bench.py and benchmarks/gate.py of a source checkout: they drive the
                 suites and baselines kept there, which are not installed with the package.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

DTYPE_NAMES = ("float32", "float16", "bfloat16")
COMMANDS = ("demo", "bench", "gate", "compile-check", "coverage")


# ---------------------------------------------------------------------------------------------
# What the commands need beyond the package: torchvision, a source checkout

def missing_torchvision(command: str) -> bool:
    """True, after saying what to install, when torchvision cannot be imported."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print(f"{command}: python -m fastres {command} needs torchvision (its models are "
              f"torchvision's ResNets), which is not installed: pip install torchvision")
        return True
    return False


class NoCheckout(LookupError):
    """A checkout-only tool was asked for, and no source checkout is in reach."""


def checkout_roots() -> List[Path]:
    """Where a source checkout may be, in order: around the imported fastres package (a checkout
    on PYTHONPATH or installed with pip install -e), else the current directory."""
    import fastres
    return [Path(fastres.__file__).resolve().parents[1], Path.cwd()]


def checkout_root() -> Optional[Path]:
    """The first of checkout_roots() that holds a benchmarks/ folder, else None."""
    return next((root for root in checkout_roots() if (root / "benchmarks").is_dir()), None)


def _looked_in() -> str:
    return " and ".join(str(root / "benchmarks") for root in dict.fromkeys(checkout_roots()))


def load_checkout_tool(name: str) -> ModuleType:
    """benchmarks/<name>.py of the source checkout, loaded by file path under a name of its own
    (no generic top-level name like `gate` claimed in sys.modules or put on sys.path)."""
    module_name = f"fastres_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    roots = checkout_roots()
    path = next((root / "benchmarks" / f"{name}.py" for root in roots
                 if (root / "benchmarks" / f"{name}.py").is_file()), None)
    if path is None:
        raise NoCheckout(
            f"`python -m fastres {name}` needs a fastres source checkout: it runs benchmarks/"
            f"{name}.py, which is not installed with the package (looked in {_looked_in()}). "
            f"Run it from the checkout's root, or pip install -e the checkout.")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # registered before it runs, as an import would (dataclasses)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _checkout_commit(root: Path) -> Optional[str]:
    """The checkout's short commit, with "+dirty" when the package or kernels differ from it."""
    import subprocess
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--",
                                "kernels", "fastres"], capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------
# The commands

def _demo(args: argparse.Namespace) -> int:
    command = "demo" if args.command == "demo" else "demo-interpret"
    if missing_torchvision("demo"):
        return 2
    from fastres.tools import demo

    models = demo.demo_models()
    if args.model not in models:
        print(f"{command}: unknown model {args.model!r}; choose one of: {', '.join(models)}")
        return 2
    return demo.demo(args) if args.command == "demo" else demo.demo_interpret(args)


def _compile_check(args: argparse.Namespace) -> int:
    if args.gate or args.bless or args.out is not None or args.baseline is not None:
        if not args.sass:
            print("compile-check: --gate, --bless, --out and --baseline go with --sass")
            return 2
    if args.sass:
        return _sass_report(args)
    from fastres.tools import compile_check

    report = compile_check.run(args.arch, args.quick)
    print(report.format())
    return 0 if report.ok else 1


def _sass_report(args: argparse.Namespace) -> int:
    """compile-check --sass: the layer list and the baseline come from a source checkout when
    there is one (benchmarks/cases.py, benchmarks/baselines/sass_sm<arch>.json)."""
    if missing_torchvision("compile-check --sass"):
        return 2
    from fastres.tools import sass_report

    root = checkout_root()
    cases, baseline, reason = None, args.baseline, None
    if root is None:
        print(f"compile-check --sass: no fastres source checkout (looked in {_looked_in()}): "
              "the layers are derived from torchvision directly, and the gate's baseline "
              "(benchmarks/baselines/) is not at hand")
        reason = ("compile-check --sass: --gate and --bless need the baseline benchmarks/baselines/"
                  f"{sass_report.BASELINE_NAME.format(arch=args.arch)} of a fastres source "
                  "checkout, which is not installed with the package: run from the checkout's "
                  "root, pip install -e the checkout, or pass --baseline FILE")
    else:
        cases = load_checkout_tool("cases")
        if baseline is None:
            baseline = root / "benchmarks" / "baselines" / sass_report.BASELINE_NAME.format(
                arch=args.arch)
    out = args.out if args.out is not None else Path("fastres-sass-out")
    return sass_report.main(args.arch, args.quick, out, args.gate, args.bless, baseline, cases,
                            _checkout_commit(root) if root else None, reason)


def _coverage(args: argparse.Namespace) -> int:
    if missing_torchvision("coverage"):
        return 2
    from fastres.tools import coverage

    return coverage.main(args.models, args.size)


def _gate(args: argparse.Namespace) -> int:
    gate = load_checkout_tool("gate")
    if args.timings is not None:
        threshold = gate.DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        return gate.run_timings(args.timings, args.baseline, args.bless, threshold)
    # The timing-free half builds torchvision's models; the timings half only reads JSON.
    if missing_torchvision("gate"):
        return 2
    return gate.run(args.expected, args.bless)


def _bench(args: argparse.Namespace) -> int:
    bench = load_checkout_tool("bench")
    levels = [level.strip() for level in args.level.split(",") if level.strip()]
    unknown = set(levels) - set(bench.LEVEL_FILES)
    if unknown:
        print(f"bench: unknown level(s) {sorted(unknown)}; choose from layer, block, model, train")
        return 2
    if missing_torchvision("bench"):
        return 2
    extra = []
    for flag, value in (("--bench-models", args.models), ("--bench-dtypes", args.dtypes),
                        ("--bench-providers", args.providers), ("--bench-batches", args.batches)):
        if value:
            extra.append(f"{flag}={value}")
    if args.quick:
        extra.append("--bench-quick")
    if args.cuda_graph:
        extra.append("--bench-cuda-graph")
    return bench.run(args.out, levels, extra)


# ---------------------------------------------------------------------------------------------
# The parser

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    # No `choices`: listing torchvision's models would import torchvision to build the parser.
    parser.add_argument("--model", default="resnet50",
                        help="a torchvision ResNet, Wide ResNet, ResNeXt, RegNet, MobileNetV2 or "
                             "EfficientNet, built with random weights (default: resnet50; an "
                             "unknown name lists the valid ones)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run the models and input in channels_last (default: on)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the weights and the input (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastres",
                                     description="fastres: fused conv+BN+ReLU kernels for ResNets.")
    # The metavar names the public commands and so hides demo-interpret.
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{" + ",".join(COMMANDS) + "}")

    demo_parser = commands.add_parser(
        "demo", help="convert a torchvision ResNet, check it, count launches and time it",
        description="Convert a torchvision ResNet (random weights) with fastres.optimize(), check "
                    "it against the original, and compare launches per forward and speed. "
                    "Needs torchvision. Exit code 1 if a check fails.")
    _add_model_options(demo_parser)
    demo_parser.add_argument("--batch", type=_positive_int,
                             help="batch size (default: 8 on a GPU, 2 on CPU)")
    demo_parser.add_argument("--size", type=_positive_int,
                             help="image height and width (default: 224 on a GPU, 112 on CPU)")
    demo_parser.add_argument("--dtype", choices=DTYPE_NAMES,
                             help="default: float16 on a GPU, float32 on CPU")
    demo_parser.add_argument("--iters", type=_positive_int,
                             help="timed forwards per model, 2 or more for a spread "
                                  "(default: 50 on a GPU, 5 on CPU)")
    demo_parser.add_argument("--no-interpreter-check", dest="interpreter_check",
                             action="store_false",
                             help="without a GPU, skip checking the Triton kernels through "
                                  "Triton's interpreter (a subprocess, ~20 s for resnet50)")
    demo_parser.set_defaults(run=_demo)

    bench_parser = commands.add_parser(
        "bench", help="run the benchmark suites and write a table, JSON, CSV and a plot",
        description="Run the pytest-benchmark suites (benchmarks/) for the chosen levels and "
                    "options, print a table and write raw.json, results.json, results.csv and "
                    "speedup.png to --out. Without a GPU a small labelled CPU subset runs. "
                    "Needs a source checkout and torchvision.")
    bench_parser.add_argument("--level", default="layer,block,model,train",
                              help="comma list of layer, block, model, train (training steps of "
                                   "blocks and models; default: all)")
    bench_parser.add_argument("--models", help="comma list (default: resnet18,resnet50)")
    bench_parser.add_argument("--dtypes", help="comma list of float16,bfloat16,float32")
    bench_parser.add_argument("--providers", help="comma list (default: all)")
    bench_parser.add_argument("--batches", help="model-level batches (default: 1,32,256; "
                                                "training: 256)")
    bench_parser.add_argument("--quick", action="store_true",
                              help="the quick set (fp16, resnet50, batch 256, no max-autotune)")
    bench_parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays")
    bench_parser.add_argument("--out", type=Path, default=Path("fastres-bench-out"),
                              help="output folder (default: ./fastres-bench-out)")
    bench_parser.set_defaults(run=_bench)

    gate_parser = commands.add_parser(
        "gate", help="check launches and bytes per forward against committed expectations",
        description="The perf-regression gate. By default its timing-free half: kernel launches "
                    "and bytes moved per forward of resnet18/50 and their blocks, compared with "
                    "benchmarks/baselines/cpu_gate.json (needs torchvision). With --timings, its "
                    "GPU half: fastres's speedup over eager channels_last per case against the "
                    "device's baseline. Needs a source checkout. Exit code 1 on a difference / "
                    "regression.")
    gate_parser.add_argument("--expected", type=Path, default=None,
                             help="expectations file (default: the checkout's "
                                  "benchmarks/baselines/cpu_gate.json)")
    gate_parser.add_argument("--bless", action="store_true",
                             help="write the measured numbers (or --timings results) as the new "
                                  "expectations (baseline)")
    gate_parser.add_argument("--timings", type=Path, default=None,
                             help="GPU half: a `fastres bench` results.json to check against "
                                  "the device's baseline in benchmarks/baselines/")
    gate_parser.add_argument("--baseline", type=Path, default=None,
                             help="with --timings: the baseline file (default: by device name)")
    gate_parser.add_argument("--threshold", type=float, default=None,
                             help="with --timings: allowed fall of fastres's speedup over eager "
                                  "channels_last (default: benchmarks/gate.py's "
                                  "DEFAULT_THRESHOLD)")
    gate_parser.set_defaults(run=_gate)

    check_parser = commands.add_parser(
        "compile-check", help="compile every kernel variant for an NVIDIA GPU, without a GPU",
        description="Compile, for GPUTarget('cuda', ARCH) and without launching anything, every "
                    "Triton kernel variant fastres launches (eval blocks, the stem, training "
                    "steps, every tuning config), and check each kernel's shared memory. With "
                    "--sass: the static cost report of the compiled conv kernels and its gate. "
                    "Needs TRITON_INTERPRET unset.")
    check_parser.add_argument("--arch", type=int, default=90,
                              help="compute capability x10 (default: 90, the H100)")
    check_parser.add_argument("--quick", action="store_true",
                              help="fp16 and channels_last only (the CI subset); with --sass: "
                                   "fp16 and ResNet-50 only")
    check_parser.add_argument("--sass", action="store_true",
                              help="instead: the static cost report of the conv kernel as "
                                   "compiled (registers, spills, occupancy, SASS opcode counts, "
                                   "loop structure, estimated instructions per tile, vs a "
                                   "reference GEMM) for every ResNet-18/50 conv at batch 256; "
                                   "needs torchvision (see docs/compile-check.md)")
    check_parser.add_argument("--out", type=Path, default=None,
                              help="with --sass: folder for sass.json and sass.md "
                                   "(default: ./fastres-sass-out)")
    check_parser.add_argument("--gate", action="store_true",
                              help="with --sass: compare with the committed baseline "
                                   "(benchmarks/baselines/sass_sm<ARCH>.json); exit code 1 on "
                                   "added spills, a lost HGMMA/UTMALDG or >10%% more "
                                   "instructions per tile")
    check_parser.add_argument("--bless", action="store_true",
                              help="with --sass: write the measured numbers as the baseline")
    check_parser.add_argument("--baseline", type=Path, default=None,
                              help="with --sass: the baseline file (default: the checkout's "
                                   "benchmarks/baselines/sass_sm<ARCH>.json)")
    check_parser.set_defaults(run=_compile_check)

    coverage_parser = commands.add_parser(
        "coverage", help="how much of a model optimize() fuses: pairs, blocks, ops per forward",
        description="For each model (random weights, eval, CPU, the folded torch path): conv+BN "
                    "pairs fused / total, candidate ResNet blocks fused / total, and the ops one "
                    "forward runs before and after optimize(). Needs torchvision (and timm for "
                    "timm's models).")
    coverage_parser.add_argument("models", nargs="+", metavar="MODEL",
                                 help="tv:NAME (torchvision), timm:NAME, or a bare name "
                                      "(torchvision first, then timm)")
    coverage_parser.add_argument("--size", type=_positive_int, default=64,
                                 help="input height and width for the op count (default: 64)")
    coverage_parser.set_defaults(run=_coverage)

    interpret_parser = commands.add_parser("demo-interpret")  # hidden: demo's subprocess
    _add_model_options(interpret_parser)
    interpret_parser.set_defaults(run=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except NoCheckout as missing:
        print(f"{args.command}: {missing}")
        return 2
