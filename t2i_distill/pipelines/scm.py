"""The sCM sampler (reference-spec §4.1; ``alibaba-damo-academy/T2I-Distill: model/pipeline.py:436-1112``).

Latents live in σ_d-scaled TrigFlow space: x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d²). With diffusers'
``SCMScheduler(prediction_type="trigflow", sigma_data=0.5)`` and angles ``t_0 > t_1 > … > t_N = 0``
(:func:`~t2i_distill.pipelines.schedules.scm_timesteps`), each step i does:

1. ``x̂ = x / σ_d``; F = student(x̂, t_i) — the TrigFlow velocity of the student (a :class:`TrigFlowStudent`, or a
   ×1 flow :class:`FluxStudent` wrapped by the same maps, :func:`trigflow_velocity`);
2. ``x̂0 = cos t_i·x − sin t_i·σ_d·F`` (the scheduler, in fp32);
3. ``x ← cos t_{i+1}·x̂0 + sin t_{i+1}·σ_d·ξ`` with **fresh** noise ξ ~ N(0, I) from the pipeline's generator (on the
   last step sin 0 = 0, so x = x̂0);

and the output is x̂0 / σ_d of the last step, unpacked and decoded. Initial noise: ``randn·σ_d`` in the working dtype.

Deviation from the reference, by design (B10): after each step the latents are cast back to the transformer's dtype,
so bf16/fp16 sampling works without an outer autocast (the reference feeds fp32 latents to a bf16 model from step 2
on and relies on the caller's ``torch.autocast``). The schedule, the noise stream and every formula are unchanged.
"""

from __future__ import annotations

import torch

from t2i_distill.models.flux import FluxStudent
from t2i_distill.models.trigflow import (
    TrigFlowStudent,
    flow_input_scale,
    flow_to_trigflow_velocity,
    trigflow_to_flow_time,
)
from t2i_distill.pipelines.base import FewStepFluxPipeline
from t2i_distill.pipelines.schedules import SCM_INTERMEDIATE_TIMESTEP, SCM_MAX_TIMESTEP, scm_timesteps

__all__ = ["FluxSCMPipeline", "trigflow_velocity"]

SIGMA_DATA = 0.5


def trigflow_velocity(transformer: FluxStudent, x_hat: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """TrigFlow velocity F (B, image tokens, 64) of the student at unit-variance input ``x_hat`` and angles ``t`` (B,).

    A :class:`TrigFlowStudent` computes it itself; a ×1 flow :class:`FluxStudent` (e.g. an sCM checkpoint loaded with
    ``kind="flow"``) gets the same maps around its flow prediction, with the same casts (time maps and x_s in the
    prompt dtype).
    """
    if isinstance(transformer, TrigFlowStudent):
        return transformer(hidden_states=x_hat, timestep=t, **cond)
    dtype = cond["encoder_hidden_states"].dtype
    s = trigflow_to_flow_time(t.to(dtype))
    s_b11 = s.view(-1, 1, 1)
    x_s = (x_hat * flow_input_scale(s_b11)).to(dtype)
    v = transformer(hidden_states=x_s, timestep=s, return_dict=False, **cond)[0]
    return flow_to_trigflow_velocity(x_s, v, s_b11)


class FluxSCMPipeline(FewStepFluxPipeline):
    """FLUX sampled by an sCM student in 1–N steps.

    ``FluxSCMPipeline.from_pretrained(teacher_folder, transformer=student, scheduler=SCMScheduler(sigma_data=0.5))``
    (or :func:`t2i_distill.pipelines.load_pipeline`). ``pipe(prompt, num_inference_steps=2, guidance_scale=...,
    intermediate_timestep=1.3, generator=...)``.
    """

    default_num_inference_steps = 2

    def _denoise(self, latents, num_inference_steps, cond, generator, *,
                 intermediate_timestep: float | None = SCM_INTERMEDIATE_TIMESTEP,
                 max_timestep: float = SCM_MAX_TIMESTEP):
        """``intermediate_timestep``: the middle angle of the 2-step schedule (``None``: linspace); ignored for other
        step counts. ``max_timestep``: the first angle (≈ π/2)."""
        from diffusers import SCMScheduler

        transformer = self.transformer
        if not isinstance(transformer, FluxStudent) or transformer.config.dual_timestep:
            raise TypeError(
                "`transformer`: the sCM pipeline needs a TrigFlowStudent (or a ×1 FluxStudent without a second "
                f"timestep), got {type(transformer).__name__}; load it with load_student(..., kind='trigflow')"
            )
        if not isinstance(self.scheduler, SCMScheduler):
            raise TypeError(f"`scheduler`: expected diffusers' SCMScheduler, got {type(self.scheduler).__name__}")
        sigma_data = self.scheduler.config.sigma_data
        dtype = transformer.dtype
        timesteps = scm_timesteps(num_inference_steps, intermediate_timestep, max_timestep, device=latents.device)
        self.scheduler.set_timesteps(num_inference_steps, timesteps=timesteps, max_timesteps=None,
                                     intermediate_timesteps=None, device=latents.device)
        self.scheduler.set_begin_index(0)
        self._num_timesteps = num_inference_steps
        latents = latents * sigma_data
        denoised = latents
        batch = latents.shape[0]
        for t in self.progress_bar(timesteps[:-1]):
            t_b = t.expand(batch).to(dtype)  # the reference casts the angle to the latents' dtype
            velocity = trigflow_velocity(transformer, latents / sigma_data, t_b, cond)
            noise_pred = velocity.float() * sigma_data
            latents, denoised = self.scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)
            latents = latents.to(dtype)  # B10: stay in the model's dtype without an outer autocast
        return (denoised / sigma_data).to(dtype)
