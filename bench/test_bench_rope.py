"""RoPE: ours vs the eager reference (and torch.compile of it on GPUs) per mode.

Cases and byte formulas (each input read once, each output written once): :mod:`bench.row_op_cases`.
"""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA
from bench.row_op_cases import modes_and_providers, rope_timing_cases

# Q at 1024 px, (B, H, N, D); tiny under the interpreter.
SHAPES = [(1, 24, 4352, 128)] if HAS_CUDA else [(1, 2, 17, 32)]


@pytest.mark.parametrize("mode, provider", modes_and_providers(HAS_CUDA))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope(run_case, shape, mode, provider):
    run_case(rope_timing_cases, shape, mode, provider)
