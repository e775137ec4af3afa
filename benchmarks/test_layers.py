"""Layer level: every distinct fused convolution of resnet18/resnet50, per provider and dtype."""
import providers
from cases import LayerModule, dtype_elem
from bench_config import DTYPES


def test_layer(layer_case, provider, dtype_name, run_case, device):
    dtype = DTYPES[dtype_name]
    module = LayerModule(layer_case).eval()
    fn = providers.build(provider, module, "layer", dtype, device)
    run_case(level="layer", case=layer_case.name, provider=provider, dtype_name=dtype_name, fn=fn,
             make_inputs=lambda: providers.inputs_for("layer", module, layer_case, dtype, device, provider),
             flops=layer_case.flops(), traffic=layer_case.min_bytes(dtype_elem(dtype)))
