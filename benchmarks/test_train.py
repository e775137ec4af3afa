"""Training steps (forward + backward, batch-statistics BN): every distinct block of
resnet18/resnet50 and whole models (resnet50 at batch 256 on a GPU), AMP by default.

FLOPs are counted as 3x the forward convolutions' (forward, data gradient, weight gradient) and
the minimum traffic as 3x the forward's; both are estimates for the roofline column only."""
from bench_config import DTYPES
from cases import block_flops_bytes, build_block, build_model, dtype_elem, model_flops_bytes

TRAIN_FACTOR = 3.0


def test_train_block(train_block_case, train_provider, dtype_name, run_case):
    flops, traffic = block_flops_bytes(train_block_case, dtype_elem(DTYPES[dtype_name]))
    run_case(level="train_block", case=train_block_case, module=build_block(train_block_case),
             provider=train_provider, dtype_name=dtype_name, flops=TRAIN_FACTOR * flops,
             traffic=TRAIN_FACTOR * traffic)


def test_train_model(train_model_case, train_provider, dtype_name, run_case):
    flops, traffic = model_flops_bytes(train_model_case, dtype_elem(DTYPES[dtype_name]))
    run_case(level="train_model", case=train_model_case, module=build_model(train_model_case),
             provider=train_provider, dtype_name=dtype_name, flops=TRAIN_FACTOR * flops,
             traffic=TRAIN_FACTOR * traffic)
