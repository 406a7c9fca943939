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


@pytest.fixture
def one_and_three_threads(monkeypatch):
    """``compare(results, module, attribute, threshold)``: ``results()`` on one intra-op thread, then on
    three with ``module.attribute`` (the size above which a kernel splits its input over threads)
    lowered to ``threshold``; returns both lists of tensors."""
    def compare(results, module, attribute, threshold):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = results()
            torch.set_num_threads(3)
            monkeypatch.setattr(module, attribute, threshold)
            split = results()
        finally:
            torch.set_num_threads(threads)
        return single, split

    return compare
