"""A smoke test of the Triton kernels through the interpreter on the oldest supported stack.

Run by .ci/oldest-stack inside its venv (torch 2.13 CPU, triton 3.6, numpy < 2.4), with the
checkout on PYTHONPATH. Tiny problems, seconds under the interpreter: one fused conv against
F.conv2d, a FusedBasicBlock's eval forward, and a training-mode forward + backward, each against
the same modules run unfused. No torchvision (its CUDA build does not import next to a CPU
torch) and no pytest: exit code 1 with the failed check's message, 0 when all pass.
"""
import copy
import os
import sys
import time
import warnings

# TRITON_INTERPRET is read when the @triton.jit functions are defined, at fastres's import.
os.environ["TRITON_INTERPRET"] = "1"
# The one call forced through another backend would not check the kernels.
os.environ.pop("FASTRES_BACKEND", None)
# triton 3.6 + numpy < 2.4: one DeprecationWarning per runtime-bounded loop (the reason numpy
# >= 2.4 fails there); noise here.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\..*")

import numpy  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402

import fastres  # noqa: E402
from fastres.launch import conv as conv_launch  # noqa: E402
from fastres.reference import randomize_batchnorms  # noqa: E402

# fp32 on the CPU: the interpreter's products are exact fp32, only the order of sums differs;
# relative to the reference's largest magnitude.
RTOL = 1e-4


def kernels_ran(section: str, since: int) -> int:
    """Fail unless a fused-conv kernel launched since `since` (without one, a check would compare
    torch with torch); returns the current launch count."""
    now = conv_launch.launch_count()
    print(f"  {section:<34} {now - since} fused-conv kernel launches")
    if now == since:
        raise AssertionError(f"{section}: no fused-conv kernel ran")
    return now


def check(name: str, result: torch.Tensor, reference: torch.Tensor) -> None:
    err = (result.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    ok = err <= RTOL * scale  # NaN compares False: an unwritten output fails
    print(f"  {name:<34} max abs err {err:.2e} (scale {scale:.2e})  {'ok' if ok else 'FAIL'}")
    if not ok:
        raise AssertionError(f"{name}: max abs error {err:.3e} > {RTOL:g} x {scale:.3e}")


def unfused(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock.forward, on the block's own child modules."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


def make_block(generator: torch.Generator) -> nn.Module:
    """A stride-2 block with a 1x1 downsample: the dual-GEMM epilogue runs too."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    block = fastres.FusedBasicBlock(8, 16, stride=2, downsample=downsample)
    randomize_batchnorms(block, generator)
    return block


def main() -> int:
    print(f"oldest-stack smoke: torch {torch.__version__}, triton {triton.__version__}, "
          f"numpy {numpy.__version__}, python {sys.version.split()[0]}")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    launches = conv_launch.launch_count()

    # One fused conv + bias + ReLU, NCHW: the (tap, channel-block) loop with a runtime bound.
    x = torch.randn(2, 8, 9, 9, generator=g)
    w = torch.randn(16, 8, 3, 3, generator=g)
    b = torch.randn(16, generator=g)
    check("conv_bn_act vs F.conv2d",
          fastres.conv_bn_act(x, w, b, stride=1, padding=1, relu=True),
          F.relu(F.conv2d(x, w, b, padding=1)))
    launches = kernels_ran("conv_bn_act", launches)

    # Eval forward of a block (channels_last).
    block = make_block(g).eval()
    reference = copy.deepcopy(block)
    x = torch.randn(2, 8, 10, 10, generator=g).to(memory_format=torch.channels_last)
    with torch.no_grad():
        check("FusedBasicBlock eval forward", block(x), unfused(reference, x))
    launches = kernels_ran("eval forward", launches)

    # Training mode: batch statistics, forward and backward, running statistics.
    block = make_block(g).train()
    reference = copy.deepcopy(block)
    x = torch.randn(2, 8, 10, 10, generator=g)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    out, out_ref = block(x), unfused(reference, x_ref)
    kernels_ran("train forward", launches)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    out_ref.backward(grad)
    check("FusedBasicBlock train forward", out, out_ref)
    check("  input gradient", x.grad, x_ref.grad)
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        check(f"  grad {name}", p.grad, p_ref.grad)
    for (name, s), s_ref in zip(block.named_buffers(), reference.buffers()):
        if s.is_floating_point():
            check(f"  {name}", s, s_ref)
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    try:
        code = main()
    except AssertionError as exc:
        print(f"oldest-stack smoke: FAIL: {exc}")
        code = 1
    print(f"oldest-stack smoke: {'PASS' if code == 0 else 'FAIL'} "
          f"({time.perf_counter() - start:.1f} s after imports)")
    sys.exit(code)
