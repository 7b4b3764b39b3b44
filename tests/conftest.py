"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread(request):
    """Run tiny in-process models on one thread; the slow real-model tests use all cores.

    Tiny models gain nothing from a second thread, and on a busy machine two threads
    per test process make them many times slower.
    """
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
