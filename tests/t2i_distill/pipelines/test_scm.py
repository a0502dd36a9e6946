"""The sCM pipeline on the tiny FLUX folder: schedule used, steps against a hand computation, seeds, dtypes (B10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_distill.conditioning import pack_latents
from t2i_distill.models.trigflow import TrigFlowStudent
from t2i_distill.pipelines import FluxSCMPipeline, load_pipeline
from t2i_distill.pipelines.scm import trigflow_velocity
from tests.t2i_distill.pipelines.helpers import PROMPT, TOKENS, conditioning, recorded_calls

CALL = {"height": 64, "width": 64, "max_sequence_length": TOKENS}


@pytest.fixture(scope="module")
def scm_fp32(tiny_folder, students):
    return load_pipeline("scm", tiny_folder, student_checkpoint=students["scm"])


def test_loads_a_trigflow_student_and_the_scm_scheduler(scm_fp32):
    from diffusers import SCMScheduler

    assert isinstance(scm_fp32, FluxSCMPipeline)
    assert isinstance(scm_fp32.transformer, TrigFlowStudent)
    assert isinstance(scm_fp32.scheduler, SCMScheduler) and scm_fp32.scheduler.config.sigma_data == 0.5


@pytest.mark.parametrize(("steps", "angles"),
                         [(1, [1.5708]), (2, [1.5708, 1.3]), (4, [1.5708, 1.1781, 0.7854, 0.3927])])
def test_the_student_sees_the_reference_angles(scm_fp32, steps, angles):
    with recorded_calls(scm_fp32.transformer) as calls:
        scm_fp32(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                 **CALL)
    seen = torch.stack([c["timestep"] for c in calls]).reshape(-1)
    torch.testing.assert_close(seen, torch.tensor(angles), atol=5e-5, rtol=0)


def test_configurable_intermediate_angle(scm_fp32):
    with recorded_calls(scm_fp32.transformer) as calls:
        scm_fp32(PROMPT, num_inference_steps=2, intermediate_timestep=0.9, generator=torch.Generator().manual_seed(0),
                 output_type="latent", **CALL)
    assert [round(float(c["timestep"][0]), 4) for c in calls] == [1.5708, 0.9]


def test_two_steps_equal_a_hand_computation_with_fresh_noise(scm_fp32):
    """x̂0 = cos s·x − sin s·σ_d·F(x/σ_d, s); x ← cos t·x̂0 + sin t·σ_d·ξ (fresh ξ); output x̂0/σ_d."""
    out = scm_fp32(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent",
                   **CALL).images
    cond, sd = conditioning(scm_fp32), 0.5

    def by_hand(fresh_noise: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        x = pack_latents(torch.randn((1, 16, 8, 8), generator=g)) * sd
        angles = torch.tensor([1.57080, 1.3, 0.0])
        for i in range(2):
            s, t = angles[i], angles[i + 1]
            velocity = scm_fp32.transformer(hidden_states=x / sd, timestep=s.reshape(1), **cond)
            x0 = torch.cos(s) * x - torch.sin(s) * sd * velocity
            fresh = torch.randn(x.shape, generator=g) * float(fresh_noise)
            x = torch.cos(t) * x0 + torch.sin(t) * sd * fresh
        return x0 / sd

    torch.testing.assert_close(out, by_hand(fresh_noise=True), atol=1e-6, rtol=1e-6)
    assert (out - by_hand(fresh_noise=False)).abs().max() > 1e-3  # the fresh noise between steps is used


def test_flow_student_with_the_maps_equals_the_trigflow_student(scm_fp32, tiny_folder):
    from t2i_distill.models.loading import load_student

    flow, _ = load_student(tiny_folder, kind="flow")  # the stock folder: ×1000; the student checkpoint is ×1
    flow.register_to_config(time_scale=1.0, time_embedding_fp32=False)
    cond = conditioning(scm_fp32)
    x_hat = torch.randn(1, 16, 64)
    for angle in (1.5708, 1.0, 0.3):
        t = torch.tensor([angle])
        torch.testing.assert_close(trigflow_velocity(flow, x_hat, t, cond),
                                   trigflow_velocity(scm_fp32.transformer, x_hat, t, cond), atol=0, rtol=0)


def test_seeds_reproduce_images_bit_for_bit(scm_fp32):
    def run(seed):
        return scm_fp32(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                        num_images_per_prompt=2, output_type="np", **CALL).images

    first, again, other = run(11), run(11), run(12)
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    assert np.abs(first[0] - first[1]).max() > 1e-3  # two images of one prompt differ


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_without_autocast_and_stays_in_dtype(tiny_folder, scm_fp32, students, dtype):
    """B10: every step's latents reach the model in its own dtype; the result tracks the fp32 pipeline."""
    pipe = load_pipeline("scm", tiny_folder, student_checkpoint=students["scm"], torch_dtype=dtype)
    with recorded_calls(pipe.transformer) as calls:
        half = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="latent",
                    **CALL).images
    assert [c["hidden_states"].dtype for c in calls] == [dtype] * 4
    full = scm_fp32(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="latent",
                    **CALL).images
    assert half.dtype == dtype and torch.isfinite(half).all()
    rel = (half.float() - full).norm() / full.norm()
    assert rel < 0.05, f"{dtype} sCM sample differs from fp32 by {rel:.3g} (relative)"


def test_a_meanflow_student_is_refused(tiny_folder):
    from t2i_distill.models.loading import load_student

    student, _ = load_student(tiny_folder, kind="meanflow")
    pipe = load_pipeline("scm", tiny_folder, transformer=student)
    with pytest.raises(TypeError, match="TrigFlowStudent"):
        pipe(PROMPT, num_inference_steps=1, output_type="latent", **CALL)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"height": 60}, ValueError, "height"),
        ({"output_type": "jpeg"}, ValueError, "output_type"),
        ({"guidance_scale": "high"}, TypeError, "guidance_scale"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
    ],
)
def test_bad_call_arguments_name_themselves(scm_fp32, kwargs, error, match):
    with pytest.raises(error, match=match):
        scm_fp32(PROMPT, **{**CALL, **kwargs})


def test_max_sequence_length_and_guidance_reach_the_transformer(scm_fp32):
    with recorded_calls(scm_fp32.transformer) as calls:
        scm_fp32(PROMPT, num_inference_steps=1, guidance_scale=4.5, output_type="latent",
                 **{**CALL, "max_sequence_length": 24})
    assert calls[0]["encoder_hidden_states"].shape == (1, 24, 32)
    assert calls[0]["guidance"].tolist() == [4.5]


def test_eval_registers_every_command():
    import argparse

    from t2i_distill.eval import add_subparsers

    parser = argparse.ArgumentParser()
    add_subparsers(parser.add_subparsers(dest="command"))
    for argv in (["score", "out"], ["shapes", "--output_dir", "d"],
                 ["sample", "--pretrained_model_name_or_path", "p", "--prompt", "x", "--output_dir", "o"],
                 ["geneval", "--pretrained_model_name_or_path", "p", "--metadata", "m", "--output_dir", "o"]):
        assert parser.parse_args(argv).command == argv[0]
