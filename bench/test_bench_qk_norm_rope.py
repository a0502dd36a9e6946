"""qk_norm_rope: ours vs the reference per mode (and SDPA / torch.compile / anchors where they apply).

Cases, shapes and the FLOP/byte count of one call: `t2i_distill.benchmarks.ops.OPS["qk_norm_rope"]`.
"""

from __future__ import annotations

import pytest

from bench.conftest import COMPILE, DEVICE_SHAPES
from t2i_distill.benchmarks.ops import OPS, op_case_pairs

SPEC = OPS["qk_norm_rope"]


@pytest.mark.parametrize("mode, provider", op_case_pairs(SPEC, COMPILE))
@pytest.mark.parametrize("shape", DEVICE_SHAPES(SPEC), ids=str)
def test_qk_norm_rope(run_case, shape, mode, provider):
    run_case(SPEC, shape, mode, provider)
