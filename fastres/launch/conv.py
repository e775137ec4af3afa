"""Host side of the fused conv kernel (kernels/conv.py): choose its config and launch it.

Validation of user input happens in fastres.ops; this only asserts the layout it relies on.
"""
from __future__ import annotations

import os
import weakref
from typing import Optional, Tuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from fastres import activations
from fastres.kernels.common import INTERPRETED
from fastres.kernels.conv import fused_conv2d_kernel
from fastres.launch import configs
from fastres.launch.configs import STATS_CHUNK
from fastres.launch.depthwise import depthwise_conv2d, is_depthwise
from fastres.launch.target import compiling_only, current_target

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
    "ROW_SPAN": lambda args: config_row_span(args),
    "PADDED_ROWS": lambda args: args["ROW_SPAN"] and padded_rows(args["w_ptr"], args["BLOCK_K"]),
    "TILE_W": lambda args: tile_width(args),
    "TMA": lambda args: args["x_desc"] is not None and (args["R"] * args["S"] == 1 or args["TILE_W"] > 0),
    "TMA_SHORTCUT": lambda args: args["x2_desc"] is not None,
    "EPILOGUE_TMA": lambda args: args["o_desc"] is not None,
})(fused_conv2d_kernel)

# TMA needs sm_90 and 16-byte aligned base addresses and row strides.
TMA_MIN_ARCH = 90
TMA_ALIGN_BYTES = 16
MIN_DESCRIPTOR_BLOCK = 16  # a descriptor's block shape until the config's is set


# A conv over output patches (TILE_W > 0) computes BLOCK_M rows per tile whether or not they
# lie in the image: it is used only where the patches cover at least this much of it.
MIN_PATCH_FILL = 7 / 8


def patch_width(C: int, block_k: int, block_m: int, P: int, Q: int, elem_bytes: int = 2) -> int:
    """TILE_W for a conv over output patches loaded by TMA, or 0 for the pointer path.

    Patches only where a filter tap is one channel block (C == BLOCK_K), or two in fp32: there
    the pointer path's per-tap bounds and addresses are most of the per-step cost, and the
    patch loop's per-step register round trip of the 4-D tile costs less. Compiled for sm_90,
    instructions per tile as patches against the pointer loop (first configs unless noted):

      64-channel 3x3 at 56x56, fp16, BLOCK_K 64 (one block per tap)    2840 -> 2015  (-29%)
      the same in fp32, BLOCK_K 32 (two blocks)                       4681 -> 3276  (-30%)
      the same in fp16 at BLOCK_K 32 (two blocks)                      2991 -> 2824   (-6%)
      128-channel 3x3 at 28x28, fp16, BLOCK_K 64 (two blocks)          3072 -> 2925   (-5%)
      the same at BLOCK_K 32 (four blocks; the pointer loop nests)     3709 -> 4742  (+28%)

    and the patches compute rows outside the image too (1/8 of them at 56x56 and 28x28), which
    the fp16 gains with two blocks per tap do not pay for. Then the patch that fits the output
    best (fitting_patch_width)."""
    if not (C == block_k or (elem_bytes == 4 and C == 2 * block_k)):
        return 0
    return fitting_patch_width(block_m, P, Q)


def fitting_patch_width(block_m: int, P: int, Q: int) -> int:
    """The TILE_W of the TILE_H x TILE_W output patch (TILE_H * TILE_W = BLOCK_M, both powers
    of two) that wastes the fewest rows of a P x Q output; among equals the squarest (the
    least input around it to load per tap), then the widest; 0 if even that covers less than
    MIN_PATCH_FILL of the rows it computes (e.g. 14x14 or 7x7 outputs)."""
    candidates = []
    width = 4
    while width <= block_m:
        height = block_m // width
        fill = (P / (triton.cdiv(P, height) * height)) * (Q / (triton.cdiv(Q, width) * width))
        candidates.append((fill, -(height + width), width))
        width *= 2
    best_fill, _, best = max(candidates)
    return best if best_fill >= MIN_PATCH_FILL else 0


def tile_width(args: dict) -> int:
    """The launch's TILE_W (kernels/conv.py), from its arguments and config: output patches
    loaded by TMA (a patch descriptor), or for the flattened reduction in ROW_SPAN order (the
    stem), patches read by pointers. A patch's rows are found with shifts (TILE_W and TILE_H
    are powers of two) where BLOCK_M consecutive rows need two runtime divisions per row:
    compiled for sm_90, the stem's instructions per tile fell by 19% as patches (fp16,
    3611 -> 2924). Not with STATS, whose partials are runs of consecutive rows."""
    if _is_patch_descriptor(args["x_desc"]):
        return patch_width(args["C"], args["BLOCK_K"], args["BLOCK_M"], args["P"], args["Q"],
                           args["x_desc"].base.element_size())
    if config_row_span(args) and not args["STATS"]:
        return fitting_patch_width(args["BLOCK_M"], args["P"], args["Q"])
    return 0


def row_tiles(N: int, P: int, Q: int, block_m: int, tile_w: int) -> int:
    """Row tiles of a launch (the grid is this times cdiv(K, BLOCK_N)): BLOCK_M consecutive
    output rows each, or with output patches (TILE_W > 0) one TILE_H x TILE_W patch each."""
    if tile_w:
        return N * triton.cdiv(P, block_m // tile_w) * triton.cdiv(Q, tile_w)
    return triton.cdiv(N * P * Q, block_m)


def _is_patch_descriptor(desc) -> bool:
    return desc is not None and len(desc.shape) == 4


def set_descriptor_blocks(nargs: dict) -> None:
    """Give the launch's tensor descriptors the block shapes of the config it runs with (also a
    triton.Config pre_hook: the autotuner times each config with its own blocks). The output's
    and residual's descriptors also take the tile's shape: [N*P*Q, K] matrices for runs of
    rows, 4-D [N, P, Q, K] tensors for output patches (TILE_W > 0)."""
    width = tile_width(nargs)
    for name in ("o_desc", "r_desc"):
        desc = nargs.get(name)
        if desc is None:
            continue
        t = desc.base  # (N, K, P, Q), dense channels_last rows (epilogue_descriptors)
        N, K, P, Q = t.shape
        if width:
            desc.shape, desc.strides = [N, P, Q, K], [t.stride(0), t.stride(2), t.stride(3), 1]
            desc.block_shape = [1, nargs["BLOCK_M"] // width, width, nargs["BLOCK_N"]]
        else:
            desc.shape, desc.strides = [N * P * Q, K], [t.stride(3), 1]
            desc.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]
    for x_name, w_name in (("x_desc", "w_desc"), ("x2_desc", "w2_desc")):
        desc = nargs.get(x_name)
        if desc is None:
            continue
        nargs[w_name].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
        if _is_patch_descriptor(desc):
            # (a config whose patches do not fit the output, TILE_W = 0, leaves it unused)
            desc.block_shape = [1, nargs["BLOCK_M"] // max(width, 1), max(width, 1), nargs["BLOCK_K"]]
        else:
            desc.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]


def _aligned(t, stride: int) -> bool:
    return (t.data_ptr() % TMA_ALIGN_BYTES == 0 and stride * t.element_size() % TMA_ALIGN_BYTES == 0
            and t.numel() > 0)


def gemm_descriptors(x, weight, stride, padding) -> Tuple[Optional[TensorDescriptor], ...]:
    """Tensor descriptors (x as the [N*H*W, C] matrix, the weight as the [K, C] one) when the
    conv is a plain GEMM that TMA can load: 1x1, stride 1, unpadded, x dense channels_last and
    the weight's channels contiguous, both 16-byte aligned; else (None, None). Block shapes
    are set per config by set_descriptor_blocks.

    Only 1x1 convs: for a 3x3 (and a strided 1x1), loading the weight alone by TMA beside
    pointer loads of x compiled for sm_90 to more instructions per tile, not fewer
    (compile-check --sass: +3% to +40%)."""
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    if not (R == S == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and x.stride(1) == 1 and _rows_dense(x) and _aligned(x, x.stride(3))
            and weight.stride(1) == 1 and _aligned(weight, weight.stride(0))):
        return None, None
    return (TensorDescriptor(x, [N * H * W, C], [x.stride(3), 1], [MIN_DESCRIPTOR_BLOCK] * 2),
            TensorDescriptor(weight, [K, C], [weight.stride(0), 1], [MIN_DESCRIPTOR_BLOCK] * 2))


def patch_descriptors(x, weight, stride, flat: bool, stats: bool, prologue: bool = False
                      ) -> Tuple[Optional[TensorDescriptor], ...]:
    """Tensor descriptors for a stride-1 conv with a filter larger than 1x1 over output patches
    (TILE_W): x as the 4-D [N, H, W, C] tensor (channels contiguous, 16-byte aligned pixels)
    and the weight as the [K, R*S*C] matrix of a (K, R, S, C) weight; else (None, None). Not
    for the flattened stem reduction, nor with STATS, whose partials are per run of rows, nor
    with the training prologue, which the patch loop does not apply."""
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    sk, sc, sr, ss = weight.stride()
    if not (R * S > 1 and tuple(stride) == (1, 1) and not flat and not stats and not prologue
            and x.stride(1) == 1
            and all(_aligned(x, st) for st in (x.stride(0), x.stride(2), x.stride(3)))
            and sc == 1 and ss == C and sr == S * C and _aligned(weight, sk)):
        return None, None
    return (TensorDescriptor(x, [N, H, W, C], [x.stride(0), x.stride(2), x.stride(3), 1],
                             [1, 1, MIN_DESCRIPTOR_BLOCK, MIN_DESCRIPTOR_BLOCK]),
            TensorDescriptor(weight, [K, R * S * C], [sk, 1], [MIN_DESCRIPTOR_BLOCK] * 2))


def epilogue_descriptors(out, residual) -> Tuple[Optional[TensorDescriptor], ...]:
    """(o_desc, r_desc): the output, and the residual if any, as [N*P*Q, K] matrices, when both
    are dense channels_last (rows evenly spaced, channels contiguous) and 16-byte aligned; else
    (None, None). set_descriptor_blocks makes them 4-D for output patches."""
    def matrix(t):
        N, K, P, Q = t.shape
        if t.stride(1) == 1 and _rows_dense(t) and _aligned(t, t.stride(3)):
            return TensorDescriptor(t, [N * P * Q, K], [t.stride(3), 1], [MIN_DESCRIPTOR_BLOCK] * 2)
        return None

    o_desc = matrix(out)
    r_desc = matrix(residual) if residual is not None and o_desc is not None else None
    if o_desc is None or (residual is not None and r_desc is None):
        return None, None
    return o_desc, r_desc


def use_tma(tma: Optional[bool]) -> bool:
    """Whether to load plain-GEMM operands by TMA. tma: None = on targets that have it (sm_90+),
    not under the interpreter (whose tensor descriptors the tests exercise with True); True =
    there too; False = never. FASTRES_TMA=0 turns it off (A/B comparisons on a GPU)."""
    if os.environ.get("FASTRES_TMA", "1") == "0" or tma is False:
        return False
    return (tma and INTERPRETED) or (not INTERPRETED and current_target().arch >= TMA_MIN_ARCH)


def row_span_fits(S: int, C: int, block_k: int) -> bool:
    """Whether the flattened reduction reads one filter row (S*C elements) per step: it must fit
    BLOCK_K, and fill more than half of it (a 64-wide step would do 7 steps of 21 elements where
    the plain flattened loop does 3 of 64)."""
    return C > 0 and S * C <= block_k < 2 * S * C


def config_row_span(args: dict) -> bool:
    """The launch's ROW_SPAN for its config: the layout allows it (the launch's ROW_SPAN
    argument, row_span_layout) and a filter row suits this BLOCK_K. (Also for the autotuner's
    pre_hook, which sees the arguments before the heuristics refine them.)"""
    return bool(args["ROW_SPAN"]) and row_span_fits(args["S"], args["FLAT_C"], args["BLOCK_K"])


def padded_row_length(C: int, R: int, S: int) -> int:
    """The length (elements) to which fastres's folded weights pad each filter row of a conv
    reduced over the flattened index (kernel_weight_layout in fastres/nn/folding.py), or 0 for
    no padding: the power of two that holds a row's S*C elements, the one BLOCK_K that reads a
    row per step (row_span_fits)."""
    if not use_flat_reduction(C, R, S):
        return 0
    return triton.next_power_of_2(S * C)


# The buffers behind weights whose filter rows fastres padded with zeros itself (by id: a
# tensor's == is elementwise), alive as long as the weights are (fastres's fold caches).
_zero_padded_buffers: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def mark_zero_padded(buffer) -> None:
    """Record that `buffer` is a (K, R, row) tensor of filter rows padded with zeros, which
    nothing writes again (kernel_weight_layout in fastres/nn/folding.py)."""
    _zero_padded_buffers[id(buffer)] = buffer


def padded_rows(weight, block_k: int) -> bool:
    """Whether the kernel may read BLOCK_K elements from the start of every filter row of this
    (K, C, R, S) weight, past its S*C, and multiply them with the zeros it loads for x there:
    only where those elements are known zeros (a buffer recorded by mark_zero_padded; anything
    else there could be an Inf or NaN, and 0 * Inf is NaN), with the rows 16-byte aligned and
    the storage holding the last row's reads, and each of the weight's rows starting where a
    row of the buffer does (a view shifted along a row would read the next row's weights)."""
    buffer = next((t for t in (weight, weight._base)
                   if t is not None and _zero_padded_buffers.get(id(t)) is t), None)
    if buffer is None:
        return False
    K, C, R, S = weight.shape
    sk, sc, sr, ss = weight.stride()
    last_read = weight.storage_offset() + (K - 1) * sk + (R - 1) * sr + block_k
    return (sc == 1 and ss == C and sr >= block_k and sk >= R * sr and sr % 8 == 0
            and sk % 8 == 0 and (weight.storage_offset() - buffer.storage_offset()) % sr == 0
            and last_read * weight.element_size() <= weight.untyped_storage().nbytes())


def row_span_layout(x, weight, dilation) -> bool:
    """Whether each filter row's (s, c) elements are contiguous in x (channels_last, pixels C
    apart, no dilation along w) and in the weight ((K, R, S, C) layout): the flattened
    reduction's ROW_SPAN order (kernels/conv.py)."""
    C = x.shape[1]
    S = weight.shape[3]
    return (x.stride(1) == 1 and x.stride(3) == C and dilation[1] == 1
            and weight.stride(1) == 1 and weight.stride(3) == C and weight.stride(2) >= S * C)


def _build_tuned_kernel():
    """The autotuned kernel for real GPUs: every curated config, pruned to the shape's class."""
    return triton.autotune(
        configs=configs.all_tuning_configs(pre_hook=set_descriptor_blocks),
        key=["N", "C", "K", "P", "Q", "C2", "R", "S", "HAS_SHORTCUT", "HAS_RESIDUAL", "PROLOGUE",
             "STATS", "POOL", "GROUPED"],
        prune_configs_by={"early_config_prune": configs.prune_to_shape_class},
        # POOL adds into its buffer: each timed run, and the real one after them, start from zero
        reset_to_zero=["stats_ptr"],
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
                 stride2, activation, fp32_precision: str = "ieee", flat_reduction=None,
                 index_64=None, prologue=None, stats=None, config: Optional[dict] = None,
                 tma: Optional[bool] = None, groups: int = 1, pool=None):
    """Launch the fused kernel, writing into `out` (N, K, P, Q) of any strides.

    x: (N, C, H, W); weight: (K, C // groups, R, S) any strides; bias: fp32 (K,) or None;
    residual: (N, K, P, Q) or None; x2/weight2: shortcut input (N, C2, H2, W2) and its 1x1 weight
    (K, C2, 1, 1), or None.
    activation: applied before the store: anything fastres.activations.resolve takes (a name, a
    (name, slope) pair, True for ReLU, False for none).
    prologue: (scale, shift), fp32 (C,) each: x is read as relu(x * scale + shift) per channel.
    stats: fp32 (stats_chunks(M), 2, K) to fill with per-chunk (mean, M2) of the output.
    flat_reduction / index_64: None chooses by the problem; tests force each variant.
    config: a conv_configs.json entry to launch with instead of the chosen one.
    tma: load through tensor descriptors where the layout allows: a 1x1 stride-1 conv (and
    shortcut) as a plain GEMM (gemm_descriptors), a larger stride-1 filter over output patches
    (patch_descriptors, where patch_width finds patches that fit the output); None = on sm_90+
    GPUs (use_tma).
    groups: a grouped conv (eval mode: no prologue, no stats) runs the kernel once per group
    (GROUPED, the group in the grid, on the pointer path); a depthwise one (groups = C, no
    shortcut) runs the depthwise kernel instead (fastres.launch.depthwise; config is then its
    own kind of config).
    pool: fp32 (N, K) zeros, to which the launch adds the per-(image, channel) sums of its output
    as stored (the squeeze of an SE gate; not with stats).
    """
    global _launches
    act, slope = activations.resolve(activation)
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    _, _, P, Q = out.shape
    has_shortcut = x2 is not None
    if groups > 1:
        if prologue is not None or stats is not None:
            raise ValueError("fastres conv: grouped convs have no prologue or statistics epilogue")
        if is_depthwise(C, K, groups) and not has_shortcut:
            depthwise_conv2d(x, weight, bias, residual, out, stride, padding, dilation,
                             (act, slope), _rows_dense, config, pool)
            _launches += 1
            return out
        # From here on C and K count one group's channels (the kernel's GROUPED convention).
        C, K = C // groups, K // groups
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
    if pool is not None and (stats is not None or tuple(pool.shape) != (N, K * groups)
                             or pool.dtype != torch.float32 or not pool.is_contiguous()):
        raise ValueError(f"pool buffer must be a contiguous fp32 {(N, K * groups)}, without stats")
    kernel, meta = _kernel_and_meta(M, C, K, R, S, flat_reduction, stats is not None,
                                    x.element_size(), config)
    scale, shift = prologue if prologue is not None else (out, out)  # placeholders, never read
    # (refined per config; a group's pixels are not C apart)
    row_span = flat_reduction and groups == 1 and row_span_layout(x, weight, dilation)
    x_desc = w_desc = x2_desc = w2_desc = o_desc = r_desc = None
    if use_tma(tma) and groups == 1:
        o_desc, r_desc = epilogue_descriptors(out, residual)
        x_desc, w_desc = gemm_descriptors(x, weight, stride, padding)
        if x_desc is None:
            x_desc, w_desc = patch_descriptors(x, weight, stride, flat_reduction, stats is not None,
                                               prologue is not None)
        if has_shortcut and (H2, W2) == (P, Q):
            x2_desc, w2_desc = gemm_descriptors(x2, weight2, stride2, (0, 0))
    if meta:  # the config is known now (the autotuner sets the blocks itself, per config)
        set_descriptor_blocks(dict(meta, x_desc=x_desc, w_desc=w_desc, x2_desc=x2_desc,
                                   w2_desc=w2_desc, o_desc=o_desc, r_desc=r_desc, C=C, P=P, Q=Q,
                                   S=S, FLAT_C=C if flat_reduction else 0, ROW_SPAN=row_span,
                                   STATS=stats is not None))

    def grid(m):
        return (row_tiles(N, P, Q, m["BLOCK_M"], m["TILE_W"]) * triton.cdiv(K, m["BLOCK_N"]),
                groups)

    kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        x2, weight2, out, scale, shift,
        stats if stats is not None else (pool if pool is not None else out),
        x_desc, w_desc, x2_desc, w2_desc, o_desc, r_desc,
        N, C, H, W, K, P, Q, C2, H2, W2,
        *x.stride(), *weight.stride(), *x2_strides, w2_strides[0], w2_strides[1], *res_strides,
        *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        stride2[0], stride2[1], slope,
        R=R, S=S, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_SHORTCUT=has_shortcut, ACTIVATION=activations.code(act), FLAT_C=C if flat_reduction else 0,
        ROW_SPAN=row_span,
        SPATIAL_MASK=not (R == S == 1 and tuple(padding) == (0, 0)),
        OUT_ROWS_DENSE=_rows_dense(out), RES_ROWS_DENSE=residual is not None and _rows_dense(residual),
        UPCAST=upcast, INPUT_PRECISION=fp32_precision, INDEX_64=index_64,
        PROLOGUE=prologue is not None, STATS=stats is not None, STATS_CHUNK=STATS_CHUNK,
        GROUPED=groups > 1, POOL=pool is not None, **meta)
    _launches += 1
    return out
