"""Host side of the fused conv kernel (kernels/conv.py): choose its config and launch it.

Validation of user input happens in fastres.ops; this only asserts the layout it relies on.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from fastres.kernels.common import INTERPRETED
from fastres.kernels.conv import fused_conv2d_kernel
from fastres.launch import configs
from fastres.launch.configs import STATS_CHUNK
from fastres.launch.target import compiling_only

# Under the interpreter the cost is (programs x loop steps) x a few ms, so one large block is used
# (tests that need several channel blocks per tap, or nested ones, force small configs).
INTERPRETER_CONFIG = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=256, GROUP_M=8)

_launches = 0
_tuned_kernel = None


def launch_count() -> int:
    """Number of fused-conv kernel launches made by this process (for launch-count checks)."""
    return _launches


def stats_chunks(M: int) -> int:
    """Number of STATS_CHUNK-row partials the STATS epilogue writes for M = N*P*Q output rows."""
    return triton.cdiv(M, STATS_CHUNK)


def use_flat_reduction(C: int, R: int, S: int) -> bool:
    """Flatten (r, s, c) when channels are few: a channel loop would pad each tap to BLOCK_K."""
    return C < 32 and R * S > 1


# A filter tap with at least this many channel blocks loops over its channels in an inner loop
# of its own (NESTED): as compiled for sm_90, one flat loop then costs more instructions per
# tile (per-step tap bookkeeping) than it saves in pipeline drains (compile-check --sass).
NESTED_MIN_CHANNEL_BLOCKS = 4

# The channel-mask-free loop needs C % BLOCK_K == 0, and BLOCK_K comes with the config: these
# constexprs are derived per launch from whichever config runs (autotuned or not).
_kernel = triton.heuristics(values={
    "EVEN_C": lambda args: args["C"] % args["BLOCK_K"] == 0,
    "EVEN_C2": lambda args: not args["HAS_SHORTCUT"] or args["C2"] % args["BLOCK_K"] == 0,
    "NESTED": lambda args: (args["R"] * args["S"] > 1
                            and triton.cdiv(args["C"], args["BLOCK_K"]) >= NESTED_MIN_CHANNEL_BLOCKS),
})(fused_conv2d_kernel)


def _build_tuned_kernel():
    """The autotuned kernel for real GPUs: every curated config, pruned to the shape's class."""
    return triton.autotune(
        configs=configs.all_tuning_configs(),
        key=["N", "C", "K", "P", "Q", "C2", "R", "S", "HAS_SHORTCUT", "HAS_RESIDUAL", "PROLOGUE",
             "STATS"],
        prune_configs_by={"early_config_prune": configs.prune_to_shape_class},
    )(_kernel)


def _kernel_and_meta(M: int, C: int, K: int, R: int, S: int, flat: bool, stats: bool,
                     elem_bytes: int, config: Optional[dict]):
    """The kernel to launch and the meta-parameters the launch must pass itself.

    config: a conv_configs.json entry to use as it is (compile-check compiles each one).
    FASTRES_AUTOTUNE=0 (read per launch), and compile-only launches, skip autotuning and take
    the first candidate config: for the test-suite, whose hundreds of small shapes would
    otherwise each be benchmarked, and for debugging."""
    global _tuned_kernel
    if config is not None:  # (also under the interpreter: tests force small channel blocks)
        return _kernel, configs.launch_meta(config)
    if INTERPRETED:
        return _kernel, dict(INTERPRETER_CONFIG)
    if compiling_only() or os.environ.get("FASTRES_AUTOTUNE", "1") == "0":
        first = configs.candidate_configs(M=M, C=C, K=K, R=R, S=S, flat=flat,
                                          elem_bytes=elem_bytes, stats=stats)[0]
        return _kernel, configs.launch_meta(first)
    if _tuned_kernel is None:
        _tuned_kernel = _build_tuned_kernel()
    return _tuned_kernel, {}


def _image_extent(t) -> int:
    """1 + the largest element offset within one image (batch index 0) of a 4-D tensor."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _rows_dense(t) -> bool:
    """Whether output row m = (n, p, q) of the (N, K, P, Q) tensor t starts at m * stride_w:
    the pixels of all images form one evenly strided sequence (dense channels_last, or any
    layout whose batch and height strides follow from the width stride)."""
    N, _, P, Q = t.shape
    s_n, _, s_h, s_w = t.stride()
    return (P == 1 or s_h == Q * s_w) and (N == 1 or s_n == P * Q * s_w)


def fused_conv2d(x, weight, bias, residual, x2, weight2, out, stride, padding, dilation,
                 stride2, relu: bool, fp32_precision: str = "ieee", flat_reduction=None,
                 index_64=None, prologue=None, stats=None, config: Optional[dict] = None):
    """Launch the fused kernel, writing into `out` (N, K, P, Q) of any strides.

    x: (N, C, H, W); weight: (K, C, R, S) any strides; bias: fp32 (K,) or None;
    residual: (N, K, P, Q) or None; x2/weight2: shortcut input (N, C2, H2, W2) and its 1x1 weight
    (K, C2, 1, 1), or None.
    prologue: (scale, shift), fp32 (C,) each: x is read as relu(x * scale + shift) per channel.
    stats: fp32 (stats_chunks(M), 2, K) to fill with per-chunk (mean, M2) of the output.
    flat_reduction / index_64: None chooses by the problem; tests force each variant.
    config: a conv_configs.json entry to launch with instead of the chosen one.
    """
    global _launches
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    _, _, P, Q = out.shape
    has_shortcut = x2 is not None
    if has_shortcut:
        _, C2, H2, W2 = x2.shape
        x2_strides, w2_strides = x2.stride(), weight2.stride()
    else:
        C2 = H2 = W2 = 1
        x2, weight2 = x, weight  # placeholders, never read
        x2_strides, w2_strides = (0, 0, 0, 0), (0, 0, 0, 0)
    if flat_reduction is None:
        flat_reduction = use_flat_reduction(C, R, S)
    # Row bases are always 64-bit; offsets within one image (taps, channels) only need it when
    # an image's extent passes 2^31 elements.
    if index_64 is None:
        index_64 = max(_image_extent(x), _image_extent(x2) if has_shortcut else 0) >= 2 ** 31
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    if x.dtype != torch.float32:
        fp32_precision = "tf32"  # the compiler's default; only fp32 operands look at it
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    M = N * P * Q
    if stats is not None and tuple(stats.shape) != (stats_chunks(M), 2, K):
        raise ValueError(f"stats buffer must be {(stats_chunks(M), 2, K)}, got {tuple(stats.shape)}")
    kernel, meta = _kernel_and_meta(M, C, K, R, S, flat_reduction, stats is not None,
                                    x.element_size(), config)
    scale, shift = prologue if prologue is not None else (out, out)  # placeholders, never read

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_N"]),)

    kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        x2, weight2, out, scale, shift, stats if stats is not None else out,
        N, C, H, W, K, P, Q, C2, H2, W2,
        *x.stride(), *weight.stride(), *x2_strides, w2_strides[0], w2_strides[1], *res_strides,
        *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        stride2[0], stride2[1],
        R=R, S=S, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_SHORTCUT=has_shortcut, APPLY_RELU=relu, FLAT_C=C if flat_reduction else 0,
        SPATIAL_MASK=not (R == S == 1 and tuple(padding) == (0, 0)),
        OUT_ROWS_DENSE=_rows_dense(out), RES_ROWS_DENSE=residual is not None and _rows_dense(residual),
        UPCAST=upcast, INPUT_PRECISION=fp32_precision, INDEX_64=index_64,
        PROLOGUE=prologue is not None, STATS=stats is not None, STATS_CHUNK=STATS_CHUNK, **meta)
    _launches += 1
    return out
