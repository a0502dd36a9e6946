"""RMSNorm: ours vs the eager reference (and torch.compile of it on GPUs) per mode.

Cases and byte formulas (each input read once, each output written once): :mod:`bench.row_op_cases`.
"""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA
from bench.row_op_cases import modes_and_providers, rms_norm_timing_cases

# FLUX's qk-norm at 1024 px (B·H·N = 104k rows of D = 128) and a hidden-width norm; tiny under the interpreter.
SHAPES = [(1, 24, 4352, 128), (2, 4608, 3072)] if HAS_CUDA else [(2, 3, 17, 128)]


@pytest.mark.parametrize("mode, provider", modes_and_providers(HAS_CUDA))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(run_case, shape, mode, provider):
    run_case(rms_norm_timing_cases, shape, mode, provider)
