"""What diffusers offers a FLUX transformer, on the patched model vs the stock one (same outputs within the
``flux_model`` fp32 tolerance, or a clear refusal): hook-based caches and layer skipping, save/load round trips,
gradient checkpointing, attention-backend switches, fused QKV projections, and the exact, forward-differentiable
fallback at a head dim the attention kernel lacks (16, as in diffusers' own FLUX tests). Tiny models, fp32, CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from diffusers import FluxTransformer2DModel
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    LayerSkipConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
    apply_layer_skip,
)
from diffusers.hooks._helpers import AttentionProcessorRegistry, TransformerBlockRegistry
from diffusers.models.attention_dispatch import attention_backend

from t2i_distill import apply_kernels_to_flux, revert_kernels_on_flux
from t2i_distill.models import flux_patch
from t2i_distill.models.flux_patch import is_patched
from t2i_distill.models.processors import FluxKernelAttnProcessor
from t2i_kernels.testing import tolerance
from tests.t2i_distill.flux_helpers import build, call, reference_jvp, split_inputs

TOL = tolerance("flux_model", "out", torch.float32)
GRAD_TOL = tolerance("flux_model", "dparam", torch.float32)
STEPS = 4


def assert_close(actual, expected, tol=TOL):
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


def stock_and_patched(**overrides):
    stock = build(FluxTransformer2DModel, **overrides)
    return stock, apply_kernels_to_flux(copy.deepcopy(stock), training_attention="kernel")


# ---- hook registries and caches ---------------------------------------------------------------------------------
def test_our_classes_are_registered_with_diffusers_hook_registries():
    flux_patch.register_with_diffusers_hooks()
    for ours, theirs in ((flux_patch.KernelFluxTransformerBlock, flux_patch.FluxTransformerBlock),
                         (flux_patch.KernelFluxSingleTransformerBlock, flux_patch.FluxSingleTransformerBlock)):
        meta, base = TransformerBlockRegistry.get(ours), TransformerBlockRegistry.get(theirs)
        assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (
            base.return_hidden_states_index, base.return_encoder_hidden_states_index)
        assert meta._cls is ours and base._cls is theirs  # the stock entry is untouched
    assert AttentionProcessorRegistry.get(FluxKernelAttnProcessor).skip_processor_output_fn is (
        AttentionProcessorRegistry.get(flux_patch.FluxAttnProcessor).skip_processor_output_fn)


class _StepClock:
    """The denoising timestep a FasterCache/PAB callback reads: out of the skip range on the first step (so a cache
    is filled), inside it afterwards."""

    def __init__(self):
        self.step = 0

    def __call__(self):
        return 1000 if self.step == 0 else 500


CACHES = {
    "first_block": lambda clock: FirstBlockCacheConfig(threshold=10.0),
    "mag": lambda clock: MagCacheConfig(mag_ratios=torch.ones(STEPS), num_inference_steps=STEPS, threshold=10.0,
                                        max_skip_steps=STEPS, retention_ratio=0.0),
    "faster": lambda clock: FasterCacheConfig(spatial_attention_block_skip_range=2,
                                              spatial_attention_timestep_skip_range=(-1, 901),
                                              current_timestep_callback=clock, tensor_format="BCHW",
                                              is_guidance_distilled=True),
    "pyramid_attention_broadcast": lambda clock: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        current_timestep_callback=clock),
    "taylorseer": lambda clock: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
    "sea": lambda clock: SeaCacheConfig(),
    "text_kv": lambda clock: TextKVCacheConfig(),
}
#: caches that, at these settings, change the output of a later step (so "same as stock" is not vacuous).
CACHES_THAT_SKIP = {"first_block", "mag", "faster", "pyramid_attention_broadcast", "taylorseer"}


def _denoise(model, x, t, rest, config=None, clock=None):
    """STEPS calls under a cache context with a slowly moving input, as a sampler would; (STEPS, ...) outputs."""
    if config is not None:
        model.enable_cache(config)
    outs = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' experimental-feature notices
        for step in range(STEPS):
            if clock is not None:
                clock.step = step
            with model.cache_context("cond"):
                outs.append(call(model, x + 0.01 * step, t, rest))
    if config is not None:
        model.disable_cache()
    return torch.stack(outs)


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_every_diffusers_cache_runs_on_the_patched_model_as_on_the_stock_one(cache):
    stock, patched = stock_and_patched()
    x, t, rest = split_inputs(stock)
    clocks = _StepClock(), _StepClock()
    stock_out = _denoise(stock, x, t, rest, CACHES[cache](clocks[0]), clocks[0])
    patched_out = _denoise(patched, x, t, rest, CACHES[cache](clocks[1]), clocks[1])
    assert_close(patched_out, stock_out)
    if cache in CACHES_THAT_SKIP:
        assert not torch.allclose(stock_out, _denoise(stock, x, t, rest), atol=1e-4), f"{cache} skipped nothing"
    # disable_cache restored the hook-free model: the patched forward runs again
    assert_close(_denoise(patched, x, t, rest), _denoise(stock, x, t, rest))


LAYER_SKIPS = {  # (skip_attention, skip_ff)
    "block": (True, True),
    "feed_forward": (False, True),
    "attention": (True, False),
}


@pytest.mark.parametrize("skip", sorted(LAYER_SKIPS))
def test_layer_skip_behaves_on_the_patched_model_as_on_the_stock_one(skip):
    """Same output, or the same error: in diffusers 0.42 the attention-skip hook reads an attribute FluxAttention
    lacks, and the block-skip output has the text stream's shape, on the stock model too."""
    skip_attention, skip_ff = LAYER_SKIPS[skip]
    stock, patched = stock_and_patched()
    x, t, rest = split_inputs(stock)
    outcomes = []
    for model in (stock, patched):
        try:
            apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="transformer_blocks",
                                                    skip_attention=skip_attention, skip_ff=skip_ff))
            with torch.no_grad():
                outcomes.append(call(model, x, t, rest))
        except (AttributeError, RuntimeError, ValueError) as error:
            outcomes.append((type(error), str(error).split("\n")[0]))
    if isinstance(outcomes[0], torch.Tensor):
        assert isinstance(outcomes[1], torch.Tensor), outcomes[1]
        assert_close(outcomes[1], outcomes[0])
        unskipped = call(build(FluxTransformer2DModel), x, t, rest)
        assert outcomes[0].shape != unskipped.shape or not torch.allclose(outcomes[0], unskipped, atol=1e-4)
    else:
        assert outcomes[1] == outcomes[0]


def test_patching_under_hooks_or_reverting_under_hooks_is_refused():
    stock, patched = stock_and_patched()
    stock.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="hooks installed.*patch first, then enable them"):
        apply_kernels_to_flux(stock)
    patched.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="disable_cache"):
        revert_kernels_on_flux(patched)
    # hooks on modules that are never re-classed (PAB hooks the attention modules) do not block patching
    harmless = build(FluxTransformer2DModel)
    harmless.enable_cache(CACHES["pyramid_attention_broadcast"](_StepClock()))
    assert is_patched(apply_kernels_to_flux(harmless))
    # once the hooks are removed, both work, and the kernels really run (or really stop running)
    patched.disable_cache()
    revert_kernels_on_flux(patched)
    stock.disable_cache()
    apply_kernels_to_flux(stock)
    for model, patched_now in ((patched, False), (stock, True)):
        block = model.transformer_blocks[0]
        assert (type(block).forward is flux_patch.KernelFluxTransformerBlock.forward) == patched_now
        assert "forward" not in block.__dict__


# ---- save / load, gradient checkpointing ------------------------------------------------------------------------
def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    stock, patched = stock_and_patched()
    x, t, rest = split_inputs(stock)
    patched.save_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    assert type(loaded.transformer_blocks[0]) is flux_patch.FluxTransformerBlock  # the files hold no patch
    with torch.no_grad():
        assert torch.equal(call(loaded, x, t, rest), call(stock, x, t, rest))
        repatched = apply_kernels_to_flux(loaded, training_attention="kernel")
        assert_close(call(repatched, x, t, rest), call(stock, x, t, rest))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


def _param_grads(model, x, t, rest, weights):
    model.zero_grad(set_to_none=True)
    (call(model, x, t, rest) * weights).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    stock, patched = stock_and_patched()
    x, t, rest = split_inputs(stock)
    weights = torch.randn(x.shape[0], x.shape[1], stock.config.in_channels)
    expected = _param_grads(stock, x, t, rest, weights)
    plain = _param_grads(patched, x, t, rest, weights)
    patched.enable_gradient_checkpointing()
    patched.train()  # diffusers checkpoints only in training mode with grad enabled
    checkpointed = _param_grads(patched, x, t, rest, weights)
    assert patched.gradient_checkpointing and set(checkpointed) == set(expected)
    for name in expected:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=0, rtol=0)
        assert_close(checkpointed[name], expected[name], GRAD_TOL)


# ---- attention backends, fused projections ----------------------------------------------------------------------
def test_attention_backend_switches_reach_our_processor_and_match_stock():
    stock = build(FluxTransformer2DModel)
    patched = apply_kernels_to_flux(copy.deepcopy(stock), training_attention="sdpa")
    x, t, rest = split_inputs(stock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "attention backends are an experimental feature"
        for model in (stock, patched):
            model.set_attention_backend("_native_math")
    assert all(p._attention_backend == "_native_math" for p in patched.attn_processors.values())
    with torch.no_grad():
        assert_close(call(patched, x, t, rest), call(stock, x, t, rest))
        with attention_backend("native"):
            assert_close(call(patched, x, t, rest), call(stock, x, t, rest))
        # forward-mode AD ignores the backend (none has a forward-AD rule) and runs our kernel
        tx, tt = torch.randn_like(x), torch.ones_like(t)
        ours = torch.func.jvp(lambda x, t: call(patched, x, t, rest), (x, t), (tx, tt))
    ref = reference_jvp(stock, x, t, tx, tt, rest)
    assert_close(ours[0], ref[0])
    assert_close(ours[1], ref[1], tolerance("flux_model", "tangent", torch.float32))


def test_fused_qkv_projections_run_on_the_kernels():
    stock, patched = stock_and_patched()
    x, t, rest = split_inputs(stock)
    for model in (stock, patched):
        model.fuse_qkv_projections()
    assert patched.transformer_blocks[0].attn.fused_projections
    assert all(isinstance(p, FluxKernelAttnProcessor) for p in patched.attn_processors.values())
    with torch.no_grad():
        assert_close(call(patched, x, t, rest), call(stock, x, t, rest))
    for model in (stock, patched):
        model.unfuse_qkv_projections()
    with torch.no_grad():
        assert_close(call(patched, x, t, rest), call(stock, x, t, rest))


# ---- any head dim: the fallback is exact and forward-differentiable --------------------------------------------
HEAD_DIM_16 = {"attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}


@pytest.mark.parametrize("attention", [True, False], ids=["attention-kernel", "sdpa-only"])
def test_head_dim_16_under_func_jvp_forward_ad_and_backward(attention):
    stock = build(FluxTransformer2DModel, **HEAD_DIM_16)
    patched = apply_kernels_to_flux(copy.deepcopy(stock), attention=attention, training_attention="kernel")
    x, t, rest = split_inputs(stock)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    ref_out, ref_tangent = reference_jvp(stock, x, t, tx, tt, rest)
    tangent_tol = tolerance("flux_model", "tangent", torch.float32)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out, tangent = torch.func.jvp(lambda x, t: call(patched, x, t, rest), (x, t), (tx, tt))
        with torch.no_grad(), fwAD.dual_level():
            dual = call(patched, fwAD.make_dual(x, tx), fwAD.make_dual(t, tt), rest)
            dual_tangent = fwAD.unpack_dual(dual).tangent
    assert_close(out, ref_out)
    assert_close(tangent, ref_tangent, tangent_tol)
    assert_close(dual_tangent, ref_tangent, tangent_tol)
    reasons = {str(w.message) for w in caught if "falling back" in str(w.message)}
    if attention:  # one warning per processor instance, naming the reason
        assert reasons and all("head dim 16" in r for r in reasons)
    else:
        assert not reasons  # without the attention kernel, head dim 16 is no reason to fall back

    weights = torch.randn_like(ref_out)
    expected = _param_grads(stock, x, t, rest, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _param_grads(patched, x, t, rest, weights)
    assert set(ours) == set(expected)
    for name in expected:
        assert_close(ours[name], expected[name], GRAD_TOL)
