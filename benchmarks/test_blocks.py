"""Block level: every distinct BasicBlock/Bottleneck configuration of resnet18/resnet50."""
from bench_config import DTYPES
from cases import block_flops_bytes, build_block, dtype_elem


def test_block(block_case, provider, dtype_name, run_case):
    flops, traffic = block_flops_bytes(block_case, dtype_elem(DTYPES[dtype_name]))
    run_case(level="block", case=block_case, module=build_block(block_case), provider=provider,
             dtype_name=dtype_name, flops=flops, traffic=traffic)
