"""The FLUX student: diffusers' ``FluxTransformer2DModel`` with the reference system's input conventions.

:class:`FluxStudent` subclasses diffusers' model (same modules, same ``state_dict`` keys, same ``from_pretrained``)
and re-implements only ``forward``'s orchestration: the loop over diffusers' own blocks, which is where the
reference's conventions differ from stock FLUX (reference-spec §3.1–3.2):

* ``time_scale`` (config; 1.0 = the reference's "X1" models): timestep and guidance enter the sinusoidal embedders
  as ``t.to(dtype) * time_scale``. Stock FLUX multiplies by 1000; the reference's rescaled checkpoints expect 1, which
  also keeps JVP tangents through the time embedding O(1). (Scaling inside a wrapper is not equivalent: stock
  diffusers rounds ``t·1000`` to bf16 before any wrapper could undo it.)
* ``time_embedding_fp32`` (config; default False, the reference's casts): compute the time and guidance inputs, their
  sinusoids and the embedding MLPs in float32 whatever the model's dtype or autocast says, as rCM does for its ×1000
  models. At ×1000 a bf16 time input has a resolution of ~4 time units near t = 1 (8 bits of mantissa), so the
  highest sinusoid frequencies are noise; ``bench/time_embedding_precision.py`` measures the error. The stock-weights
  path (``--time_scale 1000``) switches it on.
* ``dual_timestep`` (config): MeanFlow's second time input ``timestep2`` (= t − r) through its own sinusoid and
  ``timestep_embedder2`` (256 → hidden), added to the conditioning embedding.
* ``forward(..., gradient_checkpointing)`` recomputes each block in the backward (non-reentrant) when grad is on,
  as the reference; under ``no_grad`` (the JVP pass) nothing is checkpointed.

Blocks are called through their public ``forward``, so attention processors set with ``set_attn_processor`` and
blocks patched by :func:`t2i_distill.apply_kernels_to_flux` take effect here as in diffusers' own forward.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput

__all__ = ["FluxStudent"]


def _embed_fp32(embedder: TimestepEmbedding, proj: torch.Tensor) -> torch.Tensor:
    """diffusers' ``TimestepEmbedding`` (linear → SiLU → linear) computed in float32 from float32 sinusoids; the
    weights are upcast on the fly, so gradients reach the (e.g. bf16) parameters unchanged in layout."""
    def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())

    return linear(embedder.linear_2, torch.nn.functional.silu(linear(embedder.linear_1, proj.float())))


class FluxStudent(FluxTransformer2DModel):
    """FLUX transformer with ``time_scale`` (1.0: the reference's ×1 inputs) and an optional MeanFlow ``timestep2``.

    All other arguments are diffusers' (``FluxTransformer2DModel``); a stock FLUX folder loads with
    ``FluxStudent.from_pretrained(path, subfolder="transformer", time_scale=1.0)``.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        time_scale: float = 1.0,
        dual_timestep: bool = False,
        time_embedding_fp32: bool = False,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        if dual_timestep:
            # Same construction as the first embedder; the loaders copy its weights in (MeanFlow's initialisation).
            self.time_proj2 = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.timestep_embedder2 = TimestepEmbedding(in_channels=256, time_embed_dim=self.inner_dim)

    # -- conditioning -------------------------------------------------------------------------------------------
    def conditioning(
        self,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        timestep2: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The AdaLN conditioning ``temb`` (B, hidden) from the time inputs, as the reference computes it.

        ``dtype`` is the hidden states' dtype (time inputs are cast to it before scaling, as in the reference).
        """
        dtype = pooled_projections.dtype if dtype is None else dtype
        self._check_time_inputs(guidance, timestep2)
        if self.config.get("time_embedding_fp32", False):
            return self._conditioning_fp32(timestep, pooled_projections, guidance, timestep2)
        scale = self.config.time_scale
        timestep = timestep.to(dtype) * scale
        if self.config.guidance_embeds:
            temb = self.time_text_embed(timestep, guidance.to(dtype) * scale, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        if self.config.dual_timestep:
            proj2 = self.time_proj2(timestep2.to(dtype) * scale)
            temb = temb + self.timestep_embedder2(proj2.to(dtype=pooled_projections.dtype))
        return temb

    def _conditioning_fp32(self, timestep, pooled_projections, guidance, timestep2) -> torch.Tensor:
        """:meth:`conditioning` with the time/guidance path in float32 (autocast off); the sum is cast back to the
        pooled embedding's dtype, where the AdaLN layers read it. The pooled-text projection stays in the model dtype
        (it carries no time and no tangent). Inputs already checked by :meth:`conditioning`."""
        scale = float(self.config.time_scale)
        embed = self.time_text_embed
        with torch.autocast(device_type=timestep.device.type, enabled=False):
            temb = _embed_fp32(embed.timestep_embedder, embed.time_proj(timestep.float() * scale))
            if self.config.guidance_embeds:
                temb = temb + _embed_fp32(embed.guidance_embedder, embed.time_proj(guidance.float() * scale))
            if self.config.dual_timestep:
                temb = temb + _embed_fp32(self.timestep_embedder2, self.time_proj2(timestep2.float() * scale))
        pooled = embed.text_embedder(pooled_projections)
        return (temb + pooled.float()).to(pooled.dtype)

    def _check_time_inputs(self, guidance, timestep2) -> None:
        """The time inputs this model's config needs: guidance with guidance embeds, t − r exactly when dual."""
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("`guidance`: this model embeds guidance (guidance_embeds=True); got None")
        if self.config.dual_timestep and timestep2 is None:
            raise ValueError("`timestep2`: this MeanFlow student (dual_timestep=True) needs t - r; got None")
        if not self.config.dual_timestep and timestep2 is not None:
            raise ValueError("`timestep2` was given but this model has no second embedder (dual_timestep=False)")

    def rotary_embedding(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (cos, sin), each (text + image tokens, head dim), for ids (N, 3) (a batch dim is dropped)."""
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        return self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        timestep2: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Velocity (B, image tokens, out channels) for packed latents (B, image tokens, in channels)."""
        hidden_states = self.x_embedder(hidden_states)
        temb = self.conditioning(timestep, pooled_projections, guidance, timestep2, dtype=hidden_states.dtype)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        rotary = self.rotary_embedding(img_ids, txt_ids)
        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        for block in (*self.transformer_blocks, *self.single_transformer_blocks):
            args = (hidden_states, encoder_hidden_states, temb, rotary, joint_attention_kwargs)
            if checkpoint:
                encoder_hidden_states, hidden_states = torch.utils.checkpoint.checkpoint(
                    block, *args, use_reentrant=False
                )
            else:
                encoder_hidden_states, hidden_states = block(*args)
        output = self.proj_out(self.norm_out(hidden_states, temb))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
