"""LayerNorm + AdaLN modulation: ours vs the eager reference (and torch.compile of it on GPUs) per mode.

Cases and byte formulas (each input read once, each output written once): :mod:`bench.row_op_cases`.
"""

from __future__ import annotations

import pytest

from bench.conftest import HAS_CUDA
from bench.row_op_cases import layer_norm_modulate_timing_cases, modes_and_providers

# FLUX's hidden states at 512 px (B=2) and 1024 px; tiny under the interpreter.
SHAPES = [(2, 1536, 3072), (1, 4608, 3072)] if HAS_CUDA else [(2, 17, 48)]


@pytest.mark.parametrize("mode, provider", modes_and_providers(HAS_CUDA))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_modulate(run_case, shape, mode, provider):
    run_case(layer_norm_modulate_timing_cases, shape, mode, provider)
