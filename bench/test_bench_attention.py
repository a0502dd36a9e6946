"""Attention: ours (fused JVP, primal, backward) vs SDPA and vs math SDPA under torch.func.jvp (the reference).
Cases and FLOP counts: t2i_distill.kernel_checks."""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA, MODES_AND_PROVIDERS
from t2i_distill.kernel_checks import attention_timing_cases

# FLUX attention (24 heads × 128) at 512 px and 1024 px; a tiny shape under the interpreter.
SHAPES = [(2, 24, 1536, 128), (1, 24, 4608, 128)] if HAS_CUDA else [(1, 2, 80, 32)]


@pytest.mark.parametrize("mode, provider", MODES_AND_PROVIDERS["attention"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention(run_case, shape, mode, provider):
    run_case(attention_timing_cases, shape, mode, provider)
