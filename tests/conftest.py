"""Test harness: interpreter on CPU-only machines, per-test seeding, and the `gpu` / `slow` markers.

TRITON_INTERPRET must be set before Triton (or any kernel module) is imported: Triton decides at decoration time
whether a kernel is compiled or interpreted. pytest imports this file before any test module, so setting it here,
at import time, is early enough.
"""

from __future__ import annotations

import os
import random
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

#: Where kernel tests run: the GPU when there is one, else the CPU through the Triton interpreter.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# One intra-op thread for the whole suite: the tests' tensors are tiny, and on the 2-core machines a second thread
# only adds contention (the tiny encoders and GEMMs measured 10-30× slower with torch's default pool).
# T2I_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("T2I_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest):
    """Every test starts from a seed derived from its own id: reproducible, and independent of test order."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch):
    """Make every ``torch.empty`` during the test return NaN-filled memory, so an output element a kernel forgets
    to write shows up as a NaN instead of passing by luck with zeroed memory."""
    original = torch.empty

    def empty_filled_with_nan(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.is_floating_point() and out.device.type != "meta":
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty_filled_with_nan)
    yield
