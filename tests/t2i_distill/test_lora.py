"""LoRA adapters (peft, through diffusers' ``add_adapter``) on the attention and feed-forward linears: the explicit
dual forward and the patched model give the tangent through base + adapter and the adapter's gradients, against
``torch.func.jvp`` and backward of the unpatched LoRA model (math attention), fp32 on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from t2i_distill import apply_kernels_to_flux
from t2i_distill.models.dual_forward import dual_linear, flux_forward_jvp
from t2i_kernels.testing import tolerance
from tests.t2i_distill.flux_helpers import build, call, reference_jvp, split_inputs

#: every linear of both block kinds the LoRA recipes of FLUX adapt (attention q/k/v/out, text stream, FFs, MLP).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
OUT, TANGENT, DPARAM = (tolerance("flux_model", q, torch.float32) for q in ("out", "tangent", "dparam"))


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


def lora_student(dropout: float = 0.0):
    model = build()
    # init_lora_weights=False: A and B both random, so the adapter changes the tangent (peft's default B = 0 would
    # make a test that ignores the adapter pass).
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS,
                                 init_lora_weights=False))
    return model.eval()


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_the_adapter_reaches_every_target_and_changes_the_tangent():
    model = lora_student()
    assert len(lora_params(model)) == 2 * sum(1 for n, _ in model.named_modules() if n.endswith(tuple(LORA_TARGETS))
                                              and not n.endswith(("lora_A", "lora_B", "base_layer")))
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    with_adapter = reference_jvp(model, x, t, tx, tt, rest)[1]
    model.disable_adapters()
    without = reference_jvp(model, x, t, tx, tt, rest)[1]
    assert not torch.allclose(with_adapter, without, atol=1e-3)


def test_dual_linear_of_a_lora_layer_is_the_jvp_of_base_plus_adapter():
    model = lora_student()
    layer = model.transformer_blocks[0].attn.to_q  # a peft lora.Linear; its `.weight` is the base weight only
    x, tx = torch.randn(2, 5, layer.in_features), torch.randn(2, 5, layer.in_features)
    expected = torch.func.jvp(layer, (x,), (tx,))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y, ty = dual_linear(layer, x, tx)
        torch.testing.assert_close(y, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(ty, expected[1], atol=0, rtol=0)
        assert not ty.requires_grad and y.requires_grad == grad
    assert not torch.allclose(ty, torch.nn.functional.linear(tx, layer.weight), atol=1e-4)


def _reference_with_grads(model, x, t, tx, tt, rest, weights):
    out, tangent = reference_jvp(model, x, t, tx, tt, rest)
    model.zero_grad(set_to_none=True)
    (call(model, x, t, rest) * weights).sum().backward()
    return out, tangent, {n: p.grad for n, p in lora_params(model).items()}


@pytest.mark.parametrize("path", ["dual_forward", "patched_func_jvp"])
def test_lora_tangent_and_adapter_gradients_match_the_unpatched_lora_model(path):
    model = lora_student()
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    weights = torch.randn(x.shape[0], x.shape[1], model.config.in_channels)
    ref_out, ref_tangent, ref_grads = _reference_with_grads(model, x, t, tx, tt, rest, weights)

    subject = copy.deepcopy(model)
    subject.zero_grad(set_to_none=True)
    if path == "dual_forward":
        out, tangent = flux_forward_jvp(subject, x, tx, timestep=t, t_timestep=tt, **rest)
    else:
        apply_kernels_to_flux(subject, training_attention="kernel")
        out, tangent = torch.func.jvp(lambda x, t: call(subject, x, t, rest), (x, t), (tx, tt))
    (out * weights).sum().backward()  # the primal of one pass trains the adapter
    assert_close(out, ref_out, OUT)
    assert_close(tangent, ref_tangent, TANGENT)
    grads = {n: p.grad for n, p in lora_params(subject).items()}
    assert set(grads) == set(ref_grads) and all(g is not None for g in grads.values())
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], DPARAM)
