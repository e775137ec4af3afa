"""Block level: every distinct BasicBlock/Bottleneck configuration of resnet18/resnet50."""
import providers
from cases import block_flops_bytes, build_block, dtype_elem
from bench_config import DTYPES


def test_block(block_case, provider, dtype_name, run_case, device):
    dtype = DTYPES[dtype_name]
    module = build_block(block_case)
    fn = providers.build(provider, module, "block", dtype, device)
    flops, traffic = block_flops_bytes(block_case, dtype_elem(dtype))
    run_case(level="block", case=block_case.name, provider=provider, dtype_name=dtype_name, fn=fn,
             make_inputs=lambda: providers.inputs_for("block", module, block_case, dtype, device, provider),
             flops=flops, traffic=traffic)
