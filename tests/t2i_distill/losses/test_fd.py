"""``jvp_mode="fd"``: the finite-difference tangent (rCM's Δt, FastGen's ``use_jvp_finite_diff``) agrees with the
forward-AD modes within its finite-difference error on the tiny model, and converges like a first-order difference.
Measured here (fp32, CPU): sCM loss 1.6e-6 / gradients 3e-4 relative to the reference mode at ε = 1e-3; MeanFlow
1e-4 / 1.3e-4."""

from __future__ import annotations

import copy

import pytest
import torch

from t2i_distill import apply_kernels_to_flux
from t2i_distill.losses import MeanFlowConfig, SCMConfig, meanflow_loss, scm_loss
from tests.t2i_distill.losses.helpers import (
    grads,
    make_batch,
    meanflow_draws,
    meanflow_models,
    null_condition,
    scm_draws,
    scm_models,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _scm(student, teacher, mode, eps=1e-3):
    student.zero_grad(set_to_none=True)
    loss, _ = scm_loss(student, teacher, make_batch(2), step=2000, config=SCMConfig(fd_epsilon=eps),
                       draws=scm_draws(2), jvp_mode=mode)
    loss.backward()
    return loss.detach(), grads(student)


def test_scm_fd_agrees_with_the_ad_modes_within_its_error_and_converges():
    student, teacher = scm_models()
    reference = _scm(copy.deepcopy(student), teacher, "reference")
    func = _scm(apply_kernels_to_flux(copy.deepcopy(student)), teacher, "func")
    fd = _scm(copy.deepcopy(student), teacher, "fd")
    assert _rel(fd[0], reference[0]) < 1e-4 and _rel(func[0], reference[0]) < 1e-5
    assert max(_rel(fd[1][k], reference[1][k]) for k in reference[1]) < 5e-3
    coarse = _scm(copy.deepcopy(student), teacher, "fd", eps=1e-2)
    assert _rel(coarse[0], reference[0]) > 3 * _rel(fd[0], reference[0])  # first order: error shrinks with ε
    patched = _scm(apply_kernels_to_flux(copy.deepcopy(student)), teacher, "fd")  # the fast path takes it too
    assert _rel(patched[0], fd[0]) < 1e-4


@pytest.mark.parametrize("cfg", [False, True])
def test_meanflow_fd_agrees_with_the_reference_mode_within_its_error(cfg):
    student, teacher = meanflow_models()
    draws = meanflow_draws([0.6, 0.95], [0.2, 0.4], [False, False], [False, False])

    def run(model, mode):
        model.zero_grad(set_to_none=True)
        config = MeanFlowConfig(weighting="uniform", use_cfg_meanflow=cfg, cfg_kappa=0.5 if cfg else 0.0)
        loss, _ = meanflow_loss(model, teacher, make_batch(2), config=config, null_condition=null_condition(),
                                draws=draws, jvp_mode=mode)
        loss.backward()
        return loss.detach(), grads(model)

    reference, fd = run(copy.deepcopy(student), "reference"), run(copy.deepcopy(student), "fd")
    assert _rel(fd[0], reference[0]) < 1e-3
    assert max(_rel(fd[1][k], reference[1][k]) for k in reference[1]) < 5e-3


def test_fd_epsilon_must_be_positive():
    with pytest.raises(ValueError, match="fd_epsilon"):
        SCMConfig(fd_epsilon=0.0)
    with pytest.raises(ValueError, match="fd_epsilon"):
        MeanFlowConfig(fd_epsilon=float("nan"))
