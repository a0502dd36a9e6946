"""The sCM student and teacher: a ×1 FLUX flow model seen through TrigFlow's parametrisation (reference-spec §2.2).

sCM works in TrigFlow time t ∈ (0, π/2) on unit-variance inputs x̂ = cos t·x̂0 + sin t·ε̂ and predicts the TrigFlow
velocity F = dx̂/dt = cos t·ε̂ − sin t·x̂0. FLUX is a rectified-flow model: it predicts v = ε − x0 at flow time
s ∈ (0, 1) on x_s = (1 − s)·x0 + s·ε. :class:`TrigFlowStudent` maps one onto the other:

* **time**: ``s = sin t / (cos t + sin t)`` (:func:`trigflow_to_flow_time`);
* **input**: ``x_s = c·x̂`` with ``c = √(s² + (1 − s)²) = 1/(cos t + sin t)`` (:func:`flow_input_scale`), which turns
  the trig interpolant into exactly FLUX's interpolant at time s;
* **output**: ``F = [(1 − 2s)·x_s + (1 − 2s + 2s²)·v] / c`` (:func:`flow_to_trigflow_velocity`), which equals
  ``cos t·ε̂ − sin t·x̂0`` when ``v = ε̂ − x̂0``;
* **adaptive weight**: ``logvar = logvar_linear(time_text_embed(t, g, pooled))``, a (B, 1) log-variance of the sCM
  loss, computed from the *TrigFlow* angle t (not s), through the model's own (shared, trained) conditioning MLPs.

The forward reproduces the reference's ``FluxTrigFlow.forward`` (``alibaba-damo-academy/T2I-Distill:
train_sCM.py:352-423``) op for op, including its casts, so bf16 runs round where the reference rounds:

* t is cast to the prompt embeddings' dtype first, so s, c and the output map are computed in that dtype (bf16 in
  training); the squares are ``**2`` (``pow``), which CUDA autocast runs in fp32, as in the reference's JVP pass;
* ``x_s`` is cast to the prompt dtype before the flow model; the output map uses that cast ``x_s``;
* the flow model gets ``timestep = s`` and the guidance unchanged; :class:`~t2i_distill.models.flux.FluxStudent`
  casts both to the hidden-state dtype and multiplies by ``time_scale`` (1.0, the reference's "X1" model);
* the logvar head gets t (cast) and the *raw* guidance, as the reference passes them to ``time_text_embed``.

Differences from the reference, none of which changes a value:

* It is a :class:`FluxStudent` subclass with ``logvar_linear`` built in ``__init__``, not a wrapper adopting another
  model's ``__dict__``; the ``state_dict`` keys are the same (FLUX keys + ``logvar_linear.weight/bias``), so the
  reference's sCM checkpoints load into it and its checkpoints load into the reference.
* No ``jvp=True`` argument: the reference uses it to switch gradient checkpointing off around the JVP call, but
  :meth:`FluxStudent.forward` only checkpoints when grad is enabled, and the JVP runs under ``no_grad``
  (reference-spec §3.3), so the toggle has nothing to do.
* The logvar embedding is computed only when ``return_logvar=True`` (the reference always computes it).
* ``forward`` returns plain tensors (``F`` or ``(F, logvar)``), as the reference does, so ``torch.func.jvp`` can
  take it directly; there is no ``return_dict``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from t2i_distill.models.flux import FluxStudent

__all__ = ["TrigFlowStudent", "flow_input_scale", "flow_to_trigflow_velocity", "trigflow_to_flow_time"]


# -- the maps ---------------------------------------------------------------------------------------------------
def trigflow_to_flow_time(t: torch.Tensor) -> torch.Tensor:
    """Flow time ``s = sin t / (cos t + sin t)`` ∈ [0, 1] of the TrigFlow angle t ∈ [0, π/2]; same shape and dtype."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def flow_input_scale(s: torch.Tensor) -> torch.Tensor:
    """``c(s) = √(s² + (1 − s)²)`` (= 1/(cos t + sin t)): multiplies x̂ into FLUX's interpolant x_s; same shape as s.

    Written with ``**2`` as the reference, because autocast runs ``pow`` in fp32 (reference-spec §2.4).
    """
    return torch.sqrt(s**2 + (1 - s) ** 2)


def flow_to_trigflow_velocity(x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """TrigFlow velocity ``F = [(1 − 2s)·x_s + (1 − 2s + 2s²)·v] / c(s)`` from FLUX's input ``x_s`` and output ``v``.

    ``x_s`` and ``v`` are (B, tokens, channels) (any equal shapes); ``s`` must broadcast against them, e.g. (B, 1, 1).
    If ``x_s = (1 − s)·x0 + s·ε`` and ``v = ε − x0`` then ``F = cos t·ε − sin t·x0`` with t the angle of s.
    """
    return ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s**2) * v) / flow_input_scale(s)


# -- the model --------------------------------------------------------------------------------------------------
class TrigFlowStudent(FluxStudent):
    """FLUX (×1 inputs) in TrigFlow parametrisation, with the sCM ``logvar`` head; the sCM student and teacher.

    Constructor arguments are :class:`FluxStudent`'s; ``dual_timestep`` must stay False (sCM has one time input).
    ``logvar_linear`` (hidden → 1) is Xavier-uniform initialised with a zero bias, as in the reference; loaders
    overwrite it when a checkpoint has it. For the teacher the head exists but is unused (as in the reference).
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
        if dual_timestep:
            raise ValueError(
                "`dual_timestep`: the TrigFlow (sCM) student has a single time input; expected False, got True "
                "(the MeanFlow student is FluxStudent(dual_timestep=True))"
            )
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
            time_scale=time_scale,
            dual_timestep=False,
            time_embedding_fp32=time_embedding_fp32,
        )
        self.logvar_linear = nn.Linear(self.inner_dim, 1)
        self.reset_logvar_parameters()

    def embedding_time(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The flow time the time embedding gets: ``s`` (prompt dtype, the reference's cast), or with
        ``time_embedding_fp32`` s recomputed in float32 from the same angle, so that at ×1000 the embedding is a
        precise function of the angle instead of the bf16-rounded s (whose rounding ×1000 is several time units)."""
        return trigflow_to_flow_time(t.float()) if self.config.get("time_embedding_fp32", False) else s

    def reset_logvar_parameters(self) -> None:
        """The reference's initialisation of the logvar head: Xavier-uniform weight, zero bias."""
        nn.init.xavier_uniform_(self.logvar_linear.weight)
        nn.init.zeros_(self.logvar_linear.bias)

    def logvar(
        self, t: torch.Tensor, pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sCM log-variance (B, 1), in the embedding dtype, from TrigFlow angle t (B,) (unscaled, as the reference)."""
        if self.config.guidance_embeds:
            temb = self.time_text_embed(t, guidance, pooled_projections)
        else:
            temb = self.time_text_embed(t, pooled_projections)
        return self.logvar_linear(temb)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        return_logvar: bool = False,
        joint_attention_kwargs: dict | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """TrigFlow velocity F (B, image tokens, out channels) of x̂ = ``hidden_states`` at angle ``timestep``.

        Args:
            hidden_states: packed x̂ = x_t/σ_d, (B, image tokens, in channels), any float dtype.
            encoder_hidden_states: prompt embeddings (B, text tokens, joint dim); their dtype is the dtype of the
                time maps and of x_s (the reference's casts).
            pooled_projections: pooled text embedding (B, pooled dim).
            timestep: TrigFlow angle t ∈ (0, π/2), one per sample (B,) or one for all (a single element).
            img_ids, txt_ids, guidance, joint_attention_kwargs: as :meth:`FluxStudent.forward`.
            return_logvar: also return the sCM log-variance (B, 1).

        Returns:
            F, or ``(F, logvar)`` when ``return_logvar``. F is in the promoted dtype of x_s, v and the time maps
            (the prompt dtype outside autocast; fp32 under CUDA autocast, as the reference's JVP tangent).
        """
        if hidden_states.ndim != 3:
            raise ValueError(
                f"`hidden_states`: expected packed latents (B, image tokens, channels), got shape "
                f"{tuple(hidden_states.shape)}"
            )
        batch = hidden_states.shape[0]
        if timestep.numel() not in (1, batch):
            raise ValueError(
                f"`timestep`: expected one angle per sample ({batch}) or a single one, got shape "
                f"{tuple(timestep.shape)}"
            )
        prompt_dtype = encoder_hidden_states.dtype
        t = timestep.reshape(-1).expand(batch).to(prompt_dtype)
        s = trigflow_to_flow_time(t)  # (B,), prompt dtype
        s_b11 = s.view(-1, 1, 1)
        x_s = (hidden_states * flow_input_scale(s_b11)).to(prompt_dtype)
        v = super().forward(
            hidden_states=x_s,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=self.embedding_time(t, s),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=False,
        )[0]
        velocity = flow_to_trigflow_velocity(x_s, v, s_b11)
        if not return_logvar:
            return velocity
        return velocity, self.logvar(t, pooled_projections, guidance)
