"""The exact schedules of reference-spec §4.1 (sCM) and §4.2 (MeanFlow), against the spec's numbers and the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from t2i_distill.pipelines.schedules import calculate_shift, meanflow_sigmas, scm_timesteps


@pytest.mark.parametrize(
    ("steps", "intermediate", "expected"),
    [
        (1, 1.3, [1.5708, 0.0]),
        (2, 1.3, [1.5708, 1.3, 0.0]),
        (2, 1.1, [1.5708, 1.1, 0.0]),  # the intermediate angle is configurable
        (2, None, [1.5708, 0.7854, 0.0]),  # None: linspace
        (4, 1.3, [1.5708, 1.1781, 0.7854, 0.3927, 0.0]),  # the intermediate is ignored unless 2 steps
    ],
)
def test_scm_timesteps_match_the_reference(steps, intermediate, expected):
    ts = scm_timesteps(steps, intermediate)
    assert ts.dtype == torch.float32
    torch.testing.assert_close(ts, torch.tensor(expected), atol=5e-5, rtol=0)


def test_scm_linspace_is_exact_for_many_steps():
    ts = scm_timesteps(7)
    torch.testing.assert_close(ts, torch.linspace(1.57080, 0.0, 8), atol=0, rtol=0)


def test_shift_mu_at_both_resolutions():
    assert calculate_shift(1024) == pytest.approx(0.63, abs=1e-12)  # 512 px: 64×64 latent → 1024 tokens
    assert calculate_shift(4096) == pytest.approx(1.15, abs=1e-12)  # 1024 px
    assert calculate_shift(256) == pytest.approx(0.5, abs=1e-12)


def _shifted(mu: float, sigma: float) -> float:
    return math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)


@pytest.mark.parametrize(
    ("steps", "tokens", "spec"),
    [
        (4, 1024, [1.0, 0.8492, 0.6525, 0.3849, 0.0]),
        (2, 1024, [1.0, 0.6525, 0.0]),
        (1, 1024, [1.0, 0.0]),
        (4, 4096, [1.0, 0.9045, 0.7595, 0.5128, 0.0]),
    ],
)
def test_meanflow_sigmas_match_the_spec_and_the_formula(steps, tokens, spec):
    sigmas, timesteps = meanflow_sigmas(steps, tokens)
    torch.testing.assert_close(sigmas, torch.tensor(spec), atol=1e-4, rtol=0)
    mu = calculate_shift(tokens)
    by_hand = [_shifted(mu, 1 - k * (1 - 1 / steps) / max(steps - 1, 1)) for k in range(steps)] + [0.0]
    torch.testing.assert_close(sigmas.double(), torch.tensor(by_hand, dtype=torch.float64), atol=2e-7, rtol=0)
    torch.testing.assert_close(timesteps, sigmas[:-1] * 1000, atol=0, rtol=0)


def test_meanflow_uses_the_given_scheduler_config():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flat = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.0, max_shift=0.0)
    sigmas, _ = meanflow_sigmas(4, 1024, flat)  # μ = 0: no shift, the plain linspace
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=1e-6, rtol=0)
    assert flat.sigmas is sigmas  # the scheduler is left set up for stepping


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_step_counts_are_refused(bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        scm_timesteps(bad)
    with pytest.raises(ValueError, match="num_inference_steps"):
        meanflow_sigmas(bad, 1024)


def test_bad_angles_and_token_counts_are_refused():
    with pytest.raises(ValueError, match="intermediate_timestep"):
        scm_timesteps(2, 1.6)
    with pytest.raises(ValueError, match="max_timestep"):
        scm_timesteps(2, None, max_timestep=2.0)
    with pytest.raises(ValueError, match="image_seq_len"):
        calculate_shift(0)
    with pytest.raises(TypeError, match="scheduler"):
        meanflow_sigmas(2, 1024, scheduler=object())
