"""qk-RMSNorm + RoPE + head transpose: ours vs the eager reference (and torch.compile of it on GPUs) per mode.

Cases and byte formulas (each input read once, each output written once): :mod:`bench.row_op_cases`.
"""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA
from bench.row_op_cases import modes_and_providers, qk_norm_rope_timing_cases

# Q's projection at 512 px (B=2) and 1024 px, (B, N, H, D); tiny under the interpreter.
SHAPES = [(2, 1536, 24, 128), (1, 4352, 24, 128)] if HAS_CUDA else [(1, 17, 2, 32)]


@pytest.mark.parametrize("mode, provider", modes_and_providers(HAS_CUDA))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_qk_norm_rope(run_case, shape, mode, provider):
    run_case(qk_norm_rope_timing_cases, shape, mode, provider)
