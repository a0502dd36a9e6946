"""Per-image FLOP counts: equal to torch's FlopCounterMode on a real (tiny) FLUX, and the spec's lite-8B figures."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from t2i_distill.pipelines.flops import LITE_8B_CONFIG, pipeline_flops_per_image, transformer_forward_flops


@pytest.mark.parametrize("dual", [False, True])
def test_formula_equals_torch_flop_counter_on_a_tiny_flux(dual):
    from t2i_distill.models.flux import FluxStudent
    from t2i_distill.tiny_pipeline import TINY_PIPELINE_TRANSFORMER

    config = {**TINY_PIPELINE_TRANSFORMER, "num_layers": 2, "num_single_layers": 3}
    model = FluxStudent(**config, dual_timestep=dual).eval()
    batch, li, lt = 2, 20, 7
    inputs = {
        "hidden_states": torch.randn(batch, li, 64), "encoder_hidden_states": torch.randn(batch, lt, 32),
        "pooled_projections": torch.randn(batch, 32), "timestep": torch.rand(batch), "img_ids": torch.zeros(li, 3),
        "txt_ids": torch.zeros(lt, 3), "guidance": torch.full((batch,), 3.5),
        **({"timestep2": torch.rand(batch)} if dual else {}),
    }
    # The math SDPA path: its matmuls are counted (CPU flash attention has no FLOP formula in the counter).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    assert transformer_forward_flops(config, li, lt, batch=batch, dual_timestep=dual) == counter.get_total_flops()


def test_lite_8b_forward_matches_the_spec_cost_model():
    # reference-spec §6.1: ≈14.3 TFLOP at 512 px (L = 1280), ≈56 TFLOP at 1024 px (L = 4352), 46 blocks.
    assert transformer_forward_flops(LITE_8B_CONFIG, 1024, 256) == pytest.approx(14.3e12, rel=0.01)
    assert transformer_forward_flops(LITE_8B_CONFIG, 4096, 256) == pytest.approx(56.0e12, rel=0.01)


def test_per_image_counts_scale_with_steps():
    one = transformer_forward_flops(LITE_8B_CONFIG, 4096, 256)
    assert pipeline_flops_per_image("teacher") == 28 * one
    assert pipeline_flops_per_image("scm", 1) == one and pipeline_flops_per_image("scm") == 2 * one
    meanflow = pipeline_flops_per_image("meanflow", 4)
    assert meanflow == 4 * transformer_forward_flops(LITE_8B_CONFIG, 4096, 256, dual_timestep=True)
    assert meanflow - 4 * one == 4 * 2 * (256 * 3072 + 3072 * 3072)  # the second time MLP, once per step
    with pytest.raises(ValueError, match="method"):
        pipeline_flops_per_image("ddim")
    with pytest.raises(ValueError, match="resolution"):
        pipeline_flops_per_image("scm", resolution=1000)
