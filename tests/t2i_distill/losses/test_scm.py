"""sCM loss: the reference mode against a hand-written computation of reference-spec §2.2 (float64, fixed draws),
the three JVP modes against each other (parity rule of t2i_kernels/testing.py, fp32), the B9 flag, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill import apply_kernels_to_flux
from t2i_distill.losses import SCMConfig, SCMDraws, scm_loss
from t2i_kernels.testing import assert_parity
from tests.t2i_distill.losses.helpers import grads, make_batch, scm_draws, scm_models, to_float64


def _pack(x):  # (B, C, h, w) -> (B, h/2·w/2, 4C), channel order (c, dy, dx): reference-spec §2.1
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def _ids(batch):
    h, w = batch["latents"].shape[2:]
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    dtype = batch["latents"].dtype
    return img.to(dtype), torch.zeros(batch["prompt_embeds"].shape[1], 3, dtype=dtype)


def scm_oracle(student, teacher, batch, draws, step, config):
    """§2.2 written out from the spec: the loss and its gradients (in the models' .grad)."""
    sd = config.sigma_data
    sampler_sigma = sd if config.time_sampler_sigma == "sigma_data" else 0.5
    t = torch.atan(torch.exp(config.logit_std * draws.time_normal + config.logit_mean) / sampler_sigma)
    t = t.to(batch["latents"].dtype)
    t4 = t[:, None, None, None]
    x_t = _pack(torch.cos(t4) * (sd * batch["latents"]) + torch.sin(t4) * (sd * draws.noise))
    x_hat = x_t / sd
    img_ids, txt_ids = _ids(batch)
    cond = dict(encoder_hidden_states=batch["prompt_embeds"], pooled_projections=batch["pooled_prompt_embeds"],
                img_ids=img_ids, txt_ids=txt_ids, guidance=draws.guidance)
    with torch.no_grad():
        f_teacher = teacher(hidden_states=x_hat, timestep=t, **cond)
    t3 = t[:, None, None]
    cs = torch.cos(t3) * torch.sin(t3)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, f_dot = torch.func.jvp(lambda x, tt: student(hidden_states=x, timestep=tt, **cond), (x_hat, t),
                                  (cs * f_teacher, cs.reshape(-1)))
    with sdpa_kernel(SDPBackend.MATH):
        f_theta, logvar = student(hidden_states=x_hat, timestep=t, return_logvar=True, **cond)
    warm = min(1.0, step / config.tangent_warmup_steps)
    g = -torch.cos(t3) ** 2 * (sd * f_theta.detach() - sd * f_teacher) - warm * (cs * x_t + sd * f_dot)
    g = g / (g.flatten(1).norm(dim=1)[:, None, None] + 0.1)
    weight = 1 / (sd * torch.tan(t3))
    lv = logvar[:, :, None]
    loss = (weight * torch.exp(-lv) * (f_theta - f_theta.detach() - g) ** 2 + lv).mean() * config.scm_lambda
    loss.backward()
    return loss.detach(), (g**2).mean()


@pytest.mark.parametrize("step", [0, 1000, 9000])  # no tangent, warming up, fully on
@pytest.mark.parametrize("sampler", ["sigma_data", "reference"])
def test_reference_mode_matches_the_spec_written_out(step, sampler):
    student, teacher = scm_models()
    config = SCMConfig(sigma_data=0.6, logit_mean=0.2, logit_std=1.6, scm_lambda=0.7, time_sampler_sigma=sampler)
    student, batch, draws, _ = to_float64(student, make_batch(3), scm_draws(3))
    teacher = teacher.double()
    oracle = copy.deepcopy(student)
    want, want_l2 = scm_oracle(oracle, teacher, batch, draws, step, config)
    loss, logs = scm_loss(student, teacher, batch, step=step, config=config, draws=draws, jvp_mode="reference")
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logs["l2_loss"], want_l2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logs["loss_sCM"] * 0.7, want, atol=1e-12, rtol=1e-12)
    ours, truth = grads(student), grads(oracle)
    assert set(ours) == set(truth) and "logvar_linear.weight" in ours
    for name in truth:
        torch.testing.assert_close(ours[name], truth[name], atol=1e-12, rtol=1e-10, msg=name)


def _run(student, teacher, batch, draws, mode, step=2000, config=SCMConfig()):
    student.zero_grad(set_to_none=True)
    loss, logs = scm_loss(student, teacher, batch, step=step, config=config, draws=draws, jvp_mode=mode)
    loss.backward()
    return loss.detach(), logs, grads(student)


@pytest.mark.parametrize("mode", ["dual", "func"])
def test_jvp_modes_agree_with_the_reference_mode(mode):
    """fp32 loss and every parameter gradient of ``mode`` vs the reference mode, float64 reference as truth."""
    student, teacher = scm_models()
    batch, draws = make_batch(2), scm_draws(2)
    s64, b64, d64, _ = to_float64(student, batch, draws)
    truth = _run(s64, copy.deepcopy(teacher).double(), b64, d64, "reference")
    same = _run(student, teacher, batch, draws, "reference")
    model = apply_kernels_to_flux(copy.deepcopy(student)) if mode == "func" else copy.deepcopy(student)
    ours = _run(model, teacher, batch, draws, mode)
    assert_parity("flux_model", "out", ours[0], same[0], truth[0])
    for key in ("l2_loss", "g_norm", "mean_weight"):
        assert_parity("flux_model", "out", ours[1][key], same[1][key], truth[1][key])
    assert set(ours[2]) == set(truth[2])
    for name in truth[2]:
        assert_parity("flux_model", "dparam", ours[2][name], same[2][name], truth[2][name])


def test_time_sampler_sigma_changes_only_the_time_divisor():
    n = torch.tensor([-1.0, 0.0, 0.5])
    draws = SCMDraws(noise=torch.zeros(3, 4, 4, 4), guidance=torch.ones(3, dtype=torch.float64), time_normal=n)
    sigma = torch.exp(1.6 * n + 0.2)
    fixed = draws.angles(SCMConfig(sigma_data=0.8, logit_mean=0.2, logit_std=1.6))
    ref = draws.angles(SCMConfig(sigma_data=0.8, logit_mean=0.2, logit_std=1.6, time_sampler_sigma="reference"))
    torch.testing.assert_close(fixed, torch.atan(sigma / 0.8), atol=0, rtol=0)
    torch.testing.assert_close(ref, torch.atan(sigma / 0.5), atol=0, rtol=0)
    # at the default σ_d = 0.5 the fix changes nothing; given angles are used as they are
    assert torch.equal(draws.angles(SCMConfig()), draws.angles(SCMConfig(time_sampler_sigma="reference")))
    given = SCMDraws(noise=draws.noise, guidance=draws.guidance, t=torch.tensor([0.3, 0.6, 0.9]))
    assert torch.equal(given.angles(SCMConfig(sigma_data=0.8)), torch.tensor([0.3, 0.6, 0.9]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_loss_never_toggles_gradient_checkpointing(checkpointing):
    student, teacher = scm_models()
    if checkpointing:
        student.enable_gradient_checkpointing()
    scm_loss(student, teacher, make_batch(2), step=10, draws=scm_draws(2), jvp_mode="reference")[0].backward()
    assert student.gradient_checkpointing is checkpointing


def test_without_draws_the_reference_rng_order_is_followed():
    student, teacher = scm_models()
    batch = make_batch(2)
    torch.manual_seed(3)
    import numpy as np

    np.random.seed(3)
    first = scm_loss(student, teacher, batch, step=5, jvp_mode="reference")[0]
    torch.manual_seed(3)
    np.random.seed(3)
    expected = SCMDraws(guidance=torch.tensor(np.random.choice((4.0, 4.5, 5.0), size=2, replace=True)),
                        noise=torch.randn(2, 4, 4, 4), time_normal=torch.randn(2))
    again = scm_loss(student, teacher, batch, step=5, draws=expected, jvp_mode="reference")[0]
    assert torch.equal(first, again)


def test_bad_input_names_the_argument():
    student, teacher = scm_models()
    batch, draws = make_batch(2), scm_draws(2)
    with pytest.raises(ValueError, match="jvp_mode"):
        scm_loss(student, teacher, batch, step=0, draws=draws, jvp_mode="forward")
    with pytest.raises(ValueError, match="apply_kernels_to_flux"):
        scm_loss(student, teacher, batch, step=0, draws=draws, jvp_mode="func")
    with pytest.raises(ValueError, match="unpatched"):
        scm_loss(apply_kernels_to_flux(copy.deepcopy(student)), teacher, batch, step=0, draws=draws,
                 jvp_mode="reference")
    with pytest.raises(ValueError, match="step"):
        scm_loss(student, teacher, batch, step=-1, draws=draws)
    with pytest.raises(ValueError, match="in_channels"):
        scm_loss(student, teacher, {**batch, "latents": torch.randn(2, 3, 4, 4)}, step=0)
    with pytest.raises(ValueError, match="noise"):
        scm_loss(student, teacher, batch, step=0, draws=SCMDraws(noise=torch.randn(2, 4, 2, 2),
                                                                 guidance=draws.guidance, t=torch.ones(2)))
    with pytest.raises(ValueError, match=r"\(0, π/2\)"):
        scm_loss(student, teacher, batch, step=0, draws=SCMDraws(noise=draws.noise, guidance=draws.guidance,
                                                                 t=torch.tensor([0.5, math.pi / 2])))
    with pytest.raises(ValueError, match="exactly one"):
        scm_loss(student, teacher, batch, step=0, draws=SCMDraws(noise=draws.noise, guidance=draws.guidance))
    with pytest.raises(TypeError, match="teacher"):
        scm_loss(student, torch.nn.Linear(2, 2), batch, step=0)
    with pytest.raises(ValueError, match="missing"):
        scm_loss(student, teacher, {"latents": batch["latents"]}, step=0)
