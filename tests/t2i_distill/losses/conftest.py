"""One intra-op thread for the loss tests: their tensors are tiny, and on a shared 2-core machine PyTorch's thread
pool spinning against other processes made each tiny GEMM ~60 ms (measured) instead of well under 1 ms."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
