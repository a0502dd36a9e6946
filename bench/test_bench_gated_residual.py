"""Gated residual: ours vs the eager PyTorch reference per mode (cases and byte counts: t2i_distill.kernel_checks)."""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA, MODES_AND_PROVIDERS
from t2i_distill.kernel_checks import gated_residual_timing_cases

# FLUX's hidden states at 512 px (B=2) and 1024 px; a tiny shape under the interpreter.
SHAPES = [(2, 1536, 3072), (1, 4608, 3072)] if HAS_CUDA else [(2, 80, 64)]


@pytest.mark.parametrize("mode, provider", MODES_AND_PROVIDERS["gated_residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual(run_case, shape, mode, provider):
    run_case(gated_residual_timing_cases, shape, mode, provider)
