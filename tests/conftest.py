import pytest
import torch

# The tests use small tensors: one intra-op thread is faster for them, and OpenMP threads on a
# loaded 2-core machine can slow small kernels down a hundredfold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
