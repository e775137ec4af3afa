"""Model level: resnet18/resnet50 forward, 3x224x224, at batch 1, 32 and 256 (GPU)."""
import providers
from cases import build_model, dtype_elem, model_flops_bytes
from bench_config import DTYPES


def test_model(model_case, provider, dtype_name, run_case, device):
    dtype = DTYPES[dtype_name]
    module = build_model(model_case)
    fn = providers.build(provider, module, "model", dtype, device)
    flops, traffic = model_flops_bytes(model_case, dtype_elem(dtype))
    run_case(level="model", case=model_case.name, provider=provider, dtype_name=dtype_name, fn=fn,
             make_inputs=lambda: providers.inputs_for("model", module, model_case, dtype, device, provider),
             flops=flops, traffic=traffic)
