"""The explicit dual forward (flux_forward_jvp) against torch.func.jvp of the unpatched student (float64 truth),
with and without grad, for the flow and the dual-timestep (MeanFlow) student; and its building blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from t2i_distill import apply_kernels_to_flux
from t2i_distill.models import TrigFlowStudent, dual_forward
from t2i_distill.models.dual_forward import dual_linear, flux_forward_jvp, trigflow_forward_jvp
from t2i_kernels.testing import assert_parity
from tests.t2i_distill.flux_helpers import TINY_CONFIGS, as_dtype, build, call, reference_jvp, split_inputs

F64 = torch.float64


def _meanflow_student(**overrides):
    model = build(dual_timestep=True, **overrides)
    with torch.no_grad():  # MeanFlow initialises the second embedder from the first; perturb so they differ
        for p2, p1 in zip(model.timestep_embedder2.parameters(), model.time_text_embed.timestep_embedder.parameters()):
            p2.copy_(p1 + 0.05 * torch.randn_like(p1))
    return model


@pytest.mark.parametrize("kind", ["flow", "meanflow"])
@pytest.mark.parametrize("name, overrides", TINY_CONFIGS, ids=[c[0] for c in TINY_CONFIGS])
def test_dual_forward_matches_func_jvp_of_the_reference(kind, name, overrides):
    model = build(**overrides) if kind == "flow" else _meanflow_student(**overrides)
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    extra, t_extra = {}, {}
    if kind == "meanflow":  # MeanFlow's tangent (v, 0, 1) on (z, r, t) feeds 1 into both t and t − r
        t2 = t * 0.4
        extra, t_extra = {"timestep2": t2}, {"t_timestep2": torch.ones_like(t2)}

    def reference(model, x, t, tx, tt, rest):
        if kind == "flow":
            return reference_jvp(model, x, t, tx, tt, rest)
        with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return torch.func.jvp(lambda x, t, t2: call(model, x, t, rest, timestep2=t2),
                                  (x, t, extra["timestep2"].to(x.dtype)),
                                  (tx, tt, t_extra["t_timestep2"].to(x.dtype)))

    truth_model, truth_rest = as_dtype(model, rest, F64)
    truth_o, truth_t = reference(truth_model, x.double(), t.double(), tx.double(), tt.double(), truth_rest)
    same_o, same_t = reference(model, x, t, tx, tt, rest)
    with torch.no_grad():
        ours_o, ours_t = flux_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, **rest, **extra, **t_extra)
    assert_parity("flux_model", "out", ours_o, same_o, truth_o)
    assert_parity("flux_model", "tangent", ours_t, same_t, truth_t)


def test_trigflow_dual_forward_matches_func_jvp_of_the_scm_student():
    model = build(TrigFlowStudent)
    x, _, rest = split_inputs(model)
    t = torch.tensor([0.3, 1.1])  # TrigFlow angles
    tx, tt = torch.randn_like(x), torch.cos(t) * torch.sin(t)  # the sCM tangent of t

    def reference(model, x, t, tx, tt, rest):
        with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return torch.func.jvp(lambda x, t: model(hidden_states=x, timestep=t, **rest), (x, t), (tx, tt))

    truth_model, truth_rest = as_dtype(model, rest, F64)
    truth_o, truth_t = reference(truth_model, x.double(), t.double(), tx.double(), tt.double(), truth_rest)
    same_o, same_t = reference(model, x, t, tx, tt, rest)
    with torch.no_grad():
        ours_o, ours_t, logvar = trigflow_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, return_logvar=True,
                                                      **rest)
    assert_parity("flux_model", "out", ours_o, same_o, truth_o)
    assert_parity("flux_model", "tangent", ours_t, same_t, truth_t)
    torch.testing.assert_close(logvar, model.logvar(t, rest["pooled_projections"], rest["guidance"]), atol=0,
                               rtol=0)


def test_with_grad_the_primal_trains_and_the_tangent_is_detached():
    model = build()
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    with torch.no_grad():
        _, no_grad_t = flux_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, **rest)
    out, tangent = flux_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, **rest)
    assert out.requires_grad and not tangent.requires_grad
    torch.testing.assert_close(tangent, no_grad_t, atol=1e-6, rtol=1e-6)  # one GEMM vs two: rounding only

    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (call(model, x, t, rest) * weights).sum().backward()
    same = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    truth_model, truth_rest = as_dtype(model, rest, F64)
    (call(truth_model, x.double(), t.double(), truth_rest) * weights.double()).sum().backward()
    truth = {n: p.grad for n, p in truth_model.named_parameters() if p.grad is not None}
    assert set(ours) == set(same)
    for name in same:
        assert_parity("flux_model", "dparam", ours[name], same[name], truth[name])


def test_patched_and_unpatched_models_give_the_same_dual_forward():
    model = build()
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    with torch.no_grad():
        plain = flux_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, **rest)
        patched = flux_forward_jvp(apply_kernels_to_flux(copy.deepcopy(model)), x, tx, timestep=t, t_timestep=tt,
                                   **rest)
    for a, b in zip(plain, patched):
        assert torch.equal(a, b)  # the dual forward calls the kernels directly, whatever the patch state


@pytest.mark.parametrize("grad", [False, True])
def test_dual_linear(grad):
    linear = torch.nn.Linear(12, 7).double()
    x, tx = torch.randn(3, 5, 12, dtype=F64), torch.randn(3, 5, 12, dtype=F64)
    with torch.set_grad_enabled(grad):
        y, ty = dual_linear(linear, x, tx)
    torch.testing.assert_close(y, linear(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(ty, tx @ linear.weight.T, atol=1e-12, rtol=0)
    assert y.requires_grad == grad and not ty.requires_grad
    if grad:  # the weight's gradient comes from the primal rows only
        y.sum().backward()
        torch.testing.assert_close(linear.weight.grad, x.reshape(-1, 12).sum(0).expand(7, 12), atol=1e-12, rtol=0)


def test_dual_linear_without_a_tangent_is_the_primal_alone():
    linear = torch.nn.Linear(12, 7).double()
    x = torch.randn(3, 5, 12, dtype=F64)
    y, ty = dual_linear(linear, x, None)  # a checkpointed block's recompute
    assert ty is None and torch.equal(y, linear(x)) and y.requires_grad


def test_dual_linear_takes_separate_gemms_in_a_checkpointed_forward(monkeypatch):
    """Without grad one GEMM serves [x; tx]; in a checkpointed block's forward (also without grad) the primal is
    ``linear(x)`` alone, as the unchecked pass and the backward's recompute compute it (a GEMM over 2× the rows, or a
    bias added after it, may round otherwise on a GPU)."""
    linear = torch.nn.Linear(12, 7)
    x, tx = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    rows, original = [], torch.nn.functional.linear

    def spy(inp, weight, bias=None):
        rows.append(inp.shape[0])
        return original(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        dual_linear(linear, x, tx)
        assert rows == [6]
        rows.clear()
        with dual_forward._separate_gemms():
            y, ty = dual_linear(linear, x, tx)
        assert rows == [3, 3]
        assert torch.equal(y, original(x, linear.weight, linear.bias)) and torch.equal(ty, original(tx, linear.weight))
        rows.clear()
        dual_linear(linear, x, tx)  # the flag is reset on exit
        assert rows == [6]


def test_unsupported_configurations_raise():
    model = build(attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    x, t, rest = split_inputs(model)
    with pytest.raises(ValueError, match="head dim 16"):
        flux_forward_jvp(model, x, torch.zeros_like(x), timestep=t, t_timestep=torch.ones_like(t), **rest)
    model = build()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV"):
        flux_forward_jvp(model, x, torch.zeros_like(x), timestep=t, t_timestep=torch.ones_like(t), **rest)
