#!/usr/bin/env bash
# GPU check: on a CUDA machine with the stack preinstalled and no network (see
# ../shared/ENVIRONMENT.md), run everything that needs a real GPU and collect the evidence.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # the full check (budget: under 8 minutes)
#   bash benchmarks/gpu_check.sh OUT_DIR --smoke    # a CPU-sized subset, to test this script
#
# Steps, each logged to OUT_DIR, each with its own time limit, all run even if one fails:
#   env.txt      commit, device, torch/triton/python versions
#   tests.log    the test-suite with the Triton kernels compiled for real (FASTRES_AUTOTUNE=0:
#                one config per shape class, so hundreds of tiny test shapes are not autotuned)
#   demo.log     python -m fastres demo: resnet50 converted, checked, launches, timings
#   zoo_demo.log the same for torchvision's efficientnet_b0 (depthwise convs, SE gates, SiLU)
#                and regnet_y_400mf (grouped convs, SE gates, 1x1 projection shortcuts)
#   gate.log     the timing-free perf-regression gate
#   bench/       python -m fastres bench --quick --level layer,model,train: raw.json, results.json,
#                results.csv, speedup.png (bench.log: its table)
#   timing_gate.log   the GPU half of the gate against benchmarks/baselines/<gpu>.json, when
#                that baseline exists (otherwise bless bench/results.json after reviewing it)
#   summary.md   one line per step with its exit code, and the headline numbers
# Uses $PYTHON (default python3) with the checkout on PYTHONPATH; installs nothing.
set -uo pipefail

out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--smoke]}"
mode="${2:-full}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export FASTRES_IN_GPU_CHECK=1  # tests/tools/test_gpu_check.py would otherwise run this script again

# The whole check stays under 8 minutes (budget 470 s): the tests, demo and gate have their own
# limits, and the benchmark gets whatever they left. A step that runs out is killed and the
# next one runs.
if [ "$mode" = "--smoke" ]; then
    test_args=(tests/kernels/test_conv_kernel.py -k "1x1_residual_norelu and fp32")
    demo_args=(--model resnet18 --batch 1 --size 32 --iters 2 --no-interpreter-check)
    bench_args=(--level layer --providers eager_cl,fastres)
    limit_tests=120 limit_demo=60 budget=400
else
    test_args=(tests)
    demo_args=()
    bench_args=(--quick --level layer,model,train)
    limit_tests=200 limit_demo=60 budget=470
fi
started=$(date +%s)

{
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit:  $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    "$py" - <<'PY'
import platform, torch, triton
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device:  {dev}")
print(f"python:  {platform.python_version()}  torch: {torch.__version__}  triton: {triton.__version__}")
PY
} > "$out/env.txt" 2>&1

declare -A rc
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc[$name]=$?
    echo "[gpu_check] $name: exit ${rc[$name]} in $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
}

: > "$out/steps.txt"
step tests "$limit_tests" env FASTRES_AUTOTUNE=0 "$py" -m pytest -q -p no:cacheprovider \
    --junitxml="$out/tests.xml" "${test_args[@]}"
step demo "$limit_demo" "$py" -m fastres demo "${demo_args[@]}"
if [ "$mode" != "--smoke" ]; then
    step zoo_demo 60 bash -c "'$py' -m fastres demo --model efficientnet_b0 && \
        '$py' -m fastres demo --model regnet_y_400mf"
fi
step gate 40 "$py" -m fastres gate
limit_bench=$(( budget - 20 - ($(date +%s) - started) ))
[ "$limit_bench" -ge 60 ] || limit_bench=60
step bench "$limit_bench" "$py" -m fastres bench "${bench_args[@]}" --out "$out/bench"
if [ -f "$out/bench/results.json" ] && [ "$mode" != "--smoke" ]; then
    step timing_gate 20 "$py" -m fastres gate --timings "$out/bench/results.json"
fi

{
    echo "# fastres GPU check"
    echo
    sed 's/^/    /' "$out/env.txt"
    echo
    echo "| step | exit code | result |"
    echo "|---|---|---|"
    echo "| tests | ${rc[tests]} | $(grep -E '[0-9]+ (passed|failed)' "$out/tests.log" | tail -1) |"
    echo "| demo | ${rc[demo]} | $(tail -1 "$out/demo.log") |"
    if [ -n "${rc[zoo_demo]:-}" ]; then
        echo "| zoo demo | ${rc[zoo_demo]} | $(tail -1 "$out/zoo_demo.log") |"
    fi
    echo "| gate | ${rc[gate]} | $(tail -1 "$out/gate.log" | cut -c1-80) |"
    echo "| bench | ${rc[bench]} | $(tail -1 "$out/bench.log" | cut -c1-80) |"
    if [ -n "${rc[timing_gate]:-}" ]; then
        echo "| timing gate | ${rc[timing_gate]} | $(tail -1 "$out/timing_gate.log" | cut -c1-80) |"
    fi
    echo
    echo "Demo timings:"
    echo
    grep -E "^  (original|fastres|ratio) " "$out/demo.log" | sed 's/^/    /'
    if [ -f "$out/zoo_demo.log" ]; then
        grep -E "^  (original|fastres|ratio) |^model" "$out/zoo_demo.log" | sed 's/^/    /'
    fi
    echo
    echo "Benchmark table (median ms per call; fastres speedups; roofline fraction):"
    echo
    sed -n '/^level /,/^(times/p; /^roofline /p' "$out/bench.log" | sed 's/^/    /'
} > "$out/summary.md"
cat "$out/summary.md"

for name in "${!rc[@]}"; do
    [ "${rc[$name]}" = "0" ] || exit 1
done
