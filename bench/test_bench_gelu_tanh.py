"""GELU-tanh: ours vs the eager reference (and torch.compile of it on GPUs) per mode.

Cases and byte formulas (each input read once, each output written once): :mod:`bench.row_op_cases`.
"""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA
from bench.row_op_cases import gelu_tanh_timing_cases, modes_and_providers

# The FF hidden activation (B, L, 4D) at 512 px (B=2) and 1024 px; tiny under the interpreter.
SHAPES = [(2, 1536, 12288), (1, 4352, 12288)] if HAS_CUDA else [(2, 17, 96)]


@pytest.mark.parametrize("mode, provider", modes_and_providers(HAS_CUDA))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_tanh(run_case, shape, mode, provider):
    run_case(gelu_tanh_timing_cases, shape, mode, provider)
