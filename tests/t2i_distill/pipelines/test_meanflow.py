"""The MeanFlow pipeline on the tiny FLUX folder: (t, t − r) per step at both resolutions, the jump against a hand
computation, the reference's bf16 timestep quantisation behind a flag (L4), seeds and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_distill.conditioning import pack_latents
from t2i_distill.pipelines import FluxMeanFlowPipeline, load_pipeline
from t2i_distill.pipelines.schedules import meanflow_sigmas
from tests.t2i_distill.pipelines.helpers import PROMPT, TOKENS, conditioning, recorded_calls

CALL = {"height": 64, "width": 64, "max_sequence_length": TOKENS}


@pytest.fixture(scope="module")
def mf_fp32(tiny_folder, students):
    return load_pipeline("meanflow", tiny_folder, student_checkpoint=students["meanflow"])


def _time_inputs(calls):
    return (torch.stack([c["timestep"][0] for c in calls]), torch.stack([c["timestep2"][0] for c in calls]))


def test_loads_a_dual_timestep_student(mf_fp32):
    assert isinstance(mf_fp32, FluxMeanFlowPipeline)
    assert mf_fp32.transformer.config.dual_timestep


@pytest.mark.parametrize(("pixels", "steps", "spec"), [(512, 4, [1.0, 0.8492, 0.6525, 0.3849, 0.0]),
                                                       (1024, 4, [1.0, 0.9045, 0.7595, 0.5128, 0.0])])
def test_time_inputs_at_both_resolutions(mf_fp32, pixels, steps, spec):
    """512 px → 1024 image tokens (μ = 0.63); 1024 px → 4096 (μ = 1.15); (t, t − r) = (σ_i, σ_i − σ_{i+1})."""
    with recorded_calls(mf_fp32.transformer) as calls:
        mf_fp32(PROMPT, num_inference_steps=steps, height=pixels, width=pixels, max_sequence_length=TOKENS,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    assert calls[0]["hidden_states"].shape[1] == (pixels // 16) ** 2
    t, delta = _time_inputs(calls)
    sigma = torch.tensor(spec)
    torch.testing.assert_close(t, sigma[:-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(delta, sigma[:-1] - sigma[1:], atol=2e-4, rtol=0)
    assert t.dtype == torch.float32


def test_bf16_time_inputs_are_not_quantised_by_default_but_are_with_the_flag(tiny_folder, students):
    pipe = load_pipeline("meanflow", tiny_folder, student_checkpoint=students["meanflow"], torch_dtype=torch.bfloat16)
    sigmas, timesteps = meanflow_sigmas(4, 1024)
    kw = {"num_inference_steps": 4, "height": 512, "width": 512, "max_sequence_length": TOKENS,
          "output_type": "latent"}
    with recorded_calls(pipe.transformer) as calls:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw)
    t, delta = _time_inputs(calls)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, sigmas[:-1], atol=0, rtol=0)  # 0.8492348…, unrounded
    torch.testing.assert_close(delta, sigmas[:-1] - sigmas[1:], atol=0, rtol=0)

    with recorded_calls(pipe.transformer) as calls:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), quantize_timesteps=True, **kw)
    t, delta = _time_inputs(calls)
    # The reference: bf16 on the 0–1000 scale first (849.23 → 848, 652.49 → 652, 384.94 → 384), then / 1000 in bf16.
    assert [float(v) for v in timesteps.to(torch.bfloat16)] == [1000.0, 848.0, 652.0, 384.0]
    rounded = torch.tensor([1000.0, 848.0, 652.0, 384.0, 0.0], dtype=torch.bfloat16)
    torch.testing.assert_close(t, rounded[:-1] / 1000, atol=0, rtol=0)
    torch.testing.assert_close(delta, (rounded[:-1] - rounded[1:]) / 1000, atol=0, rtol=0)


def test_two_jumps_equal_a_hand_computation(mf_fp32):
    """z ← z + (σ_{i+1} − σ_i)·u(z, σ_i, σ_i − σ_{i+1}), from the seeded noise."""
    out = mf_fp32(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(4), output_type="latent",
                  **CALL).images
    cond = conditioning(mf_fp32)
    z = pack_latents(torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(4)))
    sigmas, _ = meanflow_sigmas(2, 16)  # 64 px: 16 image tokens
    for i in range(2):
        s, r = sigmas[i], sigmas[i + 1]
        u = mf_fp32.transformer(hidden_states=z, timestep=s.reshape(1), timestep2=(s - r).reshape(1),
                                return_dict=False, **cond)[0]
        z = z + (r - s) * u
    torch.testing.assert_close(out, z, atol=1e-6, rtol=1e-6)


def test_seeds_reproduce_images_bit_for_bit(mf_fp32):
    def run(seed):
        return mf_fp32(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np",
                       **CALL).images

    first, again, other = run(21), run(21), run(22)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_bf16_runs_and_tracks_fp32(tiny_folder, mf_fp32, students):
    pipe = load_pipeline("meanflow", tiny_folder, student_checkpoint=students["meanflow"], torch_dtype=torch.bfloat16)
    with recorded_calls(pipe.transformer) as calls:
        half = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(6), output_type="latent",
                    **CALL).images
    assert [c["hidden_states"].dtype for c in calls] == [torch.bfloat16] * 4
    full = mf_fp32(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(6), output_type="latent",
                   **CALL).images
    rel = (half.float() - full).norm() / full.norm()
    assert half.dtype == torch.bfloat16 and rel < 0.05, f"bf16 MeanFlow sample differs from fp32 by {rel:.3g}"


def test_a_single_timestep_student_and_a_bad_flag_are_refused(tiny_folder, mf_fp32):
    from t2i_distill.models.loading import load_student

    with pytest.raises(TypeError, match="quantize_timesteps"):
        mf_fp32(PROMPT, num_inference_steps=1, quantize_timesteps="yes", output_type="latent", **CALL)
    student, _ = load_student(tiny_folder, kind="trigflow")
    pipe = load_pipeline("meanflow", tiny_folder, transformer=student)
    with pytest.raises(TypeError, match="dual-timestep"):
        pipe(PROMPT, num_inference_steps=1, output_type="latent", **CALL)
