import pytest
import torch

# The models in the tests are tiny: one thread is faster than two fighting over 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Some code under test sets torch's thread count (Lightning's ModelParallelStrategy: to the core
    count); every test starts with the suite's one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
