"""torch.compile of the patched model's training pass, of the explicit dual forward and of the func path
(``torch.func.jvp`` inside the compiled function), against the same computation in eager mode. Each block is compiled
with ``fullgraph=True``, which fails on any graph break inside it. aot_eager everywhere; inductor (slow on a 2-core
CPU) on one kernel-level case here and the block training pass under the ``slow`` marker. The Triton kernels are
not replaced: on the CPU the custom ops run the Triton interpreter eagerly inside the compiled graph (an extern call
for inductor), which is what a GPU run compiles too, minus the interpreter."""

from __future__ import annotations

import copy

import pytest
import torch

import t2i_kernels
from t2i_distill import apply_kernels_to_flux
from t2i_distill.models import dual_forward
from t2i_distill.models.compile import allow_kernels_in_graph
from tests.t2i_distill.flux_helpers import build, call, split_inputs

ROUNDING = {"atol": 1e-6, "rtol": 1e-6}  # aot_eager/inductor may reorder the surrounding eager ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_blocks(model, backend):
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.compile(backend=backend, fullgraph=True)


def _training_pass(model, x, t, rest, weights):
    model.zero_grad(set_to_none=True)
    out = call(model, x, t, rest)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_training_pass_of_the_patched_blocks_compiles_without_graph_breaks(backend):
    eager = apply_kernels_to_flux(build(), training_attention="kernel")
    compiled = copy.deepcopy(eager)
    _compile_blocks(compiled, backend)
    x, t, rest = split_inputs(eager)
    weights = torch.randn(x.shape[0], x.shape[1], eager.config.in_channels)
    expected_out, expected_grads = _training_pass(eager, x, t, rest, weights)
    out, grads = _training_pass(compiled, x, t, rest, weights)
    torch.testing.assert_close(out, expected_out, **ROUNDING)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **ROUNDING)


def test_dual_forward_blocks_compile_without_graph_breaks(monkeypatch):
    model = build()
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    with torch.no_grad():
        expected = dual_forward.flux_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, **rest)
    allow_kernels_in_graph()
    for name in ("double_block_jvp", "single_block_jvp"):
        monkeypatch.setattr(dual_forward, name, torch.compile(getattr(dual_forward, name), backend="aot_eager",
                                                              fullgraph=True))
    with torch.no_grad():
        out, tangent = dual_forward.flux_forward_jvp(model, x, tx, timestep=t, t_timestep=tt, **rest)
    torch.testing.assert_close(out, expected[0], **ROUNDING)
    torch.testing.assert_close(tangent, expected[1], **ROUNDING)


@pytest.mark.slow  # about 100 s of tracing on a loaded 2-core CPU
def test_func_jvp_of_the_patched_model_compiles():
    # torch.func.jvp must sit inside the compiled function (PyTorch refuses jvp of a compiled function from eager).
    model = apply_kernels_to_flux(build(), training_attention="kernel")
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def jvp(x, t, tx, tt):
        return torch.func.jvp(lambda x, t: call(model, x, t, rest), (x, t), (tx, tt))

    with torch.no_grad():
        expected = jvp(x, t, tx, tt)
        out, tangent = torch.compile(jvp, backend="aot_eager")(x, t, tx, tt)
    torch.testing.assert_close(out, expected[0], **ROUNDING)
    torch.testing.assert_close(tangent, expected[1], **ROUNDING)


def test_kernel_calls_compile_under_inductor_with_fullgraph():
    allow_kernels_in_graph()
    q, k, v, tq, tk, tv = (torch.randn(1, 2, 8, 32) for _ in range(6))
    gate, tgate = torch.randn(1, 64), torch.randn(1, 64)

    def step(q, k, v, tq, tk, tv):
        o, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
        o_L, to_L = o.transpose(1, 2).flatten(2), to.transpose(1, 2).flatten(2)
        return t2i_kernels.gated_residual_jvp(o_L, to_L, gate, tgate, o_L.sin(), to_L * o_L.cos())

    expected = step(q, k, v, tq, tk, tv)
    got = torch.compile(step, backend="inductor", fullgraph=True)(q, k, v, tq, tk, tv)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **ROUNDING)


def test_allow_kernels_in_graph_covers_every_kernel_the_models_call():
    from t2i_distill.models.compile import COMPILABLE_KERNELS

    public = {n for n in t2i_kernels.__all__
              if n[0].islower() and callable(getattr(t2i_kernels, n)) and n != "reference"}
    assert set(COMPILABLE_KERNELS) == public
