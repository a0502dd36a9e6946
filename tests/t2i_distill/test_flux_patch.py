"""apply_kernels_to_flux / revert_kernels_on_flux: structure (what is patched, state_dict, print, revert exact) and
model-level parity of the patched model against the unpatched reference (output, tangent, every parameter gradient)
on tiny FLUX configurations, fp32 on the CPU; bf16 on a lite-8B-width block where a GPU is available."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from t2i_distill import apply_kernels_to_flux, revert_kernels_on_flux
from t2i_distill.models import flux_patch
from t2i_distill.models.flux import FluxStudent
from t2i_distill.models.processors import FluxKernelAttnProcessor
from t2i_kernels.testing import assert_parity
from tests.t2i_distill.flux_helpers import TINY_CONFIGS, as_dtype, build, call, reference_jvp, split_inputs

F64 = torch.float64


# ---- structure --------------------------------------------------------------------------------------------------
def test_patch_is_visible_keeps_state_dict_and_reverts_exactly():
    model = build()
    x, t, rest = split_inputs(model)
    before = call(model, x, t, rest).detach()
    keys, tensors = list(model.state_dict()), [v for v in model.state_dict().values()]
    processors = dict(model.attn_processors)

    apply_kernels_to_flux(model, training_attention="kernel")
    text = str(model)
    for name in ("KernelFluxTransformerBlock", "KernelFluxSingleTransformerBlock", "KernelAdaLayerNormZero",
                 "KernelAdaLayerNormZeroSingle", "KernelAdaLayerNormContinuous", "KernelGELU", "KernelGELUTanh",
                 "FluxKernelAttnProcessor(attention=triton, qk_norm_rope=triton", "layer_norm_modulate",
                 "gated_residual"):
        assert name in text, f"{name} missing from print(model)"
    assert all(isinstance(p, FluxKernelAttnProcessor) for p in model.attn_processors.values())
    after = model.state_dict()
    assert list(after) == keys and all(a is b or torch.equal(a, b) for a, b in zip(after.values(), tensors))

    revert_kernels_on_flux(model)
    assert "Kernel" not in str(model)
    assert type(model.transformer_blocks[0]) is FluxTransformerBlock
    assert type(model.single_transformer_blocks[0]) is FluxSingleTransformerBlock
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(call(model, x, t, rest), before)


@pytest.mark.parametrize("flag", ["attention", "qk_norm", "adaln", "gate", "gelu"])
def test_each_flag_patches_only_its_modules(flag):
    model = build()
    flags = {k: k == flag for k in ("attention", "qk_norm", "adaln", "gate", "gelu")}
    apply_kernels_to_flux(model, **flags)
    block, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    has_processor = isinstance(block.attn.processor, FluxKernelAttnProcessor)
    assert has_processor == (flag in ("attention", "qk_norm"))
    assert (type(block.norm1) is flux_patch.KernelAdaLayerNormZero) == (flag == "adaln")
    assert (type(model.norm_out) is flux_patch.KernelAdaLayerNormContinuous) == (flag == "adaln")
    assert (type(block) is flux_patch.KernelFluxTransformerBlock) == (flag in ("adaln", "gate"))
    assert (type(single) is flux_patch.KernelFluxSingleTransformerBlock) == (flag == "gate")
    assert (type(block.ff.net[0]) is flux_patch.KernelGELU) == (flag == "gelu")
    assert (type(single.act_mlp) is flux_patch.KernelGELUTanh) == (flag == "gelu")


def test_bad_calls_are_rejected_clearly(monkeypatch):
    model = build()
    with pytest.raises(TypeError, match="flags must be bool"):
        apply_kernels_to_flux(model, attention="yes")
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        apply_kernels_to_flux(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training_attention"):
        apply_kernels_to_flux(model, training_attention="fast")
    with pytest.raises(ValueError, match="not patched"):
        revert_kernels_on_flux(model)
    apply_kernels_to_flux(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_kernels_to_flux(model)
    monkeypatch.setattr(flux_patch.diffusers, "__version__", "0.41.2")
    with pytest.raises(ImportError, match="pip install 'diffusers>=0.42,<0.43'"):
        apply_kernels_to_flux(build())


def test_attention_mask_falls_back_with_one_warning():
    model = build()
    reference = copy.deepcopy(model)
    x, t, rest = split_inputs(model)
    apply_kernels_to_flux(model)
    processor = model.transformer_blocks[0].attn.processor
    hidden = torch.randn(2, 5, model.inner_dim)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    with pytest.warns(UserWarning, match="attention mask"):
        out = processor(model.single_transformer_blocks[0].attn, hidden, attention_mask=mask,
                        image_rotary_emb=model.rotary_embedding(rest["img_ids"][:3], rest["txt_ids"][:2]))
    expected = FluxAttnProcessor()(reference.single_transformer_blocks[0].attn, hidden, attention_mask=mask,
                                   image_rotary_emb=reference.rotary_embedding(rest["img_ids"][:3],
                                                                               rest["txt_ids"][:2]))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback for the same reason is silent
        processor(model.single_transformer_blocks[0].attn, hidden, attention_mask=mask,
                  image_rotary_emb=model.rotary_embedding(rest["img_ids"][:3], rest["txt_ids"][:2]))


def test_unsupported_head_dim_falls_back_to_the_reference_path():
    overrides = {"attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}
    model = build(**overrides)
    reference = copy.deepcopy(model)
    x, t, rest = split_inputs(model)
    apply_kernels_to_flux(model, attention=True, qk_norm=True, adaln=False, gate=False, gelu=False)
    with pytest.warns(UserWarning, match="head dim 16"):
        out = call(model, x, t, rest)
    torch.testing.assert_close(out, call(reference, x, t, rest), atol=0, rtol=0)


# ---- parity -----------------------------------------------------------------------------------------------------
def _parity(model_cls, overrides, training_attention):
    model = build(model_cls, **overrides)
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    truth_model, truth_rest = as_dtype(model, rest, F64)
    truth_o, truth_t = reference_jvp(truth_model, x.double(), t.double(), tx.double(), tt.double(), truth_rest)
    same_o, same_t = reference_jvp(model, x, t, tx, tt, rest)

    patched = apply_kernels_to_flux(copy.deepcopy(model), training_attention=training_attention)
    with torch.no_grad():
        ours_o, ours_t = torch.func.jvp(lambda x, t: call(patched, x, t, rest), (x, t), (tx, tt))
    assert_parity("flux_model", "out", ours_o, same_o, truth_o)
    assert_parity("flux_model", "tangent", ours_t, same_t, truth_t)

    # forward_ad dual tensors give the same tangent as torch.func.jvp
    with torch.no_grad(), fwAD.dual_level():
        dual = call(patched, fwAD.make_dual(x, tx), fwAD.make_dual(t, tt), rest)
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, ours_t, atol=0, rtol=0)

    # every parameter gradient of an ordinary training step
    weights = torch.randn_like(same_o)

    def grads(m, x, rest):
        m.zero_grad(set_to_none=True)
        (call(m, x, t.to(x.dtype), rest) * weights.to(x.dtype)).sum().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    truth_g, same_g, ours_g = grads(truth_model, x.double(), truth_rest), grads(model, x, rest), grads(patched, x,
                                                                                                        rest)
    assert set(ours_g) == set(same_g)
    for name in same_g:
        assert_parity("flux_model", "dparam", ours_g[name], same_g[name], truth_g[name])


@pytest.mark.parametrize("name, overrides", TINY_CONFIGS, ids=[c[0] for c in TINY_CONFIGS])
def test_patched_student_matches_the_reference(name, overrides):
    _parity(FluxStudent, overrides, "kernel")


def test_patched_stock_diffusers_model_matches_with_sdpa_training_attention():
    _parity(FluxTransformer2DModel, {}, "sdpa")


def test_backward_through_the_primal_of_func_jvp_on_the_patched_model():
    model = build()
    x, t, rest = split_inputs(model)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    patched = apply_kernels_to_flux(copy.deepcopy(model), training_attention="kernel")
    out, _ = torch.func.jvp(lambda x, t: call(patched, x, t, rest), (x, t), (tx, tt))
    out.square().sum().backward()
    model.zero_grad()
    call(model, x, t, rest).square().sum().backward()
    truth_model, truth_rest = as_dtype(model, rest, F64)
    call(truth_model, x.double(), t.double(), truth_rest).square().sum().backward()
    for (name, p), q, r in zip(patched.named_parameters(), model.parameters(), truth_model.parameters()):
        assert_parity("flux_model", "dparam", p.grad, q.grad, r.grad)


# ---- GPU: one FLUX.1-lite-8B-width double + single block in bf16 -----------------------------------------------
@pytest.mark.gpu
def test_bf16_lite8b_width_blocks_match_on_gpu():
    lite = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "in_channels": 64,
            "axes_dims_rope": (16, 56, 56)}
    model = build(**lite).cuda().to(torch.bfloat16)
    from t2i_distill.tiny import TinyFluxShape, tiny_flux_inputs

    inputs = tiny_flux_inputs(model, TinyFluxShape(batch=1, text_tokens=256, latent_h=32, latent_w=32))
    x, t = inputs.pop("hidden_states"), inputs.pop("timestep")
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    truth_model, truth_rest = as_dtype(model, inputs, torch.float32)
    with torch.autocast("cuda", torch.bfloat16):
        same_o, same_t = reference_jvp(model, x, t, tx, tt, inputs)
    truth_o, truth_t = reference_jvp(truth_model, x.float(), t.float(), tx.float(), tt.float(), truth_rest)
    patched = apply_kernels_to_flux(copy.deepcopy(model))
    with torch.no_grad():
        ours_o, ours_t = torch.func.jvp(lambda x, t: call(patched, x, t, inputs), (x, t), (tx, tt))
    assert_parity("flux_model", "out", ours_o, same_o, truth_o.double(), dtype=torch.bfloat16)
    assert_parity("flux_model", "tangent", ours_t, same_t, truth_t.double(), dtype=torch.bfloat16)
