"""Host side of the depthwise kernel (kernels/depthwise.py): its configs and launch.

fastres.launch.conv.fused_conv2d sends a conv here when it is depthwise (groups = C, K a
multiple of C) with no shortcut GEMM, prologue or statistics; validation happened in fastres.ops.
"""
from __future__ import annotations

import os
from typing import Optional

import triton

from fastres import activations
from fastres.kernels.common import INTERPRETED
from fastres.kernels.depthwise import depthwise_conv2d_kernel
from fastres.launch.target import compiling_only

# Under the interpreter a launch costs (programs x taps) x a few ms: one large tile.
INTERPRETER_CONFIG = dict(BLOCK_M=256, BLOCK_C=128, num_warps=4)

# Candidates on a GPU, first the untimed default (FASTRES_AUTOTUNE=0, compile-check). A tile
# is BLOCK_M pixels by BLOCK_C channels: 64 fp16 channels are one 128-byte line of a
# channels_last row, and 16-32 fp32 accumulators per thread leave room for the taps' loads.
GPU_CONFIGS = (dict(BLOCK_M=64, BLOCK_C=64, num_warps=4),
               dict(BLOCK_M=32, BLOCK_C=128, num_warps=4),
               dict(BLOCK_M=128, BLOCK_C=32, num_warps=4),
               dict(BLOCK_M=128, BLOCK_C=64, num_warps=8))

_tuned_kernel = None


def is_depthwise(C: int, K: int, groups: int) -> bool:
    """Whether a conv with C input and K output channels in `groups` groups is depthwise: one
    input channel per group (a channel multiplier K / C of one or more)."""
    return groups > 1 and groups == C and K % C == 0


def _kernel_and_meta(config: Optional[dict]):
    global _tuned_kernel
    if config is not None:
        return depthwise_conv2d_kernel, dict(config)
    if INTERPRETED:
        return depthwise_conv2d_kernel, dict(INTERPRETER_CONFIG)
    if compiling_only() or os.environ.get("FASTRES_AUTOTUNE", "1") == "0":
        return depthwise_conv2d_kernel, dict(GPU_CONFIGS[0])
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_C": c["BLOCK_C"]},
                                   num_warps=c["num_warps"]) for c in GPU_CONFIGS],
            key=["N", "K", "P", "Q", "R", "S", "MULTIPLIER", "POOL"],
            # POOL adds into its buffer: each timed run, and the real one after, start from zero
            reset_to_zero=["pool_ptr"])(depthwise_conv2d_kernel)
    return _tuned_kernel, {}


def depthwise_conv2d(x, weight, bias, residual, out, stride, padding, dilation, activation,
                     rows_dense, config: Optional[dict] = None, pool=None):
    """Launch the depthwise kernel into `out` (N, K, P, Q), any strides.

    x: (N, C, H, W); weight: (K, 1, R, S); bias: fp32 (K,) or None; residual: (N, K, P, Q) or
    None; activation: anything fastres.activations.resolve takes; rows_dense(t): whether t's
    row m = (n, p, q) sits at m * stride_w (fastres.launch.conv). config: BLOCK_M, BLOCK_C,
    num_warps to launch with instead of the chosen ones. pool: fp32 (N, K) zeros to add the
    output's per-(image, channel) sums into (kernels/depthwise.py POOL)."""
    act, slope = activations.resolve(activation)
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    _, _, P, Q = out.shape
    kernel, meta = _kernel_and_meta(config)
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)

    def grid(m):
        return (triton.cdiv(N * P * Q, m["BLOCK_M"]), triton.cdiv(K, m["BLOCK_C"]))

    kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        out, pool if pool is not None else out, N, H, W, K, P, Q, *x.stride(), weight.stride(0),
        weight.stride(2), weight.stride(3),
        *res_strides, *out.stride(), stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1], slope,
        R=R, S=S, MULTIPLIER=K // C, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=activations.code(act),
        SPATIAL_MASK=not (R == S == 1 and tuple(padding) == (0, 0)),
        OUT_ROWS_DENSE=rows_dense(out),
        RES_ROWS_DENSE=residual is not None and rows_dense(residual), POOL=pool is not None,
        **meta)
    return out
