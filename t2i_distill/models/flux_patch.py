"""Drop-in kernels for diffusers' FLUX: ``apply_kernels_to_flux(model)`` and ``revert_kernels_on_flux(model)``.

What is patched, per flag, and through which public seam:

=============  ===============================================================  =====================================
flag           replaces                                                         how
=============  ===============================================================  =====================================
``attention``  SDPA attention in every ``FluxAttention``                         ``model.set_attn_processor``
``qk_norm``    ``norm_q/k``, ``norm_added_q/k`` + RoPE + head transpose          (same processor)
``adaln``      ``norm1``, ``norm1_context``, single ``norm``, ``norm_out``       class swap of the AdaLN modules
               (LayerNorm + modulation) and the blocks' inline ``norm2`` +
               modulation                                                       class swap of the blocks
``gate``       the blocks' ``h + gate·y`` residuals                              class swap of the blocks
``gelu``       the FeedForward / ``proj_mlp`` GELU-tanh activations              class swap of the activation modules
=============  ===============================================================  =====================================

A *class swap* sets an instance's ``__class__`` to a subclass of its diffusers class (``KernelFluxTransformerBlock``
for ``FluxTransformerBlock``, ...) that overrides only ``forward`` (and ``extra_repr``): modules, parameters and
``state_dict`` keys are untouched, ``print(model)`` shows the new class names, and reverting restores the original
classes and processors, which restores the original behaviour bit for bit. Nothing of diffusers is copied.

diffusers' hook-based features keep working on the patched model: our block and processor classes are registered
with diffusers' hook registries (:func:`register_with_diffusers_hooks`), so every cache (``enable_cache``/``apply_*``)
and layer skipping treat them as diffusers' own. Hooks must be installed *after* patching (and removed before
reverting), since a hook binds the forward of the class the module has at that time; both functions refuse otherwise.

Every replacement computes what diffusers computes (same math, same dtype promotion), with Triton kernels that have
forward-mode rules, so the patched model runs under ``torch.func.jvp`` with our tangents, and trains with our
backward kernels (attention: SDPA or ours, see :class:`FluxKernelAttnProcessor`). Unsupported configurations fall
back with one warning naming the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import diffusers
import torch
from diffusers.hooks._helpers import (
    AttentionProcessorMetadata,
    AttentionProcessorRegistry,
    TransformerBlockMetadata,
    TransformerBlockRegistry,
)
from diffusers.models.activations import GELU as DiffusersGELU
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)

import t2i_kernels
from t2i_distill.models.compile import allow_kernels_in_graph
from t2i_distill.models.processors import FluxKernelAttnProcessor

logger = logging.getLogger(__name__)

__all__ = ["apply_kernels_to_flux", "is_patched", "register_with_diffusers_hooks", "revert_kernels_on_flux"]

SUPPORTED_DIFFUSERS = ("0.42.",)
_PATCH_ATTR = "_t2i_distill_patch"


# ----------------------------------------------------------------------------------------------------------------
# Kernel-backed pieces shared by the swapped classes
# ----------------------------------------------------------------------------------------------------------------
def _promoted(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast to the common dtype eager PyTorch would compute in (our kernels take one dtype per call); a copy only in
    the rare mixed-dtype case (e.g. an fp32 residual stream with bf16 gates)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None]·y`` through the kernel."""
    return t2i_kernels.gated_residual(*_promoted(x, gate, y))


def _plain_layer_norm(norm: torch.nn.Module) -> bool:
    """A LayerNorm without affine parameters: what the fused kernel implements."""
    return isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None


class _KernelRepr:
    """``extra_repr`` that names the kernels an instance runs."""

    _kernels_note = ""

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        note = f"t2i_distill kernels: {self._kernels_note}"
        return f"{base}, {note}" if base else note


# ---- AdaLN modules ----------------------------------------------------------------------------------------------
class KernelAdaLayerNormZero(_KernelRepr, AdaLayerNormZero):
    """``norm1``/``norm1_context``: SiLU → linear → chunk 6 → fused LayerNorm + modulation."""

    _kernels_note = "layer_norm_modulate"

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if self.emb is not None or not _plain_layer_norm(self.norm):
            return super().forward(x, timestep, class_labels, hidden_dtype, emb)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = t2i_kernels.layer_norm_modulate(x, scale_msa, shift_msa, eps=self.norm.eps)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class KernelAdaLayerNormZeroSingle(_KernelRepr, AdaLayerNormZeroSingle):
    """The single block's ``norm``: SiLU → linear → chunk 3 → fused LayerNorm + modulation."""

    _kernels_note = "layer_norm_modulate"

    def forward(self, x, emb=None):
        if not _plain_layer_norm(self.norm):
            return super().forward(x, emb)
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return t2i_kernels.layer_norm_modulate(x, scale_msa, shift_msa, eps=self.norm.eps), gate_msa


class KernelAdaLayerNormContinuous(_KernelRepr, AdaLayerNormContinuous):
    """``norm_out``: SiLU → linear (cast to x's dtype, as diffusers) → (scale, shift) → fused LayerNorm + modulation."""

    _kernels_note = "layer_norm_modulate"

    def forward(self, x, conditioning_embedding):
        if not _plain_layer_norm(self.norm):
            return super().forward(x, conditioning_embedding)
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return t2i_kernels.layer_norm_modulate(x, scale, shift, eps=self.norm.eps)


# ---- activations ------------------------------------------------------------------------------------------------
class KernelGELU(_KernelRepr, DiffusersGELU):
    """FeedForward's ``GELU`` (proj + activation): the tanh activation through the kernel."""

    _kernels_note = "gelu_tanh"

    def gelu(self, gate: torch.Tensor) -> torch.Tensor:
        if self.approximate != "tanh":
            return super().gelu(gate)
        return t2i_kernels.gelu_tanh(gate)


class KernelGELUTanh(_KernelRepr, torch.nn.GELU):
    """The single block's ``act_mlp`` (``nn.GELU(approximate="tanh")``) through the kernel."""

    _kernels_note = "gelu_tanh"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.approximate != "tanh":
            return super().forward(input)
        return t2i_kernels.gelu_tanh(input)


# ---- blocks -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockKernels:
    """Which inline steps of a block's forward run on kernels."""

    adaln: bool = False  # norm2 / norm2_context + modulation
    gate: bool = False  # the gated residuals


class KernelFluxTransformerBlock(_KernelRepr, FluxTransformerBlock):
    """The double-stream block with the inline ``norm2`` + modulation and the gated residuals on kernels.

    Same sequence of operations as diffusers' ``FluxTransformerBlock.forward``; each fused step falls back to the
    identical eager expression when its flag is off.
    """

    _t2i_block_kernels = BlockKernels()

    @property
    def _kernels_note(self) -> str:  # type: ignore[override]
        k = self._t2i_block_kernels
        return ", ".join(n for n, on in (("layer_norm_modulate", k.adaln), ("gated_residual", k.gate)) if on)

    def _residual(self, x, gate, y):
        return gated_residual(x, gate, y) if self._t2i_block_kernels.gate else x + gate.unsqueeze(1) * y

    def _norm2_modulate(self, norm, x, scale, shift):
        if self._t2i_block_kernels.adaln and _plain_layer_norm(norm):
            return t2i_kernels.layer_norm_modulate(x, scale, shift, eps=norm.eps)
        return norm(x) * (1 + scale[:, None]) + shift[:, None]

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
        outputs = self.attn(hidden_states=norm_h, encoder_hidden_states=norm_c, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
        if len(outputs) != 2:  # IP-adapter outputs: diffusers' own block handles them
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
        attn_output, context_attn_output = outputs

        hidden_states = self._residual(hidden_states, gate_msa, attn_output)
        norm_h = self._norm2_modulate(self.norm2, hidden_states, scale_mlp, shift_mlp)
        hidden_states = self._residual(hidden_states, gate_mlp, self.ff(norm_h))

        encoder_hidden_states = self._residual(encoder_hidden_states, c_gate_msa, context_attn_output)
        norm_c = self._norm2_modulate(self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
        encoder_hidden_states = self._residual(encoder_hidden_states, c_gate_mlp, self.ff_context(norm_c))
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class KernelFluxSingleTransformerBlock(_KernelRepr, FluxSingleTransformerBlock):
    """The single-stream block with its gated residual on the kernel."""

    _t2i_block_kernels = BlockKernels()
    _kernels_note = "gated_residual"

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        projected = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
        hidden_states = gated_residual(residual, gate, projected)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# ----------------------------------------------------------------------------------------------------------------
# diffusers' hook registries
# ----------------------------------------------------------------------------------------------------------------
def register_with_diffusers_hooks() -> None:
    """Register our block and processor classes with diffusers' hook registries, as diffusers registers its own.

    diffusers' caches and layer skipping (FirstBlockCache, MagCache, SeaCache, LayerSkip, ...) look blocks and
    attention processors up by their exact class (``TransformerBlockRegistry.get(module.__class__)``), so a
    subclass is unknown to them. Our classes take the same arguments and return the same outputs as the diffusers
    classes they extend, so they get the same metadata (copied, since diffusers stores the class in it).
    Idempotent; called by :func:`apply_kernels_to_flux`.
    """
    for ours, theirs in ((KernelFluxTransformerBlock, FluxTransformerBlock),
                         (KernelFluxSingleTransformerBlock, FluxSingleTransformerBlock)):
        base = TransformerBlockRegistry.get(theirs)
        TransformerBlockRegistry.register(ours, TransformerBlockMetadata(
            return_hidden_states_index=base.return_hidden_states_index,
            return_encoder_hidden_states_index=base.return_encoder_hidden_states_index,
            hidden_states_argument_name=base.hidden_states_argument_name,
            encoder_hidden_states_argument_name=base.encoder_hidden_states_argument_name,
        ))
    # Our processor returns what FluxAttnProcessor returns, so skipping it (LayerSkip) takes the same shortcut.
    base_processor = AttentionProcessorRegistry.get(FluxAttnProcessor)
    AttentionProcessorRegistry.register(FluxKernelAttnProcessor, AttentionProcessorMetadata(
        skip_processor_output_fn=base_processor.skip_processor_output_fn))


def _leftover_bound_forward(module: torch.nn.Module) -> bool:
    """An instance ``forward`` that is just the class's own ``forward`` bound to the module: what diffusers leaves
    behind when its last hook is removed (``disable_cache``). Harmless, but it would pin the old class's forward."""
    forward = module.__dict__.get("forward")
    return (getattr(forward, "__self__", None) is module
            and getattr(forward, "__func__", None) is type(module).forward)


#: The diffusers classes apply_kernels_to_flux may re-class (our classes are their subclasses).
_SWAPPABLE = (FluxTransformerBlock, FluxSingleTransformerBlock, AdaLayerNormZero, AdaLayerNormZeroSingle,
              AdaLayerNormContinuous, DiffusersGELU, torch.nn.GELU)


def _instance_forward_owners(model: torch.nn.Module) -> list[str]:
    """Re-classable modules whose ``forward`` is wrapped at the instance: live diffusers hooks (caches, offloading,
    layerwise casting) and accelerate hooks bind the *current* class's ``forward`` there, so a class swap under them
    would be silently bypassed (patch) or silently kept (revert). Hooks on other modules (the model itself, the
    attention modules, linears) are harmless: their classes never change."""
    return [name for name, module in model.named_modules()
            if isinstance(module, _SWAPPABLE) and "forward" in module.__dict__ and not _leftover_bound_forward(module)]


# ----------------------------------------------------------------------------------------------------------------
# apply / revert
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _PatchRecord:
    flags: dict[str, object]
    original_processors: dict[str, object] | None = None
    class_swaps: list[tuple[torch.nn.Module, type]] = field(default_factory=list)


def _check_diffusers_version() -> None:
    if not diffusers.__version__.startswith(SUPPORTED_DIFFUSERS):
        raise ImportError(
            f"apply_kernels_to_flux patches diffusers' FLUX modules as of diffusers {SUPPORTED_DIFFUSERS[0]}x, found "
            f"diffusers {diffusers.__version__}; install a supported version: pip install 'diffusers>=0.42,<0.43'"
        )


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


def _swap(record: _PatchRecord, module: torch.nn.Module, new_class: type) -> None:
    if type(module) is not new_class:
        if _leftover_bound_forward(module):
            del module.forward  # back to the class's forward, so the swap takes effect
        record.class_swaps.append((module, type(module)))
        module.__class__ = new_class


def apply_kernels_to_flux(
    model: FluxTransformer2DModel,
    *,
    attention: bool = True,
    qk_norm: bool = True,
    adaln: bool = True,
    gate: bool = True,
    gelu: bool = True,
    training_attention: str = "auto",
) -> FluxTransformer2DModel:
    """Patch a diffusers FLUX transformer instance in place so its hot paths run on our Triton kernels.

    Args:
        model: a ``FluxTransformer2DModel`` (or subclass, e.g. :class:`t2i_distill.models.FluxStudent`).
        attention: JVP flash attention (``t2i_kernels.attention``) instead of SDPA in every attention layer.
        qk_norm: fused qk-RMSNorm + RoPE + head transpose (``t2i_kernels.qk_norm_rope``) in every attention layer.
        adaln: fused LayerNorm + AdaLN modulation (``t2i_kernels.layer_norm_modulate``) in ``norm1``,
            ``norm1_context``, ``norm2``, ``norm2_context``, the single blocks' ``norm`` and ``norm_out``.
        gate: fused gated residuals (``t2i_kernels.gated_residual``) in every block.
        gelu: GELU-tanh activations of the feed-forwards and ``proj_mlp`` (``t2i_kernels.gelu_tanh``).
        training_attention: attention in passes without forward-mode AD: ``"auto"`` (SDPA on CUDA, ours
            elsewhere), ``"kernel"`` (always ours) or ``"sdpa"``.

    Returns the same model (patched in place). ``state_dict`` keys are unchanged; ``print(model)`` shows what is
    patched; :func:`revert_kernels_on_flux` undoes it exactly. Raises ``TypeError`` for a model that is not FLUX or
    non-bool flags, ``ValueError`` if the model is already patched, ``ImportError`` for an unsupported diffusers.
    """
    _check_diffusers_version()
    flags = {"attention": attention, "qk_norm": qk_norm, "adaln": adaln, "gate": gate, "gelu": gelu}
    bad = {k: v for k, v in flags.items() if not isinstance(v, bool)}
    if bad:
        raise TypeError(f"apply_kernels_to_flux: flags must be bool, got {bad}")
    if not isinstance(model, FluxTransformer2DModel):
        raise TypeError(f"apply_kernels_to_flux: `model` must be a diffusers FluxTransformer2DModel, "
                        f"got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("apply_kernels_to_flux: `model` is already patched; call revert_kernels_on_flux(model) "
                         f"first (current flags: {getattr(model, _PATCH_ATTR).flags})")
    hooked = _instance_forward_owners(model)
    if hooked:
        raise ValueError(
            "apply_kernels_to_flux: `model` has hooks installed on its modules (diffusers caches/offloading or "
            f"accelerate hooks on {hooked[:4]}{' ...' if len(hooked) > 4 else ''}); patch first, then enable them "
            "(e.g. call model.disable_cache(), apply_kernels_to_flux(model), model.enable_cache(config))"
        )
    processor = FluxKernelAttnProcessor(attention=attention, qk_norm=qk_norm, training_attention=training_attention)
    register_with_diffusers_hooks()
    allow_kernels_in_graph()  # so torch.compile of the patched model has no graph break at a kernel

    record = _PatchRecord(flags={**flags, "training_attention": training_attention})
    if attention or qk_norm:
        # Unsupported configurations (e.g. a head dim the kernel lacks) are detected per call by the processor,
        # which falls back to diffusers' processor with one warning naming the reason.
        record.original_processors = dict(model.attn_processors)
        model.set_attn_processor(processor)
    for block in model.transformer_blocks:
        if type(block) not in (FluxTransformerBlock, KernelFluxTransformerBlock):
            raise TypeError(f"apply_kernels_to_flux: unexpected double block class {type(block).__name__}")
        if adaln:
            _swap(record, block.norm1, KernelAdaLayerNormZero)
            _swap(record, block.norm1_context, KernelAdaLayerNormZero)
        if gelu:
            for ff in (block.ff, block.ff_context):
                _swap(record, ff.net[0], KernelGELU)
        if adaln or gate:
            _swap(record, block, KernelFluxTransformerBlock)
            block._t2i_block_kernels = BlockKernels(adaln=adaln, gate=gate)
    for block in model.single_transformer_blocks:
        if type(block) not in (FluxSingleTransformerBlock, KernelFluxSingleTransformerBlock):
            raise TypeError(f"apply_kernels_to_flux: unexpected single block class {type(block).__name__}")
        if adaln:
            _swap(record, block.norm, KernelAdaLayerNormZeroSingle)
        if gelu:
            _swap(record, block.act_mlp, KernelGELUTanh)
        if gate:
            _swap(record, block, KernelFluxSingleTransformerBlock)
    if adaln:
        _swap(record, model.norm_out, KernelAdaLayerNormContinuous)
    setattr(model, _PATCH_ATTR, record)
    logger.info("apply_kernels_to_flux: %s; %d modules re-classed%s", record.flags, len(record.class_swaps),
                ", attention processors replaced" if record.original_processors is not None else "")
    return model


def revert_kernels_on_flux(model: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Undo :func:`apply_kernels_to_flux`: original processors and classes, hence the original behaviour exactly."""
    record: _PatchRecord | None = getattr(model, _PATCH_ATTR, None)
    if record is None:
        raise ValueError("revert_kernels_on_flux: `model` is not patched")
    hooked = _instance_forward_owners(model)
    if hooked:
        raise ValueError(
            f"revert_kernels_on_flux: `model` has hooks installed on {hooked[:4]}{' ...' if len(hooked) > 4 else ''} "
            "that hold the patched forwards; remove them first (e.g. model.disable_cache())"
        )
    for module, original in reversed(record.class_swaps):
        if _leftover_bound_forward(module):
            del module.forward
        module.__class__ = original
        module.__dict__.pop("_t2i_block_kernels", None)
    if record.original_processors is not None:
        model.set_attn_processor(dict(record.original_processors))
    delattr(model, _PATCH_ATTR)
    logger.info("revert_kernels_on_flux: restored %d modules", len(record.class_swaps))
    return model
