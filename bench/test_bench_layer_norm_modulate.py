"""layer_norm_modulate: ours vs the reference per mode (and SDPA / torch.compile / anchors where they apply).

Cases, shapes and the FLOP/byte count of one call: `t2i_distill.benchmarks.ops.OPS["layer_norm_modulate"]`.
"""

from __future__ import annotations

import pytest

from bench.conftest import COMPILE, DEVICE_SHAPES
from t2i_distill.benchmarks.ops import OPS, op_case_pairs

SPEC = OPS["layer_norm_modulate"]


@pytest.mark.parametrize("mode, provider", op_case_pairs(SPEC, COMPILE))
@pytest.mark.parametrize("shape", DEVICE_SHAPES(SPEC), ids=str)
def test_layer_norm_modulate(run_case, shape, mode, provider):
    run_case(SPEC, shape, mode, provider)
