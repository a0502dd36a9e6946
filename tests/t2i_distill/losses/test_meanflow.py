"""MeanFlow loss: the reference mode against a per-sample hand-written computation of reference-spec §2.3 (float64,
fixed draws, every quirk flag), the three JVP modes against each other (fp32, parity rule), what each quirk flag
changes (and what it leaves alone), and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill import apply_kernels_to_flux
from t2i_distill.losses import MeanFlowConfig, meanflow_loss
from t2i_kernels.testing import assert_parity
from tests.t2i_distill.losses.helpers import (
    grads,
    make_batch,
    meanflow_draws,
    meanflow_models,
    null_condition,
    to_float64,
)
from tests.t2i_distill.losses.test_scm import _ids, _pack

# Four samples: CFG-eligible with r ≠ t; outside the CFG window; prompt dropped; CFG-eligible with r := t.
T4, R4, EQ4, DROP4 = [0.6, 0.95, 0.5, 0.7], [0.2, 0.4, 0.1, 0.3], [False, False, False, True], [False, False, True,
                                                                                                False]


def meanflow_oracle(student, teacher, batch, draws, null, config):
    """§2.3 written out per sample (batch of one each): the loss, mean e², and gradients in the models' .grad."""
    embeds_all, pooled_all, x0_all = batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["latents"]
    img_ids, txt_ids = _ids(batch)
    per_sample, sq_errors = [], []
    for b in range(x0_all.shape[0]):
        t = draws.t[b:b + 1]
        r = t.clone() if draws.equal_mask[b] else draws.r[b:b + 1]
        dropped = bool(draws.dropout_mask[b])
        cond = dict(encoder_hidden_states=null[0] if dropped else embeds_all[b:b + 1],
                    pooled_projections=null[1] if dropped else pooled_all[b:b + 1],
                    guidance=draws.guidance[b:b + 1], img_ids=img_ids, txt_ids=txt_ids)
        x0, eps = x0_all[b:b + 1], draws.noise[b:b + 1]
        if config.path_type == "linear":
            z, v = (1 - t) * x0 + t * eps, eps - x0
        else:
            a = math.pi / 2 * t
            z = torch.cos(a) * x0 + torch.sin(a) * eps
            v = -math.pi / 2 * torch.sin(a) * x0 + math.pi / 2 * torch.cos(a) * eps
        z, v = _pack(z), _pack(v)

        def u_fn(z_, t_, second, **kw):
            return student(hidden_states=z_, timestep=t_, timestep2=second, return_dict=False, **kw)[0]

        with sdpa_kernel(SDPBackend.MATH):
            u = u_fn(z, t, t - r, **cond)
        with torch.no_grad():
            v_teacher = teacher(hidden_states=z, timestep=t, return_dict=False, **cond)[0]
        in_cfg = config.use_cfg_meanflow and config.cfg_min_t <= float(t) <= config.cfg_max_t and not dropped
        if in_cfg:
            second = t - r if config.cfg_velocity_at == "r_t" else torch.zeros_like(t)
            uncond = {**cond, "encoder_hidden_states": null[0], "pooled_projections": null[1]}
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                u_c, u_u = u_fn(z, t, second, **cond), u_fn(z, t, second, **uncond)
            velocity = config.cfg_omega * v_teacher + config.cfg_kappa * u_c + (
                1 - config.cfg_omega - config.cfg_kappa) * u_u
            tangent = velocity
        else:
            velocity, tangent = v_teacher, (v_teacher if config.tangent == "teacher" else v)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # r fixed: d/dt of u(z(t), t, t − r)
            _, dudt = torch.func.jvp(lambda z_, t_: u_fn(z_, t_, t_ - r, **cond), (z, t), (tangent, torch.ones_like(t)))
        error = u - (velocity - (t - r) * dudt)
        sq = (error**2).sum()
        weight = 1 / (sq.detach() + config.adaptive_eps) ** config.adaptive_p if config.weighting == "adaptive" else 1
        per_sample.append(weight * sq)
        sq_errors.append(error.detach() ** 2)
    loss = torch.stack(per_sample).mean()
    loss.backward()
    return loss.detach(), torch.cat(sq_errors).mean()


ORACLE_CASES = [
    dict(use_cfg_meanflow=True, cfg_velocity_at="t", tangent="teacher"),
    dict(use_cfg_meanflow=True, cfg_velocity_at="r_t", tangent="data", path_type="cosine", weighting="uniform"),
    dict(use_cfg_meanflow=True, cfg_velocity_at="t", tangent="data", adaptive_p=0.5, cfg_omega=0.8),
    dict(use_cfg_meanflow=True, cfg_velocity_at="r_t", tangent="teacher", weighting="uniform"),
    dict(use_cfg_meanflow=False, tangent="data"),
    dict(use_cfg_meanflow=False, tangent="teacher", path_type="cosine"),
]


def _config(**kw) -> MeanFlowConfig:
    return MeanFlowConfig(**{"cfg_kappa": 0.5, "cfg_max_t": 0.9, **kw})


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_mode_matches_the_spec_written_out(case):
    config = _config(**case)
    student, teacher = meanflow_models()
    student, batch, draws, null = to_float64(student, make_batch(4), meanflow_draws(T4, R4, EQ4, DROP4),
                                             null_condition())
    teacher = teacher.double()
    oracle = copy.deepcopy(student)
    want, want_mean = meanflow_oracle(oracle, teacher, batch, draws, null, config)
    loss, logs = meanflow_loss(student, teacher, batch, config=config, null_condition=null, draws=draws,
                               jvp_mode="reference")
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(logs["loss_mean_ref"], want_mean, atol=1e-12, rtol=1e-10)
    assert float(logs["cfg_fraction"]) == (0.5 if config.use_cfg_meanflow else 0.0)  # samples 0 and 3
    ours, truth = grads(student), grads(oracle)
    assert set(ours) == set(truth) and any(n.startswith("timestep_embedder2") for n in ours)
    for name in truth:
        torch.testing.assert_close(ours[name], truth[name], atol=1e-11, rtol=1e-9, msg=name)


def _run(student, teacher, batch, draws, null, config, mode):
    student.zero_grad(set_to_none=True)
    loss, logs = meanflow_loss(student, teacher, batch, config=config, null_condition=null, draws=draws,
                               jvp_mode=mode)
    loss.backward()
    return loss.detach(), logs, grads(student)


PARITY_CASES = [("dual", "t", "teacher", True), ("dual", "r_t", "teacher", True), ("dual", "t", "data", True),
                ("dual", "r_t", "data", True), ("dual", "t", "data", False), ("func", "t", "teacher", True),
                ("func", "r_t", "data", True)]


@pytest.mark.parametrize("mode, velocity_at, tangent, use_cfg", PARITY_CASES)
def test_jvp_modes_agree_with_the_reference_mode(mode, velocity_at, tangent, use_cfg):
    """Two samples: one in CFG (r ≠ t), one outside the window (r ≠ t), so both JVP groups and both flags act."""
    config = _config(use_cfg_meanflow=use_cfg, cfg_velocity_at=velocity_at, tangent=tangent, weighting="uniform")
    student, teacher = meanflow_models()
    batch, draws, null = make_batch(2), meanflow_draws([0.6, 0.95], [0.2, 0.4], [False, False], [False, False]), \
        null_condition()
    s64, b64, d64, n64 = to_float64(student, batch, draws, null)
    truth = _run(s64, copy.deepcopy(teacher).double(), b64, d64, n64, config, "reference")
    same = _run(student, teacher, batch, draws, null, config, "reference")
    model = apply_kernels_to_flux(copy.deepcopy(student)) if mode == "func" else copy.deepcopy(student)
    ours = _run(model, teacher, batch, draws, null, config, mode)
    assert_parity("flux_model", "out", ours[0], same[0], truth[0])
    assert_parity("flux_model", "out", ours[1]["loss_mean_ref"], same[1]["loss_mean_ref"], truth[1]["loss_mean_ref"])
    assert set(ours[2]) == set(truth[2])
    for name in truth[2]:
        assert_parity("flux_model", "dparam", ours[2][name], same[2][name], truth[2][name])


def _reference_loss(config, draws, models=None):
    student, teacher = models or meanflow_models()
    student, batch, draws, null = to_float64(student, make_batch(len(draws.t)), draws, null_condition())
    loss, _ = meanflow_loss(student, teacher.double(), batch, config=config, null_condition=null, draws=draws,
                            jvp_mode="reference")
    loss.backward()
    return loss.detach(), grads(student)


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


def test_cfg_velocity_at_changes_only_where_the_cfg_velocities_are_evaluated():
    draws = meanflow_draws(T4, R4, EQ4, DROP4)
    models = meanflow_models()
    on_t, on_rt = (_reference_loss(_config(use_cfg_meanflow=True, cfg_velocity_at=v), draws, models)
                   for v in ("t", "r_t"))
    assert not _same(on_t, on_rt)  # sample 0: u(z, t, t) vs u(z, r, t)
    # without CFG, or when every CFG sample has r = t, the two evaluation points coincide
    off = [_reference_loss(_config(use_cfg_meanflow=False, cfg_velocity_at=v), draws, models) for v in ("t", "r_t")]
    assert _same(*off)
    equal = meanflow_draws(T4, R4, [True, False, False, True], DROP4)
    assert _same(*[_reference_loss(_config(use_cfg_meanflow=True, cfg_velocity_at=v), equal, models)
                   for v in ("t", "r_t")])


def test_tangent_changes_only_the_jvp_direction_outside_cfg():
    models = meanflow_models()
    draws = meanflow_draws(T4, R4, EQ4, DROP4)
    assert not _same(*[_reference_loss(_config(use_cfg_meanflow=True, tangent=k), draws, models)
                       for k in ("teacher", "data")])
    # if every sample outside CFG has r = t, du/dt is multiplied by 0 there: the tangent cannot matter
    outside_equal = meanflow_draws(T4, R4, [False, True, True, True], DROP4)
    assert _same(*[_reference_loss(_config(use_cfg_meanflow=True, tangent=k), outside_equal, models)
                   for k in ("teacher", "data")])
    # CFG samples always use ṽ: a batch entirely in CFG is unaffected
    all_cfg = meanflow_draws([0.6, 0.4], [0.2, 0.1], [False, False], [False, False])
    assert _same(*[_reference_loss(_config(use_cfg_meanflow=True, tangent=k), all_cfg, models)
                   for k in ("teacher", "data")])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_loss_never_toggles_gradient_checkpointing(checkpointing):
    student, teacher = meanflow_models()
    if checkpointing:
        student.enable_gradient_checkpointing()
    meanflow_loss(student, teacher, make_batch(4), config=_config(use_cfg_meanflow=True),
                  null_condition=null_condition(), draws=meanflow_draws(T4, R4, EQ4, DROP4),
                  jvp_mode="reference")[0].backward()
    assert student.gradient_checkpointing is checkpointing


def test_bad_input_names_the_argument():
    student, teacher = meanflow_models()
    batch, draws, null = make_batch(4), meanflow_draws(T4, R4, EQ4, DROP4), null_condition()
    with pytest.raises(ValueError, match="null_prompt_embeds"):
        meanflow_loss(student, teacher, batch, null_condition=(null[0][:, :2], null[1]), draws=draws)
    with pytest.raises(TypeError, match="null_condition"):
        meanflow_loss(student, teacher, batch, null_condition=None, draws=draws)
    with pytest.raises(TypeError, match="dual_timestep=True"):
        meanflow_loss(teacher, teacher, batch, null_condition=null, draws=draws)
    with pytest.raises(TypeError, match="teacher"):
        meanflow_loss(student, student, batch, null_condition=null, draws=draws)
    bad = meanflow_draws([0.2, 0.95, 0.5, 0.7], [0.6, 0.4, 0.1, 0.3], EQ4, DROP4)
    with pytest.raises(ValueError, match="r <= t"):
        meanflow_loss(student, teacher, batch, null_condition=null, draws=bad)
    with pytest.raises(ValueError, match="equal_mask"):
        meanflow_loss(student, teacher, batch, null_condition=null,
                      draws=meanflow_draws(T4, R4, [0.0, 1.0, 0.0, 0.0], DROP4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        meanflow_loss(student, teacher, {**batch, "pooled_prompt_embeds": batch["pooled_prompt_embeds"][:3]},
                      null_condition=null, draws=draws)
