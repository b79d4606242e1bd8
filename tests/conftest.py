import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """train.main(--threads) sets torch's thread count for the process: give every test the suite's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
