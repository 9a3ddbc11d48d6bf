"""Learner tests run single-threaded: their tensors are tiny, and on a shared 2-core machine torch's
intra-op thread pool only adds contention (tests got 20× slower with it)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
