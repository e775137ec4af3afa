"""One fused convolution kernel family: implicit GEMM with a BN/residual/ReLU epilogue.

The convolution is computed as a GEMM whose rows are output pixels (m = n, p, q), whose columns
are output channels (k) and whose reduction runs over the filter taps and input channels
(r, s, c), in that order, so that a channels_last (NHWC) input is read contiguously along c.
Every tensor is addressed through its strides, so NCHW-contiguous, channels_last and other
strided inputs all work without a copy; the output is written in whatever layout the caller
allocated (fastres allocates it in the input's memory format).

Compile-time options (one kernel, no near-copies):
  HAS_BIAS        add a per-output-channel fp32 bias (the folded BatchNorm shift)
  HAS_RESIDUAL    add a residual tensor of the output's shape (the identity shortcut)
  HAS_SHORTCUT    a second GEMM into the same accumulator: a strided 1x1 conv of a second input
                  (the downsample conv1x1 + BN of a ResNet block), so that shortcut costs no
                  extra launch and its output never touches memory
  APPLY_RELU      ReLU before the store
  FLAT_REDUCTION  reduce over the flattened (r, s, c) index instead of looping over (r, s) and
                  then channel blocks; used when C is small (the 7x7 stem has C = 3), where
                  padding each tap's channel block up to BLOCK_K would waste most of the work
  UPCAST          convert loaded operands to fp32 before tl.dot; needed under Triton's
                  interpreter, which holds bf16 as raw uint16 and gets bf16 dot products wrong
  INPUT_PRECISION "tf32" or "ieee" for fp32 operands on the GPU (ignored for fp16/bf16)
  INDEX_64        64-bit channel offsets, for inputs whose single-image extent passes 2^31
  PROLOGUE        apply a per-input-channel fp32 scale/shift and ReLU to x as it is loaded (the
                  previous layer's training-mode BatchNorm + ReLU, fused into this conv's loads);
                  padding stays zero, as it is zero in the unfused graph after that ReLU
  STATS           write, for every chunk of STATS_CHUNK output rows, the per-channel mean and
                  sum of squared deviations (M2) of the output (fp32): batch statistics for a
                  training-mode BatchNorm, merged stably by kernels/bn_stats.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from fastres.interpreter_support import check_interpreter

# The interpreter is chosen when @triton.jit runs, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETED:
    # Fail here, naming the fix, rather than with numpy's TypeError at the first launch.
    check_interpreter()

# Under the interpreter the cost is (programs x loop steps) x a few ms, so one large block is used.
INTERPRETER_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)
MIN_BLOCK = 16  # tl.dot needs every block dimension >= 16 to compile for a GPU
STATS_CHUNK = 64  # output rows per batch-statistics partial (STATS needs BLOCK_M % 64 == 0)

_launches = 0


def launch_count() -> int:
    """Number of fused-conv kernel launches made by this process (for launch-count checks)."""
    return _launches


# Round fp32 -> bf16 on the bits under the interpreter (see round_to).
_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 v converted to dtype (fp32, fp16 or bf16), rounded to nearest even as the GPU's
    conversion instructions (and torch) round; every kernel store of a result in a tensor's own
    dtype goes through this.

    Triton's interpreter truncates fp32 -> bf16 (its cast passes no rounding mode, and
    fp_downcast_rounding="rtne" does not change that: rtne is the default, so the cast takes the
    same path), which biases every bf16 result toward zero. There the rounding is done on the
    bits instead: add 0x7FFF plus the lowest kept bit and drop the low 16 bits (the carry rounds
    into the exponent, up to inf); a NaN keeps its top bits with the quiet bit set, as the
    addition could carry a NaN's payload into an inf. fp16 needs nothing: numpy rounds it."""
    if dtype == tl.bfloat16 and _BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, (bits >> 16) | 0x40, rounded)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def relu(v):
    """max(v, 0) keeping NaN, as torch.relu does (-inf -> 0, +inf stays): a select, since
    tl.maximum (and the GPU's max instruction) returns the non-NaN operand."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def _bn_relu_prologue(a, c, mask_c, mask_a, scale_ptr, shift_ptr):
    """relu(a * scale[c] + shift[c]) in fp32 for the loaded x tile a, zero where nothing was
    loaded (the padding is zero after the ReLU in the unfused graph too), rounded back to a's
    dtype as the unfused graph stores it."""
    scale = tl.load(scale_ptr + c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + c, mask=mask_c, other=0.0)
    act = relu(a.to(tl.float32) * scale[None, :] + shift[None, :])
    return round_to(tl.where(mask_a, act, 0.0), a.dtype)


@triton.jit
def _accumulate_conv(acc, x_ptr, w_ptr, n_idx, p_idx, q_idx, mask_m, offs_n, mask_n,
                     C, H, W, sxn, sxc, sxh, sxw, swk, swc, swr, sws,
                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale_ptr, shift_ptr,
                     R: tl.constexpr, S: tl.constexpr, FLAT_REDUCTION: tl.constexpr,
                     UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
                     PROLOGUE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[m, k] += sum over (r, s, c) of x[n, c, h, w] * w[k, c, r, s] for one output tile
    (x through the BN + ReLU prologue when PROLOGUE)."""
    offs_kb = tl.arange(0, BLOCK_K)
    row_base = n_idx.to(tl.int64) * sxn  # int64: the batch stride times N can pass 2^31
    h0 = p_idx * stride_h - pad_h
    w0 = q_idx * stride_w - pad_w
    if FLAT_REDUCTION:
        red = R * S * C
        for k0 in range(0, red, BLOCK_K):
            kk = k0 + offs_kb
            c = kk % C
            rs = kk // C
            r = rs // S
            s = rs % S
            h = h0[:, None] + r[None, :] * dil_h
            w = w0[:, None] + s[None, :] * dil_w
            mask_a = (mask_m[:, None] & (kk < red)[None, :] & (h >= 0) & (h < H) & (w >= 0)
                      & (w < W))
            if INDEX_64:
                c = c.to(tl.int64)
            a_off = row_base[:, None] + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw + c[None, :] * sxc
            a = tl.load(x_ptr + a_off, mask=mask_a, other=0.0)
            if PROLOGUE:
                a = _bn_relu_prologue(a, c, kk < red, mask_a, scale_ptr, shift_ptr)
            b_off = offs_n[None, :] * swk + (c * swc + r * swr + s * sws)[:, None]
            b = tl.load(w_ptr + b_off, mask=(kk < red)[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        for rs in range(0, R * S):
            r = rs // S
            s = rs % S
            h = h0 + r * dil_h
            w = w0 + s * dil_w
            valid_m = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_row = row_base + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            w_tap = w_ptr + r * swr + s * sws
            for c0 in range(0, C, BLOCK_K):
                c = c0 + offs_kb
                mask_c = c < C
                if INDEX_64:
                    c = c.to(tl.int64)
                mask_a = valid_m[:, None] & mask_c[None, :]
                a = tl.load(x_ptr + a_row[:, None] + c[None, :] * sxc, mask=mask_a, other=0.0)
                if PROLOGUE:
                    a = _bn_relu_prologue(a, c, mask_c, mask_a, scale_ptr, shift_ptr)
                b = tl.load(w_tap + offs_n[None, :] * swk + c[:, None] * swc,
                            mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def fused_conv2d_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, x2_ptr, w2_ptr, out_ptr, scale_ptr, shift_ptr, stats_ptr,
        N, C, H, W, K, P, Q, C2, H2, W2,
        sxn, sxc, sxh, sxw,
        swk, swc, swr, sws,
        s2n, s2c, s2h, s2w,
        sw2k, sw2c,
        srn, src, srh, srw,
        son, soc, soh, sow,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, stride2_h, stride2_w,
        R: tl.constexpr, S: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
        APPLY_RELU: tl.constexpr, FLAT_REDUCTION: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, PROLOGUE: tl.constexpr,
        STATS: tl.constexpr, STATS_CHUNK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    M = N * P * Q
    # Grouped launch order: GROUP_M row-tiles share each column tile so weights stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group_id = pid // pids_per_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K
    n_idx = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p_idx = pq // Q
    q_idx = pq % Q

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_conv(acc, x_ptr, w_ptr, n_idx, p_idx, q_idx, mask_m, offs_n, mask_n,
                           C, H, W, sxn, sxc, sxh, sxw, swk, swc, swr, sws,
                           stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale_ptr, shift_ptr,
                           R, S, FLAT_REDUCTION, UPCAST, INPUT_PRECISION, INDEX_64, PROLOGUE,
                           BLOCK_K)
    if HAS_SHORTCUT:
        # The downsample branch: a 1x1, unpadded, strided conv of the block input, reduced
        # into the same accumulator (its folded BN shift is already part of the bias).
        acc = _accumulate_conv(acc, x2_ptr, w2_ptr, n_idx, p_idx, q_idx, mask_m, offs_n, mask_n,
                               C2, H2, W2, s2n, s2c, s2h, s2w, sw2k, sw2c, 0, 0,
                               stride2_h, stride2_w, 0, 0, 1, 1, scale_ptr, shift_ptr,
                               1, 1, False, UPCAST, INPUT_PRECISION, INDEX_64, False, BLOCK_K)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if STATS:
        # Per chunk of STATS_CHUNK rows: mean and M2 around that chunk's own mean, so that the
        # merge never subtracts two large sums (no E[x^2] - E[x]^2 cancellation). The chunk
        # size is fixed, not BLOCK_M, so the host knows the layout whatever config runs.
        CHUNKS: tl.constexpr = BLOCK_M // STATS_CHUNK
        vals = tl.reshape(acc, (CHUNKS, STATS_CHUNK, BLOCK_N))
        rows = tl.reshape(mask_m, (CHUNKS, STATS_CHUNK))
        count = tl.maximum(tl.sum(rows.to(tl.float32), axis=1), 1.0)
        mean = tl.sum(tl.where(rows[:, :, None], vals, 0.0), axis=1) / count[:, None]
        dev = tl.where(rows[:, :, None], vals - mean[:, None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        chunk = pid_m * CHUNKS + tl.arange(0, CHUNKS)
        s_off = chunk.to(tl.int64)[:, None] * (2 * K) + offs_n[None, :]
        s_mask = (chunk * STATS_CHUNK < M)[:, None] & mask_n[None, :]
        tl.store(stats_ptr + s_off, mean, mask=s_mask)
        tl.store(stats_ptr + s_off + K, m2, mask=s_mask)
    n64 = n_idx.to(tl.int64)
    if HAS_RESIDUAL:
        r_off = (n64 * srn + p_idx.to(tl.int64) * srh + q_idx.to(tl.int64) * srw)[:, None] \
            + offs_n.to(tl.int64)[None, :] * src
        acc += tl.load(res_ptr + r_off, mask=mask_out, other=0.0).to(tl.float32)
    if APPLY_RELU:
        acc = relu(acc)
    o_off = (n64 * son + p_idx.to(tl.int64) * soh + q_idx.to(tl.int64) * sow)[:, None] \
        + offs_n.to(tl.int64)[None, :] * soc
    tl.store(out_ptr + o_off, round_to(acc, out_ptr.dtype.element_ty), mask=mask_out)


# ---------------------------------------------------------------------------------------------
# Tuning configurations: data (conv_configs.json), selected per problem shape, then autotuned.

_CONFIG_FILE = Path(__file__).with_name("conv_configs.json")


def load_config_table(path: Path = _CONFIG_FILE) -> dict:
    with open(path) as f:
        table = json.load(f)
    for entry in table["classes"]:
        for cfg in entry["configs"]:
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                if cfg[key] < MIN_BLOCK:
                    raise ValueError(f"{path}: {key}={cfg[key]} < {MIN_BLOCK} in class {entry['name']}")
    return table


def shape_class(table: dict, *, M: int, C: int, K: int, R: int, S: int, flat: bool) -> str:
    """Name of the first class in the table whose conditions the problem meets."""
    facts = dict(M=M, C=C, K=K, R=R, S=S, flat=flat)
    for entry in table["classes"]:
        ok = True
        for key, cond in entry.get("when", {}).items():
            value = facts[key]
            if isinstance(cond, dict):
                ok &= value >= cond.get("min", value) and value <= cond.get("max", value)
            else:
                ok &= value == cond
        if ok:
            return entry["name"]
    raise LookupError("conv_configs.json has no catch-all class")


def _to_triton_config(cfg: dict) -> "triton.Config":
    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return triton.Config(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _config_id(cfg: dict) -> tuple:
    return (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"], cfg["num_warps"],
            cfg["num_stages"])


_tuned_kernel = None

# Shared memory the epilogue needs beside the operand staging, as compiled for sm_90 by
# `python -m fastres compile-check`: at most 1 KiB plain; with the STATS reductions 8-9 KiB for
# tiles up to 128x64 and 33 KiB for 128x128 and 128x256. Estimated (from above) as 2 KiB, plus
# 2 bytes per tile element with STATS.
EPILOGUE_SHARED_BYTES = 2 * 1024
_shared_limit: list = []


def shared_memory_limit() -> int:
    """Shared memory one program may use on the current GPU (the opt-in maximum); the H100's
    227 KiB where no GPU can be asked (python -m fastres compile-check sets its target's)."""
    if not _shared_limit:
        limit = 227 * 1024
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            limit = getattr(props, "shared_memory_per_block_optin", limit)
        _shared_limit.append(limit)
    return _shared_limit[0]


def fits_shared_memory(block_m: int, block_n: int, block_k: int, num_stages: int,
                       elem_bytes: int, stats: bool = False) -> bool:
    """Whether a config's pipelined operand tiles (num_stages copies of the BLOCK_M x BLOCK_K
    and BLOCK_K x BLOCK_N tiles) and its epilogue fit the GPU's shared memory. fp32 needs
    twice fp16's bytes: a config that fits in fp16 can fail to compile in fp32 (the autotuner
    would skip it after a failed compile; FASTRES_AUTOTUNE=0 would fail the launch)."""
    staging = num_stages * (block_m * block_k + block_k * block_n) * elem_bytes
    epilogue = EPILOGUE_SHARED_BYTES + (2 * block_m * block_n if stats else 0)
    return staging + epilogue <= shared_memory_limit()


def prune_to_shape_class(configs, named_args, **kwargs):
    """Triton autotuner's early_config_prune: keep the configs curated for this problem's class
    (conv_configs.json) that fit the GPU's shared memory in this dtype. named_args holds the
    launch's positional arguments, kwargs its constexprs."""
    table = _config_table()
    args = {**named_args, **kwargs}
    name = shape_class(table, M=args["N"] * args["P"] * args["Q"], C=args["C"], K=args["K"],
                       R=args["R"], S=args["S"], flat=bool(args["FLAT_REDUCTION"]))
    wanted = {_config_id(cfg) for entry in table["classes"] if entry["name"] == name
              for cfg in entry["configs"]}
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["GROUP_M"],
                c.num_warps, c.num_stages) in wanted]
    elem = args["x_ptr"].element_size()
    fits = [c for c in configs if fits_shared_memory(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                     c.kwargs["BLOCK_K"], c.num_stages, elem,
                                                     bool(args.get("STATS")))]
    kept = [c for c in kept if c in fits]
    if args.get("STATS"):
        kept = [c for c in (kept or fits) if c.kwargs["BLOCK_M"] % STATS_CHUNK == 0]
    return kept or [c for c in fits if c.kwargs["BLOCK_M"] % STATS_CHUNK == 0][:1]


_table_cache: dict = {}


def _config_table() -> dict:
    if "table" not in _table_cache:
        _table_cache["table"] = load_config_table()
    return _table_cache["table"]


def all_tuning_configs() -> list:
    """Every curated config once, as triton.Config objects (the autotuner's full list)."""
    seen, configs = set(), []
    for entry in _config_table()["classes"]:
        for cfg in entry["configs"]:
            if _config_id(cfg) not in seen:
                seen.add(_config_id(cfg))
                configs.append(_to_triton_config(cfg))
    return configs


def _build_tuned_kernel():
    """The autotuned kernel for real GPUs: every curated config, pruned to the shape's class."""
    return triton.autotune(
        configs=all_tuning_configs(),
        key=["N", "C", "K", "P", "Q", "C2", "R", "S", "HAS_SHORTCUT", "HAS_RESIDUAL", "PROLOGUE",
             "STATS"],
        prune_configs_by={"early_config_prune": prune_to_shape_class},
    )(fused_conv2d_kernel)


def _kernel_and_meta(M: int, C: int, K: int, R: int, S: int, flat: bool, stats: bool = False,
                     elem_bytes: int = 2):
    """The kernel to launch and the meta-parameters the launch must pass itself.

    FASTRES_AUTOTUNE=0 (read per launch) skips autotuning on the GPU and takes the first config
    of the shape's class: for the test-suite, whose hundreds of small shapes would otherwise
    each be benchmarked, and for debugging."""
    global _tuned_kernel
    if INTERPRETED:
        return fused_conv2d_kernel, dict(INTERPRETER_CONFIG)
    if os.environ.get("FASTRES_AUTOTUNE", "1") == "0":
        table = _config_table()
        name = shape_class(table, M=M, C=C, K=K, R=R, S=S, flat=flat)
        every = [c for e in table["classes"] for c in e["configs"]
                 if fits_shared_memory(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"],
                                       elem_bytes, stats)]
        cfgs = [c for c in next(e for e in table["classes"] if e["name"] == name)["configs"]
                if c in every]
        if stats:
            cfgs = [c for c in cfgs if c["BLOCK_M"] % STATS_CHUNK == 0] or [
                c for c in every if c["BLOCK_M"] % STATS_CHUNK == 0]
        cfg = cfgs[0]
        meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        return fused_conv2d_kernel, dict(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if _tuned_kernel is None:
        _tuned_kernel = _build_tuned_kernel()
    return _tuned_kernel, {}


# ---------------------------------------------------------------------------------------------
# Host launcher. Validation of user input happens in fastres.ops; this only asserts invariants.

def use_flat_reduction(C: int, R: int, S: int) -> bool:
    """Flatten (r, s, c) when channels are few: a channel loop would pad each tap to BLOCK_K."""
    return C < 32 and R * S > 1


def fused_conv2d(x, weight, bias, residual, x2, weight2, out, stride, padding, dilation,
                 stride2, relu: bool, fp32_precision: str = "ieee", flat_reduction=None,
                 index_64=None, prologue=None, stats=None):
    """Launch the fused kernel, writing into `out` (N, K, P, Q) of any strides.

    flat_reduction / index_64: None chooses by the problem; tests force each variant.
    prologue: (scale, shift), fp32 (C,) each: x is read as relu(x * scale + shift) per channel.
    stats: fp32 (stats_chunks(M), 2, K) to fill with per-chunk (mean, M2) of the output.

    x: (N, C, H, W); weight: (K, C, R, S) any strides; bias: fp32 (K,) or None;
    residual: (N, K, P, Q) or None; x2/weight2: shortcut input (N, C2, H2, W2) and its 1x1 weight
    (K, C2, 1, 1), or None.
    """
    global _launches
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    _, _, P, Q = out.shape
    has_shortcut = x2 is not None
    if has_shortcut:
        _, C2, H2, W2 = x2.shape
        s2, sw2 = x2.stride(), weight2.stride()
    else:
        C2 = H2 = W2 = 1
        x2, weight2 = x, weight  # placeholders, never read
        s2, sw2 = (0, 0, 0, 0), (0, 0, 0, 0)
    if flat_reduction is None:
        flat_reduction = use_flat_reduction(C, R, S)
    # Row offsets are always 64-bit; channel offsets c * stride_c only need it for huge images.
    if index_64 is None:
        index_64 = max(C * x.stride(1), C2 * s2[1]) >= 2 ** 31
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    if x.dtype != torch.float32:
        fp32_precision = "tf32"  # the compiler's default; only fp32 operands look at it
    sr = residual.stride() if residual is not None else (0, 0, 0, 0)
    M = N * P * Q
    if stats is not None and tuple(stats.shape) != (stats_chunks(M), 2, K):
        raise ValueError(f"stats buffer must be {(stats_chunks(M), 2, K)}, got {tuple(stats.shape)}")
    kernel, meta = _kernel_and_meta(M, C, K, R, S, flat_reduction, stats is not None,
                                    x.element_size())
    scale, shift = prologue if prologue is not None else (out, out)  # placeholders, never read

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_N"]),)

    kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        x2, weight2, out, scale, shift, stats if stats is not None else out,
        N, C, H, W, K, P, Q, C2, H2, W2,
        *x.stride(), *weight.stride(), *s2, sw2[0], sw2[1], *sr, *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        stride2[0], stride2[1],
        R=R, S=S, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_SHORTCUT=has_shortcut, APPLY_RELU=relu, FLAT_REDUCTION=flat_reduction, UPCAST=upcast,
        INPUT_PRECISION=fp32_precision, INDEX_64=index_64, PROLOGUE=prologue is not None,
        STATS=stats is not None, STATS_CHUNK=STATS_CHUNK, **meta)
    _launches += 1
    return out


# ---------------------------------------------------------------------------------------------
# Layout of the STATS epilogue's partials (merged by kernels/bn_stats.py).

def stats_chunks(M: int) -> int:
    """Number of STATS_CHUNK-row partials for an output of M = N*P*Q rows."""
    return triton.cdiv(M, STATS_CHUNK)
