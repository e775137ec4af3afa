"""Test set-up. Without a GPU the Triton kernels run through Triton's interpreter, which must be
switched on before fastres (and so any @triton.jit) is imported."""
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastres  # noqa: E402,F401  (imported here, after the interpreter switch)
from fastres.testing import poisoned_outputs as _poisoned  # noqa: E402

# triton 3.6 + numpy emit a DeprecationWarning per runtime-bounded loop under the interpreter.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\..*")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every output the fused ops and the BN kernels allocate starts as NaN, so an element a
    kernel never wrote shows up as NaN in the comparison instead of as plausible leftover
    memory."""
    with _poisoned():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
