"""kernels/reference_gemm.py, the yardstick of `compile-check --sass`, computes a GEMM: ragged
M, N and K (masked K steps, wrapped rows and columns), the reduction-contiguous B the report
gives it, more tiles than one group."""
import torch
import triton

from fastres.kernels.reference_gemm import reference_gemm_kernel


def test_reference_gemm(device):
    M, N, K = 70, 37, 50
    a = torch.randn(M, K, device=device)
    b = torch.randn(N, K, device=device).t()  # (K, N), K contiguous like a conv weight
    c = torch.full((M, N), float("nan"), device=device)
    block = 16
    grid = (triton.cdiv(M, block) * triton.cdiv(N, block),)
    reference_gemm_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                                b.stride(1), c.stride(0), c.stride(1), INPUT_PRECISION="ieee",
                                BLOCK_M=block, BLOCK_N=block, BLOCK_K=block, GROUP_M=2)
    torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-4)
