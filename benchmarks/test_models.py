"""Model level: resnet18/resnet50 forward, 3x224x224, at batch 1, 32 and 256 (GPU)."""
from bench_config import DTYPES
from cases import build_model, dtype_elem, model_flops_bytes


def test_model(model_case, provider, dtype_name, run_case):
    flops, traffic = model_flops_bytes(model_case, dtype_elem(DTYPES[dtype_name]))
    run_case(level="model", case=model_case, module=build_model(model_case), provider=provider,
             dtype_name=dtype_name, flops=flops, traffic=traffic)
