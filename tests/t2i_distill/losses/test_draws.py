"""Draws: the reference's RNG order without a generator, reproducibility with one, and the true meaning of
``ratio_r_not_equal_t`` (B3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_distill.losses import MeanFlowConfig, SCMConfig, draw_meanflow, draw_scm

LATENTS = {"latents": torch.zeros(5, 4, 4, 4)}


def test_scm_draws_follow_the_reference_rng_order():
    np.random.seed(7)
    torch.manual_seed(7)
    draws = draw_scm(LATENTS, SCMConfig(scm_cfg_scale=(4, 4.5, 5)))
    np.random.seed(7)
    torch.manual_seed(7)
    guidance = torch.tensor(np.random.choice([4, 4.5, 5], size=5, replace=True))
    noise = torch.randn_like(LATENTS["latents"])
    normal = torch.randn(5, device="cpu")
    assert torch.equal(draws.guidance, guidance) and draws.guidance.dtype == torch.float64
    assert torch.equal(draws.noise, noise) and torch.equal(draws.time_normal, normal)


@pytest.mark.parametrize("sampler", ["logit_normal", "uniform"])
def test_meanflow_draws_follow_the_reference_rng_order(sampler):
    config = MeanFlowConfig(time_sampler=sampler, cfg_scale=(4, 4.5, 5))
    np.random.seed(3)
    torch.manual_seed(3)
    draws = draw_meanflow(LATENTS, config)
    np.random.seed(3)
    torch.manual_seed(3)
    guidance = torch.tensor(np.random.choice([4, 4.5, 5], size=5, replace=True))
    dropout = torch.rand(5) < 0.1
    pair = torch.rand(5, 2) if sampler == "uniform" else torch.sigmoid(torch.randn(5, 2) * 1.0 - 0.4)
    pair, _ = torch.sort(pair, dim=1)
    equal = torch.rand(5) < 0.25
    noise = torch.randn_like(LATENTS["latents"])
    assert torch.equal(draws.guidance, guidance)
    assert torch.equal(draws.dropout_mask, dropout) and torch.equal(draws.equal_mask, equal)
    assert torch.equal(draws.r, pair[:, 0]) and torch.equal(draws.t, pair[:, 1]) and torch.equal(draws.noise, noise)
    r, t = draws.times()
    assert torch.equal(r, torch.where(equal, pair[:, 1], pair[:, 0]))


def test_no_dropout_draw_when_cfg_prob_is_zero():
    torch.manual_seed(0)
    np.random.seed(0)
    draws = draw_meanflow(LATENTS, MeanFlowConfig(cfg_prob=0.0))
    torch.manual_seed(0)
    np.random.seed(0)
    np.random.choice([4.0], size=5)
    pair = torch.sort(torch.sigmoid(torch.randn(5, 2) - 0.4), dim=1)[0]  # the time pair comes first
    assert not draws.dropout_mask.any() and torch.equal(draws.t, pair[:, 1])


def test_ratio_r_not_equal_t_is_the_share_of_samples_with_r_different_from_t():
    big = {"latents": torch.zeros(4000, 1, 2, 2)}
    gen = torch.Generator().manual_seed(0)
    draws = draw_meanflow(big, MeanFlowConfig(ratio_r_not_equal_t=0.75), generator=gen)
    r, t = draws.times()
    share = float((r != t).float().mean())
    assert abs(share - 0.75) < 0.03, share  # 75 % r ≠ t, not 25 % as the reference's comment says
    assert bool((draws.r <= draws.t).all()) and bool(((draws.t > 0) & (draws.t < 1)).all())


def test_a_generator_makes_draws_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(1)
    np.random.seed(1)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = draw_meanflow(LATENTS, MeanFlowConfig(), generator=torch.Generator().manual_seed(9))
    b = draw_meanflow(LATENTS, MeanFlowConfig(), generator=torch.Generator().manual_seed(9))
    c = draw_scm(LATENTS, SCMConfig(), generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("noise", "guidance", "r", "t", "equal_mask"))
    assert set(c.guidance.tolist()) <= {4.0, 4.5, 5.0}
    assert torch.equal(torch.get_rng_state(), state) and (np.random.get_state()[1] == np_state).all()
