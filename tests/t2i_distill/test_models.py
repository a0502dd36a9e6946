"""The reference's model conventions on tiny FLUX configs: ×1 time inputs, the dual timestep, and the TrigFlow student.

CPU only; every model is built locally from :data:`t2i_distill.tiny.TINY_FLUX_CONFIG`.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill.models import (
    FluxStudent,
    TrigFlowStudent,
    flow_input_scale,
    flow_to_trigflow_velocity,
    trigflow_to_flow_time,
)
from t2i_distill.tiny import TINY_FLUX_CONFIG, build_tiny_flux, tiny_flux_inputs

#: The TrigFlow maps are a few float64 ops on O(1) values: they must reproduce the identities to rounding.
MAP_ATOL_F64 = 1e-13

#: Central finite differences of the float64 model. diffusers computes the sinusoidal time embedding and RoPE in fp32
#: even for float64 inputs (``timesteps.float()``, ``x.float() * cos``), so every evaluation carries ~1e-7 relative
#: rounding; the fourth-order stencil's truncation is O(h⁴) ≈ 1e-8 at this step, its rounding ≈ 1e-7/h ≈ 1e-5.
#: Measured: ≤ 3e-5 of max|tangent| (logvar, whose tangent is small); the bound leaves ~15× headroom.
FD_STEP = 1e-2
FD_RTOL = 5e-4


def _inputs_like(model, dtype=None, seed=0):
    inputs = tiny_flux_inputs(model, seed=seed)
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
                  for k, v in inputs.items()}
    return inputs


def _student_like(model, cls=FluxStudent, **config):
    """A ``cls`` with ``model``'s weights (strict: the same keys, apart from heads ``cls`` adds and initialises)."""
    student = cls(**{**TINY_FLUX_CONFIG, **config}).to(dtype=next(model.parameters()).dtype).eval()
    result = student.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("logvar_linear.", "timestep_embedder2.")) for k in result.missing_keys)
    return student


# -- ×1 semantics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_scale_1000_is_stock_flux_bit_for_bit(dtype):
    stock = build_tiny_flux(seed=1, dtype=dtype)
    student = _student_like(stock, time_scale=1000.0)
    inputs = _inputs_like(stock)
    with torch.no_grad():
        expected = stock(**inputs, return_dict=False)[0]
        got = student(**inputs, return_dict=False)[0]
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_x1_conditioning_is_time_text_embed_of_the_raw_inputs():
    x1 = _student_like(build_tiny_flux(seed=2), time_scale=1.0)
    x1000 = _student_like(build_tiny_flux(seed=2), time_scale=1000.0)
    inputs = _inputs_like(x1)
    t, g, pooled = inputs["timestep"], inputs["guidance"], inputs["pooled_projections"]

    seen = {}
    handle = x1.time_text_embed.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        x1(**inputs)
        direct = x1.time_text_embed(t, g, pooled)
    handle.remove()
    assert torch.equal(seen["args"][0], t) and torch.equal(seen["args"][1], g)
    assert torch.equal(seen["out"], direct)
    with torch.no_grad():
        assert torch.equal(x1.conditioning(t, pooled, g), direct)
        assert not torch.allclose(x1000.conditioning(t, pooled, g), direct)


def test_dual_timestep_adds_the_second_embedder_of_t_minus_r():
    model = FluxStudent(**TINY_FLUX_CONFIG, dual_timestep=True).eval()
    inputs = _inputs_like(model)
    t, g, pooled = inputs["timestep"], inputs["guidance"], inputs["pooled_projections"]
    delta = t * 0.25
    with torch.no_grad():
        temb = model.conditioning(t, pooled, g, timestep2=delta)
        expected = model.time_text_embed(t, g, pooled) + model.timestep_embedder2(model.time_proj2(delta))
    assert torch.equal(temb, expected)
    with pytest.raises(ValueError, match="timestep2"):
        model.conditioning(t, pooled, g)


# -- TrigFlow maps ----------------------------------------------------------------------------------------------------
def test_trigflow_maps_satisfy_the_spec_identities_in_float64():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([1e-4, 0.3, math.pi / 4, 1.2, math.pi / 2 - 1e-4], dtype=torch.float64).view(-1, 1, 1)
    x_hat = torch.cos(t) * x0 + torch.sin(t) * eps

    s = trigflow_to_flow_time(t)
    assert s.dtype == torch.float64 and bool(((s > 0) & (s < 1)).all())
    torch.testing.assert_close(s.flatten()[2], torch.tensor(0.5, dtype=torch.float64), atol=MAP_ATOL_F64, rtol=0)
    torch.testing.assert_close(flow_input_scale(s), 1 / (torch.cos(t) + torch.sin(t)), atol=MAP_ATOL_F64, rtol=0)

    x_s = flow_input_scale(s) * x_hat  # the FLUX interpolant at time s
    torch.testing.assert_close(x_s, (1 - s) * x0 + s * eps, atol=MAP_ATOL_F64, rtol=0)
    velocity = flow_to_trigflow_velocity(x_s, eps - x0, s)  # FLUX's exact velocity → TrigFlow's
    torch.testing.assert_close(velocity, torch.cos(t) * eps - torch.sin(t) * x0, atol=MAP_ATOL_F64, rtol=0)


# -- TrigFlow student -------------------------------------------------------------------------------------------------
def test_trigflow_state_dict_is_flux_plus_the_logvar_head():
    model = TrigFlowStudent(**TINY_FLUX_CONFIG)
    flux_keys = set(FluxTransformer2DModel(**TINY_FLUX_CONFIG).state_dict())
    assert set(model.state_dict()) == flux_keys | {"logvar_linear.weight", "logvar_linear.bias"}
    assert model.logvar_linear.weight.shape == (1, model.inner_dim)
    assert torch.count_nonzero(model.logvar_linear.bias) == 0
    xavier_bound = math.sqrt(6.0 / (model.inner_dim + 1))
    assert float(model.logvar_linear.weight.detach().abs().max()) <= xavier_bound
    with pytest.raises(ValueError, match="dual_timestep"):
        TrigFlowStudent(**TINY_FLUX_CONFIG, dual_timestep=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trigflow_forward_shapes_and_dtypes(dtype):
    model = _student_like(build_tiny_flux(seed=3, dtype=dtype), TrigFlowStudent)
    inputs = _inputs_like(model)
    batch, tokens, channels = inputs["hidden_states"].shape
    with torch.no_grad():
        velocity, logvar = model(**inputs, return_logvar=True)
        alone = model(**inputs)
        one_t = model(**{**inputs, "timestep": inputs["timestep"][:1]})
        t0_for_all = model(**{**inputs, "timestep": inputs["timestep"][:1].expand(batch)})
    assert velocity.shape == (batch, tokens, channels) and velocity.dtype == dtype
    assert logvar.shape == (batch, 1) and logvar.dtype == dtype
    assert torch.equal(alone, velocity)
    assert torch.equal(one_t, t0_for_all)
    assert bool(torch.isfinite(velocity).all() and torch.isfinite(logvar).all())
    with pytest.raises(ValueError, match="timestep"):
        model(**{**inputs, "timestep": inputs["timestep"].repeat(2)})
    with pytest.raises(ValueError, match="hidden_states"):
        model(**{**inputs, "hidden_states": inputs["hidden_states"][None]})


def test_trigflow_forward_is_the_reference_composition_with_its_casts():
    """bf16 weights and prompts, fp32 x̂ and t (as the reference's teacher call): t and x_s are cast to the prompt
    dtype before the maps and the flow model, the flow model sees s, and the logvar head sees the TrigFlow t."""
    flow = _student_like(build_tiny_flux(seed=4, dtype=torch.bfloat16), time_scale=1.0)
    model = _student_like(flow, TrigFlowStudent)
    inputs = _inputs_like(model)
    x_hat = torch.randn(inputs["hidden_states"].shape)  # fp32
    t = torch.rand(x_hat.shape[0]) * (math.pi / 2)  # fp32
    guidance = inputs["guidance"].double()  # the reference's guidance is float64 (np.random.choice)
    kwargs = {k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")}
    with torch.no_grad():
        velocity, logvar = model(hidden_states=x_hat, timestep=t, guidance=guidance, return_logvar=True, **kwargs)

        t_b = t.to(torch.bfloat16)
        s = (torch.sin(t_b) / (torch.cos(t_b) + torch.sin(t_b))).view(-1, 1, 1)
        x_s = (x_hat * torch.sqrt(s**2 + (1 - s) ** 2)).to(torch.bfloat16)
        v = flow(hidden_states=x_s, timestep=s.flatten(), guidance=guidance, return_dict=False, **kwargs)[0]
        expected = ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s**2) * v) / torch.sqrt(s**2 + (1 - s) ** 2)
        expected_logvar = model.logvar_linear(model.time_text_embed(t_b, guidance, kwargs["pooled_projections"]))
    assert velocity.dtype == torch.bfloat16
    assert torch.equal(velocity, expected)
    assert torch.equal(logvar, expected_logvar)


def test_trigflow_jvp_matches_finite_differences_in_float64():
    """``torch.func.jvp`` w.r.t. (x̂, t) through the whole student (maps, ×1 embedding, blocks with math SDPA, logvar
    head) against a fourth-order central difference along the same direction."""
    model = _student_like(build_tiny_flux(seed=5, dtype=torch.float64), TrigFlowStudent)
    inputs = _inputs_like(model, dtype=torch.float64)
    x_hat, t = inputs.pop("hidden_states"), inputs.pop("timestep")
    t = 0.2 + t  # keep t ± 2h inside (0, π/2)
    gen = torch.Generator().manual_seed(1)
    tangent_x = torch.randn(x_hat.shape, generator=gen, dtype=torch.float64)
    tangent_t = torch.rand(t.shape, generator=gen, dtype=torch.float64)

    def trigflow(x, time):
        return model(hidden_states=x, timestep=time, return_logvar=True, **inputs)

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        _, (d_velocity, d_logvar) = torch.func.jvp(trigflow, (x_hat, t), (tangent_x, tangent_t))
        at = {k: trigflow(x_hat + k * FD_STEP * tangent_x, t + k * FD_STEP * tangent_t) for k in (-2, -1, 1, 2)}
    for i, (name, tangent) in enumerate((("velocity", d_velocity), ("logvar", d_logvar))):
        fd = (8 * (at[1][i] - at[-1][i]) - (at[2][i] - at[-2][i])) / (12 * FD_STEP)
        error, scale = float((tangent - fd).abs().max()), float(fd.abs().max())
        print(f"{name}: max|jvp - fd| = {error:.3e}, max|fd| = {scale:.3e}")
        assert scale > 0 and error <= FD_RTOL * scale


def test_logvar_gradient_reaches_the_head_and_the_shared_conditioning_mlps():
    model = _student_like(build_tiny_flux(seed=6), TrigFlowStudent).train()
    inputs = _inputs_like(model)
    _, logvar = model(**inputs, return_logvar=True)
    logvar.sum().backward()
    embed = model.time_text_embed
    for name, param in (
        ("logvar_linear.weight", model.logvar_linear.weight),
        ("logvar_linear.bias", model.logvar_linear.bias),
        ("time_text_embed.timestep_embedder.linear_1.weight", embed.timestep_embedder.linear_1.weight),
        ("time_text_embed.guidance_embedder.linear_1.weight", embed.guidance_embedder.linear_1.weight),
        ("time_text_embed.text_embedder.linear_1.weight", embed.text_embedder.linear_1.weight),
    ):
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
    # logvar alone does not reach the flow model's blocks
    assert model.proj_out.weight.grad is None
