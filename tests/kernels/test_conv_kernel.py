"""Every path of the fused conv kernel against a float64 reference.

Paths: 1x1 / 3x3 / 7x7 stem / rectangular kernels; stride 1/2; padding 0/1/3; dilation; odd N, C,
K, H, W; more channels than one BLOCK_K and more outputs than one BLOCK_N; channel-loop and
flattened reductions (and the stem's row-span order); bias, residual, ReLU on/off, the dual GEMM
(downsample shortcut); the TMA paths the sm_90 GPU takes, forced on through the interpreter
(1x1 convs as plain GEMMs, output patches, the epilogue's descriptor store); fp32/fp16/bf16; NCHW
and channels_last. The output buffer is NaN-poisoned and surrounded by a guard region that must
stay untouched.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE_IDS,
    DTYPES,
    FORMAT_IDS,
    FORMATS,
    assert_close,
    is_format,
    record_constexprs,
    relative_error,
    to_format,
)

from fastres import conv_bn_act
from fastres.kernels.common import INTERPRETED
from fastres.launch import configs
from fastres.launch import conv as conv_launch

# name: (N, C, H, W, K, (R, S), stride, padding, dilation, residual, shortcut (C2, stride2), relu)
CASES = {
    "1x1":              (2, 37, 7, 9, 19, (1, 1), (1, 1), (0, 0), (1, 1), False, None, True),
    "1x1_s2":           (2, 20, 9, 9, 24, (1, 1), (2, 2), (0, 0), (1, 1), False, None, True),
    "3x3_p1_odd":       (3, 19, 11, 7, 21, (3, 3), (1, 1), (1, 1), (1, 1), False, None, True),
    "3x3_s2_multiblock": (2, 70, 9, 10, 70, (3, 3), (2, 2), (1, 1), (1, 1), False, None, False),
    "3x3_dil2":         (1, 24, 10, 10, 16, (3, 3), (1, 1), (2, 2), (2, 2), False, None, True),
    "7x7_s2_p3_stem":   (2, 3, 23, 19, 16, (7, 7), (2, 2), (3, 3), (1, 1), False, None, True),
    "5x3_mixed":        (2, 9, 12, 11, 17, (5, 3), (2, 1), (2, 1), (1, 2), False, None, True),
    "3x3_residual":     (2, 21, 8, 9, 21, (3, 3), (1, 1), (1, 1), (1, 1), True, None, True),
    "1x1_residual_norelu": (3, 33, 5, 7, 29, (1, 1), (1, 1), (0, 0), (1, 1), True, None, False),
    "1x1_dual_gemm_s2": (2, 17, 5, 5, 40, (1, 1), (1, 1), (0, 0), (1, 1), False, (23, 2), True),
    "3x3_dual_gemm":    (2, 16, 7, 7, 33, (3, 3), (1, 1), (1, 1), (1, 1), False, (35, 1), False),
}


def make_case(case, dtype, fmt, device):
    N, C, H, W, K, (R, S), stride, padding, dilation, residual, shortcut, relu = case
    L = C * R * S
    x = to_format(torch.randn(N, C, H, W, device=device).to(dtype), fmt)
    w = (torch.randn(K, C, R, S, device=device) / math.sqrt(L)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(K, device=device)
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    res = to_format(torch.randn(N, K, P, Q, device=device).to(dtype), fmt) if residual else None
    sc = None
    if shortcut:
        C2, s2 = shortcut
        x2 = to_format(torch.randn(N, C2, (P - 1) * s2 + 1, (Q - 1) * s2 + 1, device=device).to(dtype), fmt)
        w2 = (torch.randn(K, C2, 1, 1, device=device) / math.sqrt(C2)).to(dtype)
        sc = (x2, w2, (s2, s2))
        L += C2
    return dict(x=x, w=w, bias=bias, res=res, sc=sc, stride=stride, padding=padding,
                dilation=dilation, relu=relu, L=L, shape=(N, K, P, Q))


def reference(c):
    d = torch.float64
    out = F.conv2d(c["x"].to(d), c["w"].to(d), c["bias"].to(d), c["stride"], c["padding"], c["dilation"])
    if c["sc"] is not None:
        x2, w2, s2 = c["sc"]
        out = out + F.conv2d(x2.to(d), w2.to(d), None, s2)
    if c["res"] is not None:
        out = out + c["res"].to(d)
    return torch.relu(out) if c["relu"] else out


def guarded_output(c, dtype, fmt, device):
    """(guard, out): a NaN-poisoned output inside a NaN guard region of one image either side
    (the interpreter does no bounds checks); assert_guard_untouched(guard) after the launch."""
    N, K, P, Q = c["shape"]
    guard = to_format(torch.full((N + 2, K, P, Q), float("nan"), dtype=dtype, device=device), fmt)
    return guard, guard[1:N + 1]


def assert_guard_untouched(guard):
    assert torch.isnan(guard[0]).all() and torch.isnan(guard[-1]).all(), "wrote outside the output"


def with_prologue(c, dtype, device):
    """(scale, shift) for the training prologue, and the case whose x is what the kernel should
    see: relu(x * scale + shift) per channel, rounded to dtype as the unfused graph stores it."""
    C = c["x"].shape[1]
    scale_shift = (torch.rand(C, device=device) + 0.5, torch.randn(C, device=device))
    x = torch.relu(c["x"].double() * scale_shift[0].double()[:, None, None]
                   + scale_shift[1].double()[:, None, None]).to(dtype)
    return scale_shift, dict(c, x=x)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_reference(name, dtype, fmt, device):
    c = make_case(CASES[name], dtype, fmt, device)
    guard, out = guarded_output(c, dtype, fmt, device)
    x2, w2, s2 = c["sc"] if c["sc"] else (None, None, (1, 1))
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], x2, w2, out, c["stride"],
                              c["padding"], c["dilation"], s2, c["relu"], "ieee")
    assert_close(out, reference(c), dtype, c["L"])
    assert_guard_untouched(guard)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "channel_loop"])
@pytest.mark.parametrize("name", ["3x3_p1_odd", "7x7_s2_p3_stem", "5x3_mixed"])
def test_both_reduction_orders(name, flat, device):
    c = make_case(CASES[name], torch.float32, torch.channels_last, device)
    out = torch.full(c["shape"], float("nan"), device=device).contiguous(memory_format=torch.channels_last)
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], None, None, out, c["stride"],
                              c["padding"], c["dilation"], (1, 1), c["relu"], "ieee",
                              flat_reduction=flat)
    assert_close(out, reference(c), torch.float32, c["L"])


# name: (case as in CASES, BLOCK_K): channel blocks that divide C (and C2), so the kernel drops
# its channel masks (EVEN_C), and ones that do not; four or more channel blocks per filter tap,
# which the kernel loops over in a loop of their own (NESTED). The interpreter's default block
# (BLOCK_K 256) divides none of CASES' channel counts and nests none of them.
CHANNEL_BLOCK_CASES = {
    "3x3_even_c_residual": ((2, 32, 7, 6, 24, (3, 3), (1, 1), (1, 1), (1, 1), True, None, True), 16),
    "3x3_nested_even_c": ((2, 64, 6, 5, 24, (3, 3), (1, 1), (1, 1), (1, 1), False, None, True), 16),
    "3x3_nested_uneven_c_dual_gemm": ((2, 70, 6, 5, 24, (3, 3), (2, 2), (1, 1), (1, 1), False, (40, 1), True),
                                      16),
    "1x1_even_c_dual_gemm": ((2, 32, 5, 5, 20, (1, 1), (1, 1), (0, 0), (1, 1), False, (48, 2), True), 16),
    "3x3_uneven_c_dil2": ((2, 24, 9, 8, 24, (3, 3), (2, 1), (2, 2), (2, 2), False, None, True), 16),
}


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("name", list(CHANNEL_BLOCK_CASES))
def test_channel_blocks_that_divide_c(name, fmt, device):
    case, block_k = CHANNEL_BLOCK_CASES[name]
    c = make_case(case, torch.float16, fmt, device)
    guard, out = guarded_output(c, torch.float16, fmt, device)
    x2, w2, s2 = c["sc"] if c["sc"] else (None, None, (1, 1))
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=2, num_warps=4, num_stages=2)
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], x2, w2, out, c["stride"],
                              c["padding"], c["dilation"], s2, c["relu"], "ieee", config=config)
    assert_close(out, reference(c), torch.float16, c["L"])
    assert_guard_untouched(guard)


@pytest.mark.parametrize("name", ["3x3_p1_odd", "7x7_s2_p3_stem", "1x1_dual_gemm_s2"])
def test_64bit_channel_offsets(name, device):
    """INDEX_64 (chosen for images of more than 2^31 elements, too big to test here) forced on."""
    c = make_case(CASES[name], torch.float16, torch.contiguous_format, device)
    out = torch.full(c["shape"], float("nan"), dtype=torch.float16, device=device)
    x2, w2, s2 = c["sc"] if c["sc"] else (None, None, (1, 1))
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], x2, w2, out, c["stride"],
                              c["padding"], c["dilation"], s2, c["relu"], "ieee", index_64=True)
    assert_close(out, reference(c), torch.float16, c["L"])


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_functional_op_keeps_memory_format(dtype, fmt, device):
    c = make_case(CASES["1x1_dual_gemm_s2"], dtype, fmt, device)
    out = conv_bn_act(c["x"], c["w"], c["bias"], stride=c["stride"], padding=c["padding"],
                      dilation=c["dilation"], shortcut=c["sc"], relu=c["relu"])
    assert is_format(out, fmt) and out.dtype == dtype
    assert_close(out, reference(c), dtype, c["L"])


def test_bf16_conv_is_as_accurate_as_torchs(device):
    """Against float64 on the same bf16 operands, a bf16 conv's error is its output rounding:
    both fastres and torch accumulate in fp32 and round once, so their errors must agree up to
    fp32 summation order (measured: equal to 1e-8). A truncated output - what Triton's
    interpreter's own fp32 -> bf16 cast does - is up to a whole ulp off instead of half an ulp,
    all toward zero: twice torch's error (measured: 1.97x), so 1.25x separates the two."""
    N, C, H, W, K = 2, 32, 10, 10, 48
    x = torch.randn(N, C, H, W, device=device).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(K, C, 3, 3, device=device) / math.sqrt(9 * C)).to(torch.bfloat16)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    err = relative_error(conv_bn_act(x, w, None, padding=1, relu=False), ref)
    torch_err = relative_error(F.conv2d(x, w, padding=1), ref)
    assert err <= 1.25 * torch_err, (err, torch_err)


def test_any_strides_input_and_contiguous_weight(device):
    """A non-contiguous view (neither NCHW nor NHWC) and an OIHW-contiguous weight: strides only."""
    base = torch.randn(2, 30, 13, 11, device=device)
    x = base[:, ::2, 1:, :]  # sliced channels and rows
    w = torch.randn(12, 15, 3, 3, device=device) / math.sqrt(135)
    out = conv_bn_act(x, w, torch.zeros(12, device=device), padding=1)
    ref = F.relu(F.conv2d(x.double(), w.double(), padding=1))
    assert_close(out, ref, torch.float32, 135)


def test_empty_batch(device):
    x = torch.randn(0, 8, 5, 5, device=device)
    out = conv_bn_act(x, torch.randn(4, 8, 3, 3, device=device), None, padding=1)
    assert out.shape == (0, 4, 5, 5)


def test_torch_backend_matches(monkeypatch, device):
    """The CPU fast path (folded torch ops) computes the same function as the kernel."""
    c = make_case(CASES["3x3_dual_gemm"], torch.float32, torch.channels_last, device)
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    c["res"] = torch.randn(c["shape"], device=device).contiguous(memory_format=torch.channels_last)
    out = conv_bn_act(c["x"], c["w"], c["bias"], stride=c["stride"], padding=c["padding"],
                      residual=c["res"], shortcut=c["sc"], relu=c["relu"])
    assert is_format(out, torch.channels_last)
    assert_close(out, reference(c), torch.float32, c["L"])


def test_interpreter_config_blocks_are_at_least_16():
    cfg = conv_launch.INTERPRETER_CONFIG
    assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= configs.MIN_BLOCK


def test_gpu_config_table_is_valid_data():
    table = configs.load_config_table()
    names = {e["name"] for e in table["classes"]}
    # Every ResNet-50 conv shape lands in a class; the stem is flat, the rest are not.
    assert configs.shape_class(table, M=256 * 112 * 112, C=3, K=64, R=7, S=7, flat=True) == "stem"
    assert configs.shape_class(table, M=256 * 56 * 56, C=64, K=256, R=1, S=1, flat=False) == "pointwise"
    assert configs.shape_class(table, M=256 * 14 * 14, C=256, K=256, R=3, S=3, flat=False) == "spatial"
    assert configs.shape_class(table, M=49, C=512, K=512, R=3, S=3, flat=False) == "small_m"
    assert {"stem", "pointwise", "spatial", "small_m"} <= names


def test_autotuner_prunes_to_the_shape_class():
    """The GPU path: the full curated list goes to triton.autotune, and each launch keeps only
    its class's configs (run here without a GPU: no benchmarking, just the selection)."""
    table = configs.load_config_table()
    tuning = configs.all_tuning_configs()
    by_class = {e["name"]: {configs.config_id(c) for c in e["configs"]} for e in table["classes"]}
    fp32_by_class = {e["name"]: {configs.config_id(c) for c in e["configs_fp32"]}
                     for e in table["classes"]}
    assert len(tuning) == len(set().union(*by_class.values(), *fp32_by_class.values()))
    half = torch.empty(1, dtype=torch.float16)
    launch = dict(N=256, C=64, K=256, P=56, Q=56, x_ptr=half)
    kept = configs.prune_to_shape_class(tuning, launch, R=1, S=1, FLAT_C=0)
    ids = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["GROUP_M"],
            c.num_warps, c.num_stages) for c in kept}
    assert ids == by_class["pointwise"]
    kept = configs.prune_to_shape_class(tuning, dict(N=256, C=3, K=64, P=112, Q=112, x_ptr=half),
                                        R=7, S=7, FLAT_C=3)
    assert len(kept) == len(by_class["stem"])
    # K = 64 outputs: no config whose BLOCK_N (128) would compute half its MMA on padding.
    kept = configs.prune_to_shape_class(tuning, dict(launch, C=64, K=64), R=3, S=3, FLAT_C=0)
    assert kept and all(c.kwargs["BLOCK_N"] <= 64 for c in kept)
    # fp32 operands take twice the shared memory and registers: fp32 runs its own configs,
    # every one of which fits.
    launch["x_ptr"] = torch.empty(1, dtype=torch.float32)
    kept = configs.prune_to_shape_class(tuning, launch, R=1, S=1, FLAT_C=0)
    ids = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["GROUP_M"],
            c.num_warps, c.num_stages) for c in kept}
    assert ids == fp32_by_class["pointwise"]
    assert all(configs.fits_shared_memory(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                          c.kwargs["BLOCK_K"], c.num_stages, 4) for c in kept)
    assert not configs.fits_shared_memory(128, 256, 64, 3, 4)
    assert configs.fits_shared_memory(128, 128, 64, 3, 4)  # 192 KiB: fits
    assert configs.fits_shared_memory(128, 128, 64, 3, 4, stats=True)  # 225 KiB compiled
    assert configs.fits_shared_memory(128, 256, 64, 3, 2, stats=True)  # fp16: 161 KiB
    tuned = conv_launch._build_tuned_kernel()  # the autotuner accepts the configs
    # each of which gives the tensor descriptors (if any) its own block shapes
    assert all(c.pre_hook is conv_launch.set_descriptor_blocks for c in tuned.configs)


# Plain GEMMs (1x1, stride 1, unpadded, dense channels_last), whose operands sm_90 loads by TMA:
# name: (case as in CASES, TMA for the shortcut GEMM too). C = 40 is not a multiple of BLOCK_K
# (the descriptor's zero fill ends the channels), nor M = N*P*Q of BLOCK_M (it ends the rows).
TMA_CASES = {
    "1x1_uneven_c_residual": ((2, 40, 7, 9, 24, (1, 1), (1, 1), (0, 0), (1, 1), True, None, True), False),
    "1x1_dual_gemm_s1": ((2, 32, 5, 5, 20, (1, 1), (1, 1), (0, 0), (1, 1), False, (48, 1), True), True),
    "1x1_dual_gemm_s2": ((2, 32, 5, 5, 20, (1, 1), (1, 1), (0, 0), (1, 1), False, (48, 2), False), False),
}
TMA_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(TMA_CASES))
def test_tma_gemm_path(name, dtype, prologue, device, monkeypatch):
    """The tensor-descriptor loads (forced on: by default only sm_90 GPUs use them) against the
    float64 reference, with the training prologue (BN + ReLU applied to the loaded x) too."""
    case, tma_shortcut = TMA_CASES[name]
    c = make_case(case, dtype, torch.channels_last, device)
    guard, out = guarded_output(c, dtype, torch.channels_last, device)
    K = c["shape"][1]
    x2, w2, s2 = c["sc"] if c["sc"] else (None, None, (1, 1))
    scale_shift, ref_case = with_prologue(c, dtype, device) if prologue else (None, c)
    seen = record_constexprs(monkeypatch)
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], x2, w2, out, c["stride"],
                              c["padding"], c["dilation"], s2, c["relu"], "ieee",
                              prologue=scale_shift, config=TMA_CONFIG, tma=True)
    tma = conv_launch.use_tma(True)  # the interpreter and sm_90+ GPUs: the test is for them
    assert seen["TMA"] == tma and seen["TMA_SHORTCUT"] == (tma and tma_shortcut)
    # The output (and residual) as [N*P*Q, K] matrices where their rows are 16-byte aligned
    # (K = 20 in fp16 is not).
    rows_aligned = K * out.element_size() % 16 == 0
    assert seen["EPILOGUE_TMA"] == (tma and rows_aligned)
    assert_close(out, reference(ref_case), dtype, c["L"])
    assert_guard_untouched(guard)


# Stride-1 convs with a filter larger than 1x1, over output patches loaded by TMA (4-D
# descriptors; C == BLOCK_K): name: (case as in CASES, patches that need not fill the output).
PATCH_CASES = {
    "3x3_patches_fit_residual": ((2, 32, 8, 16, 24, (3, 3), (1, 1), (1, 1), (1, 1), True, None, True), False),
    "3x3_odd_partial_patches": ((3, 32, 7, 9, 20, (3, 3), (1, 1), (1, 1), (1, 1), False, None, True), True),
    "3x3_dil2_dual_gemm": ((2, 32, 9, 8, 24, (3, 3), (1, 1), (2, 2), (2, 2), False, (40, 2), True), True),
    "5x3_rect_norelu": ((2, 32, 8, 8, 16, (5, 3), (1, 1), (2, 1), (1, 1), True, None, False), False),
    # Two channel blocks per tap (BLOCK_K = C / 2): patches in fp32 only (patch_width).
    "3x3_two_blocks_per_tap": ((2, 32, 8, 16, 24, (3, 3), (1, 1), (1, 1), (1, 1), True, None, True), False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(PATCH_CASES))
def test_tma_patch_path(name, dtype, device, monkeypatch):
    """Output patches whose input the 4-D descriptor loads with the padding as its zero fill,
    partial patches at the image's edges included (MIN_PATCH_FILL lowered to reach them)."""
    case, partial = PATCH_CASES[name]
    if partial:
        monkeypatch.setattr(conv_launch, "MIN_PATCH_FILL", 0.0)
    c = make_case(case, dtype, torch.channels_last, device)
    guard, out = guarded_output(c, dtype, torch.channels_last, device)
    x2, w2, s2 = c["sc"] if c["sc"] else (None, None, (1, 1))
    two_blocks = name == "3x3_two_blocks_per_tap"
    config = dict(TMA_CONFIG, BLOCK_K=c["x"].shape[1] // (2 if two_blocks else 1))
    seen = record_constexprs(monkeypatch)
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], x2, w2, out, c["stride"],
                              c["padding"], c["dilation"], s2, c["relu"], "ieee", config=config,
                              tma=True)
    if conv_launch.use_tma(True):
        patches = not two_blocks or dtype == torch.float32
        assert seen["TMA"] == patches and (seen["TILE_W"] > 0) == patches
        # The output (and residual) stored (loaded) by TMA where rows are 16-byte aligned.
        assert seen["EPILOGUE_TMA"] == (c["shape"][1] * out.element_size() % 16 == 0)
    assert_close(out, reference(c), dtype, c["L"])
    assert_guard_untouched(guard)


def test_training_prologue_keeps_the_pointer_loop_where_patches_would_fit(device, monkeypatch):
    """The patch loop applies no prologue: a launch with one takes the pointer path, correctly."""
    c = make_case(PATCH_CASES["3x3_patches_fit_residual"][0], torch.float16, torch.channels_last, device)
    guard, out = guarded_output(c, torch.float16, torch.channels_last, device)
    scale_shift, ref_case = with_prologue(c, torch.float16, device)
    seen = record_constexprs(monkeypatch)
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], c["res"], None, None, out, c["stride"],
                              c["padding"], c["dilation"], (1, 1), c["relu"], "ieee",
                              prologue=scale_shift, config=dict(TMA_CONFIG, BLOCK_K=32), tma=True)
    assert seen["TILE_W"] == 0 and seen["PROLOGUE"]
    assert_close(out, reference(ref_case), torch.float16, c["L"])
    assert_guard_untouched(guard)


def test_patches_only_where_they_fill_the_output_and_a_tap_is_one_channel_block():
    fit = conv_launch.patch_width
    assert fit(64, 64, 128, 56, 56) == 16  # 8x16 patches: 56 = 3.5 x 16, 7/8 of the rows used
    # (2x64 ones fill as much, but load 264 input pixels per tap against 8x16's 180)
    assert fit(64, 64, 64, 56, 56) == 8  # 8x8 patches tile 56x56 exactly
    assert fit(64, 64, 128, 14, 14) == 0  # 14x14: at best 0.77 of the rows
    assert fit(128, 64, 128, 28, 28) == 0  # two channel blocks per tap: the pointer loop
    assert fit(128, 64, 128, 56, 56, elem_bytes=4) == 16  # ... but in fp32, patches
    assert fit(128, 32, 128, 56, 56, elem_bytes=4) == 0  # four: the pointer loop
    assert fit(32, 64, 128, 56, 56) == 0  # C < BLOCK_K


def test_tma_only_where_the_conv_is_an_aligned_plain_gemm(device, monkeypatch):
    """gemm_descriptors refuses what a 2-D descriptor cannot describe, so those convs keep the
    pointer loads; by default (None) only sm_90+ GPUs use TMA, and FASTRES_TMA=0 turns it off."""
    def descriptors(x, w, stride=(1, 1), padding=(0, 0)):
        return conv_launch.gemm_descriptors(x, w, stride, padding)

    x = torch.randn(2, 32, 5, 5, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 32, 1, 1, device=device, dtype=torch.float16)
    x_desc, w_desc = descriptors(x, w)
    assert x_desc.shape == [50, 32] and x_desc.strides == [32, 1]
    assert w_desc.shape == [16, 32] and w_desc.strides == [32, 1]
    conv_launch.set_descriptor_blocks(dict(TMA_CONFIG, x_desc=x_desc, w_desc=w_desc, S=1, FLAT_C=0,
                                           ROW_SPAN=False, STATS=False))
    assert x_desc.block_shape == [32, 16] and w_desc.block_shape == [16, 16]
    refused = {
        "NCHW": (x.contiguous(), w),
        "3x3": (x, torch.randn(16, 32, 3, 3, device=device, dtype=torch.float16)),
        "rows not 16-byte aligned (C = 20 in fp16)": (
            torch.randn(2, 20, 5, 5, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last),
            torch.randn(16, 20, 1, 1, device=device, dtype=torch.float16)),
        "base not 16-byte aligned": (torch.randn(2 * 25 * 32 + 1, device=device, dtype=torch.float16)[1:]
                                     .view(2, 5, 5, 32).permute(0, 3, 1, 2), w),
        "a cropped image (rows not dense)": (x[:, :, :4], w),
    }
    for why, (xi, wi) in refused.items():
        assert descriptors(xi, wi) == (None, None), why
    # A channel slice of a channels_last tensor is still a plain GEMM (rows 32 apart).
    assert descriptors(x[:, :16], w[:, :16])[0].strides == [32, 1]
    assert descriptors(x, w, stride=(2, 2)) == (None, None)
    assert descriptors(x, w, padding=(1, 1)) == (None, None)
    # Filters larger than 1x1: output patches, stride 1, not with STATS, not NCHW.
    w3 = torch.randn(16, 32, 3, 3, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    x_desc, w_desc = conv_launch.patch_descriptors(x, w3, (1, 1), False, False)
    assert x_desc.shape == [2, 5, 5, 32] and w_desc.shape == [16, 288]
    for why, args in {"stride 2": (x, w3, (2, 2), False, False), "STATS": (x, w3, (1, 1), False, True),
                      "prologue": (x, w3, (1, 1), False, False, True),
                      "NCHW x": (x.contiguous(), w3, (1, 1), False, False),
                      "OIHW weight": (x, w3.contiguous(), (1, 1), False, False),
                      "flat stem": (x, w3, (1, 1), True, False), "1x1": (x, w, (1, 1), False, False)}.items():
        assert conv_launch.patch_descriptors(*args) == (None, None), why
    if INTERPRETED:  # by default the interpreter keeps pointer loads; True forces descriptors
        assert not conv_launch.use_tma(None) and conv_launch.use_tma(True)
    monkeypatch.setenv("FASTRES_TMA", "0")
    assert not conv_launch.use_tma(True)


# The stem's geometry at an output (8 x 15) that 8 x 8 output patches of a 64-row tile cover
# to 15/16, the last patch of each row partial.
STEM_PATCH_CASE = (2, 3, 15, 29, 16, (7, 7), (2, 2), (3, 3), (1, 1), False, None, True)


def padded_weight(w, gap_value=None):
    """w as fastres's eval folding lays it out (filter rows zero-padded to 32 elements), or
    with gap_value: the same strides over a buffer fastres did not fill, gaps = gap_value."""
    from fastres.nn.folding import kernel_weight_layout

    if gap_value is None:
        return kernel_weight_layout(w)
    K, C, R, S = w.shape
    rows = torch.full((K, R, 32), gap_value, dtype=w.dtype, device=w.device)
    rows[:, :, :S * C] = w.permute(0, 2, 3, 1).reshape(K, R, S * C)
    return rows[:, :, :S * C].unflatten(2, (S, C)).permute(0, 3, 1, 2)


STEM_VARIANTS = ["plain", "prologue", "index_64", "block_k_16", "block_k_64", "patches",
                 "patches_prologue", "patches_tma_epilogue",
                 "padded_weight", "padded_weight_block_k_16", "foreign_padded_weight"]


@pytest.mark.parametrize("variant", STEM_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stem_row_span(dtype, variant, device, monkeypatch):
    """The stem's ROW_SPAN reduction (channels_last x, (K, R, S, C) weight: one filter row's
    S*C elements per step) with the training prologue and 64-bit offsets; with BLOCK_K below
    S*C = 21, or at twice it and above, the kernel takes the flattened (r, s, c) loop instead.
    Where output patches fit, the tile is one (TILE_W), stored by TMA as a 4-D box if asked
    (the interpreter does not by default); a weight folded by fastres (rows
    zero-padded to 32) is read without a mask along the row (PADDED_ROWS), but the same
    strides over gaps fastres did not write (here NaN) are not trusted."""
    case = STEM_PATCH_CASE if "patches" in variant or "padded" in variant else CASES["7x7_s2_p3_stem"]
    c = make_case(case, dtype, torch.channels_last, device)
    assert conv_launch.row_span_layout(c["x"], c["w"], c["dilation"])
    assert not conv_launch.row_span_layout(c["x"].contiguous(), c["w"], c["dilation"])
    assert not conv_launch.row_span_layout(c["x"], c["w"].contiguous(), c["dilation"])
    if "padded_weight" in variant:
        c["w"] = padded_weight(c["w"], float("nan") if variant == "foreign_padded_weight" else None)
        assert c["w"].stride() == (7 * 32, 1, 32, 3)
        assert conv_launch.row_span_layout(c["x"], c["w"], c["dilation"])
    guard, out = guarded_output(c, dtype, torch.channels_last, device)
    block_k = 16 if variant.endswith("block_k_16") else 64 if variant == "block_k_64" else 32
    config = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=2, num_warps=4, num_stages=2)
    scale_shift, ref_case = with_prologue(c, dtype, device) if "prologue" in variant else (None, c)
    seen = record_constexprs(monkeypatch)
    conv_launch.fused_conv2d(c["x"], c["w"], c["bias"], None, None, None, out, c["stride"],
                              c["padding"], c["dilation"], (1, 1), c["relu"], "ieee",
                              prologue=scale_shift, index_64=variant == "index_64", config=config,
                              tma=True if variant == "patches_tma_epilogue" else None)
    assert seen["ROW_SPAN"] == (block_k == 32) and seen["FLAT_C"] == 3
    assert seen["EPILOGUE_TMA"] == (variant == "patches_tma_epilogue" and conv_launch.use_tma(True))
    assert seen["TILE_W"] == (8 if case is STEM_PATCH_CASE and block_k == 32 else 0)
    assert seen["PADDED_ROWS"] == (variant == "padded_weight")
    assert_close(out, reference(ref_case), dtype, c["L"])
    assert_guard_untouched(guard)
