"""Constants shared by the benchmark suites and their conftest."""
import torch

ON_GPU = torch.cuda.is_available()
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
H100_L2_BYTES = 50 * 2 ** 20  # L2 of the H100: rotated inputs must not fit in it
