"""pytest-benchmark plumbing for fastres's suites: options, peak rates, timing, and the JSON
post-processing that adds speedups and roofline fractions.

Run on a GPU:   pytest benchmarks/ --benchmark-json=out.json [--bench-dtypes=float16 ...]
On a CPU the suites run a small labelled subset (CI proves they work); the options below are
read with defaults, so a plain `pytest` from the repository root runs that subset too.

Timing. GPU: Triton's do_bench (CUDA events, warm-up excluded, median) over inputs rotated
through enough copies that no call finds its inputs in L2 - that median is extra_info
["median_ms"], the number every table uses; pytest-benchmark's own statistics (synchronised
wall clock per call) are kept alongside. CPU: pytest-benchmark's median, wall clock.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import roofline  # noqa: E402
from bench_config import DTYPES, H100_L2_BYTES, ON_GPU  # noqa: E402
from cases import rotation_sets  # noqa: E402

from fastres import get_fp32_precision  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastres benchmarks")
    group.addoption("--bench-dtypes", help="comma list of float16,bfloat16,float32 "
                    "(default: all three on a GPU, float32 on a CPU)")
    group.addoption("--bench-providers", help="comma list (default: all on a GPU; no torch.compile "
                    "on a CPU)")
    group.addoption("--bench-models", help="comma list (default: resnet18,resnet50)")
    group.addoption("--bench-batches", help="model-level batches (default: 1,32,256 on a GPU)")
    group.addoption("--bench-quick", action="store_true", help="the quick set: fp16, resnet50, "
                    "model level at batch 256 (torch.compile default only), layers and blocks "
                    "without torch.compile")
    group.addoption("--bench-cuda-graph", action="store_true", help="time CUDA-graph replays")


def option(config, name, default=None):
    value = config.getoption(name, default=None)
    return default if value is None else value


def selected(config, name, gpu_default, cpu_default):
    value = option(config, name)
    if value is None:
        return gpu_default if ON_GPU else cpu_default
    return value.split(",") if isinstance(value, str) else value


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _cpu_runs_the_torch_path(monkeypatch):
    """On a CPU, fastres is timed on its folded torch path (the interpreter, which the tests
    switch on, is a correctness tool, not something to time)."""
    if not ON_GPU:
        monkeypatch.setenv("FASTRES_BACKEND", "torch")


def _time_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@pytest.fixture(scope="session")
def peaks():
    """Peak matmul rate per dtype and copy bandwidth, measured in this run on the GPU (the
    roofline's denominators); None on a CPU, which has no honest peak to measure: on the 2-core
    CI machine (torch 2.14.1) a 1024^3 fp32 matmul timed this way ran at 0.13 TFLOP/s while
    oneDNN's 3x3 convolutions reached 0.15 in the same run (roofline fractions of 104-120%), a
    matmul's rate swung 2x with the load of the shared machine, and the CPU cases' inputs sit in
    cache, not behind the DRAM bandwidth a copy measures (bench.roofline: n/a)."""
    if not ON_GPU:
        return None
    result = {}
    n = 8192
    # fp32 convolutions, cuDNN's and fastres's, multiply in TF32 unless told otherwise
    # (fastres.get_fp32_precision): an IEEE-fp32 matmul would be no peak for them.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = get_fp32_precision() == "tf32"
    try:
        with torch.inference_mode():
            for name, dt in DTYPES.items():
                a = torch.randn(n, n, device="cuda", dtype=dt)
                b = torch.randn(n, n, device="cuda", dtype=dt)
                result[name] = 2 * n ** 3 / (_time_ms(lambda: a @ b) * 1e-3)
            src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            result["bytes_per_s"] = 2 * src.numel() / (_time_ms(lambda: dst.copy_(src)) * 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return result


@pytest.fixture
def run_case(benchmark, request, peaks, device):
    """Time fn over rotated input sets and record everything a report needs."""
    cuda_graph = bool(option(request.config, "--bench-cuda-graph", False))

    def run(*, level, case, module, provider, dtype_name, flops, traffic):
        """Build `provider`'s version of `module`, time it on `case`'s inputs, record it.
        Levels train_block / train_model time a training step (forward + backward)."""
        import providers

        dtype = DTYPES[dtype_name]
        train = level.startswith("train")
        if train:
            fn = providers.build_train(provider, module, level, dtype, device)
        else:
            fn = providers.build(provider, module, level, dtype, device)

        def make_inputs():
            if train:
                return providers.train_inputs(level, case, dtype, device, provider)
            return providers.inputs_for(level, module, case, dtype, device, provider)

        first = make_inputs()
        set_bytes = sum(t.numel() * t.element_size() for t in first)
        n_sets = rotation_sets(set_bytes, H100_L2_BYTES if ON_GPU else 0)
        sets = itertools.cycle([first] + [make_inputs() for _ in range(n_sets - 1)])

        def call():
            return fn(*next(sets))

        with torch.inference_mode(not train):
            call()  # compile / autotune / fold before anything is timed
            if ON_GPU:
                if cuda_graph:
                    import triton.testing
                    median_ms = triton.testing.do_bench_cudagraph(call, rep=100, return_mode="median")
                    timing = "CUDA graph replays (do_bench_cudagraph), median"
                else:
                    median_ms = _time_ms(call)
                    timing = "CUDA events (do_bench), median, warm-up excluded"
                # pytest-benchmark's own record (synchronised wall clock), kept short: the
                # number that counts is do_bench's median above.
                benchmark.pedantic(lambda: (call(), torch.cuda.synchronize()), rounds=5,
                                   warmup_rounds=1)
            else:
                benchmark.pedantic(call, rounds=5, warmup_rounds=1)
                median_ms = benchmark.stats.stats.median * 1e3
                timing = ("CPU wall clock, median (fastres: train mode runs the unfused blocks "
                          "on the CPU)" if train else
                          "CPU wall clock, median (fastres: folded torch path, not the Triton kernels)")
        peak_flops = peaks[dtype_name] if peaks else None
        peak_bytes = peaks["bytes_per_s"] if peaks else None
        benchmark.extra_info.update(
            level=level, case=case.name, provider=provider, dtype=dtype_name,
            device=torch.cuda.get_device_name() if ON_GPU else "cpu",
            torch=torch.__version__, timing=timing, median_ms=median_ms, input_sets=n_sets,
            flops=flops, min_bytes=traffic, tflops=flops / (median_ms * 1e-3) / 1e12,
            gbps=traffic / (median_ms * 1e-3) / 1e9,
            peak_tflops=peak_flops / 1e12 if peaks else None,
            peak_gbps=peak_bytes / 1e9 if peaks else None,
            **roofline(flops, traffic, median_ms, peak_flops, peak_bytes))
        return median_ms

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speedup of every provider over every other one on the same case and dtype."""
    groups = {}
    for bench in output_json["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_ms" in info:
            groups.setdefault((info["level"], info["case"], info["dtype"]), []).append(info)
    for infos in groups.values():
        for info in infos:
            info["speedup_vs"] = {other["provider"]: other["median_ms"] / info["median_ms"]
                                  for other in infos if other is not info}


def pytest_generate_tests(metafunc):
    """Parametrize the suites from the options (and the GPU/CPU defaults)."""
    from cases import MODEL_NAMES, ModelCase, block_cases, layer_cases
    from providers import COMPILED, PROVIDERS, TRAIN_PROVIDERS

    cfg, names = metafunc.config, metafunc.fixturenames
    quick = bool(option(cfg, "--bench-quick", False))
    if "train_provider" in names:
        default = [p for p in TRAIN_PROVIDERS if ON_GPU or p not in COMPILED]
        if quick:  # the quick set compares fastres with eager channels_last only
            default = ["eager_cl", "fastres"]
        chosen = [p for p in selected(cfg, "--bench-providers", default, default)
                  if p in TRAIN_PROVIDERS]  # eager_folded & co. have no training step
        metafunc.parametrize("train_provider", chosen)
    if "provider" in names:
        default = [p for p in PROVIDERS if ON_GPU or p not in COMPILED]
        if quick:
            # The quick set's budget (minutes, autotuning included) has no room for a
            # torch.compile per layer or block, nor for max-autotune anywhere.
            per_case = metafunc.function.__name__ in ("test_layer", "test_block")
            default = [p for p in default
                       if p != "compile_max_autotune" and not (per_case and p in COMPILED)]
        metafunc.parametrize("provider", selected(cfg, "--bench-providers", default, default))
    if "dtype_name" in names:
        gpu = ["float16"] if quick else list(DTYPES)
        metafunc.parametrize("dtype_name", selected(cfg, "--bench-dtypes", gpu, ["float32"]))
    models = selected(cfg, "--bench-models", ["resnet50"] if quick else list(MODEL_NAMES),
                      ["resnet18"])
    batch = 256 if ON_GPU else 1
    if "layer_case" in names:
        cases = [c for m in models for c in layer_cases(m, batch)]
        cases = cases if ON_GPU else cases[:2]  # CPU: the stem and one residual 3x3
        metafunc.parametrize("layer_case", cases, ids=[c.name for c in cases])
    for fixture in ("block_case", "train_block_case"):  # the same blocks, forward or trained
        if fixture in names:
            cases = [c for m in models for c in block_cases(m, batch)]
            cases = cases if ON_GPU else cases[:1]
            metafunc.parametrize(fixture, cases, ids=[c.name for c in cases])
    if "train_model_case" in names:
        # The target: a resnet50 training step at batch 256 (CPU: batch 2, resnet18).
        batches = selected(cfg, "--bench-batches", ["256"], ["2"])
        cases = [ModelCase(m, int(b)) for m in models for b in batches]
        metafunc.parametrize("train_model_case", cases, ids=[c.name for c in cases])
    if "model_case" in names:
        batches = selected(cfg, "--bench-batches", ["256"] if quick else ["1", "32", "256"], ["1"])
        cases = [ModelCase(m, int(b)) for m in models for b in batches]
        metafunc.parametrize("model_case", cases, ids=[c.name for c in cases])
