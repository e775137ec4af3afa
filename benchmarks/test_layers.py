"""Layer level: every distinct fused convolution of resnet18/resnet50, per provider and dtype."""
from bench_config import DTYPES
from cases import LayerModule, dtype_elem


def test_layer(layer_case, provider, dtype_name, run_case):
    run_case(level="layer", case=layer_case, module=LayerModule(layer_case).eval(),
             provider=provider, dtype_name=dtype_name, flops=layer_case.flops(),
             traffic=layer_case.min_bytes(dtype_elem(DTYPES[dtype_name])))
