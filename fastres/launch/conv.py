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

# Under the interpreter the cost is (programs x loop steps) x a few ms, so one large block is used.
INTERPRETER_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)

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


def _build_tuned_kernel():
    """The autotuned kernel for real GPUs: every curated config, pruned to the shape's class."""
    return triton.autotune(
        configs=configs.all_tuning_configs(),
        key=["N", "C", "K", "P", "Q", "C2", "R", "S", "HAS_SHORTCUT", "HAS_RESIDUAL", "PROLOGUE",
             "STATS"],
        prune_configs_by={"early_config_prune": configs.prune_to_shape_class},
    )(fused_conv2d_kernel)


def _kernel_and_meta(M: int, C: int, K: int, R: int, S: int, flat: bool, stats: bool,
                     elem_bytes: int, config: Optional[dict]):
    """The kernel to launch and the meta-parameters the launch must pass itself.

    config: a conv_configs.json entry to use as it is (compile-check compiles each one).
    FASTRES_AUTOTUNE=0 (read per launch), and compile-only launches, skip autotuning and take
    the first candidate config: for the test-suite, whose hundreds of small shapes would
    otherwise each be benchmarked, and for debugging."""
    global _tuned_kernel
    if INTERPRETED:
        return fused_conv2d_kernel, dict(INTERPRETER_CONFIG)
    if config is not None:
        return fused_conv2d_kernel, configs.launch_meta(config)
    if compiling_only() or os.environ.get("FASTRES_AUTOTUNE", "1") == "0":
        first = configs.candidate_configs(M=M, C=C, K=K, R=R, S=S, flat=flat,
                                          elem_bytes=elem_bytes, stats=stats)[0]
        return fused_conv2d_kernel, configs.launch_meta(first)
    if _tuned_kernel is None:
        _tuned_kernel = _build_tuned_kernel()
    return _tuned_kernel, {}


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
    # Row offsets are always 64-bit; channel offsets c * stride_c only need it for huge images.
    if index_64 is None:
        index_64 = max(C * x.stride(1), C2 * x2_strides[1]) >= 2 ** 31
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
        HAS_SHORTCUT=has_shortcut, APPLY_RELU=relu, FLAT_REDUCTION=flat_reduction, UPCAST=upcast,
        INPUT_PRECISION=fp32_precision, INDEX_64=index_64, PROLOGUE=prologue is not None,
        STATS=stats is not None, STATS_CHUNK=STATS_CHUNK, **meta)
    _launches += 1
    return out
