"""The MeanFlow sampler (reference-spec §4.2; ``alibaba-damo-academy/T2I-Distill: model/pipeline.py:1115-1668``).

The student u(z, t, t − r) predicts the *average* velocity over [r, t]; one step jumps z_r = z_t − (t − r)·u. With
the resolution-shifted FLUX sigmas σ_0 = 1 > σ_1 > … > σ_N = 0 (:func:`~t2i_distill.pipelines.schedules.
meanflow_sigmas`, computed by the folder's ``FlowMatchEulerDiscreteScheduler``), step i calls the student once with
``timestep = σ_i`` and ``timestep2 = σ_i − σ_{i+1}`` and applies the scheduler's Euler step
``z ← z + (σ_{i+1} − σ_i)·u`` (fp32 arithmetic, cast back to the model dtype), which is that jump.

Timesteps (L4): by default the time inputs are the scheduler's fp32 sigmas, unrounded; the model itself then casts
them to its dtype, as every ×1 model does. ``quantize_timesteps=True`` reproduces the reference bit for bit instead:
it rounds the 0–1000 timesteps to the latents' dtype *before* dividing by 1000 (bf16 spacing there is 4, so
849.2 → 848), for parity runs only.
"""

from __future__ import annotations

import torch

from t2i_distill.models.flux import FluxStudent
from t2i_distill.pipelines.base import FewStepFluxPipeline
from t2i_distill.pipelines.schedules import meanflow_sigmas

__all__ = ["FluxMeanFlowPipeline", "meanflow_time_inputs"]


def meanflow_time_inputs(sigmas: torch.Tensor, timesteps: torch.Tensor, index: int, dtype: torch.dtype,
                         quantize_timesteps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, t − r)`` fed to the student at step ``index``: 0-d tensors on the [0, 1] scale.

    Default: fp32 ``σ_i`` and ``σ_i − σ_{i+1}``. ``quantize_timesteps``: the reference's
    ``t = timesteps[i].to(dtype)``, ``r = timesteps[i+1].to(dtype)`` (0 after the last), ``(t/1000, (t − r)/1000)``
    computed in ``dtype``.
    """
    if not quantize_timesteps:
        return sigmas[index], sigmas[index] - sigmas[index + 1]
    t = timesteps[index].to(dtype)
    r = timesteps[index + 1].to(dtype) if index + 1 < len(timesteps) else torch.zeros((), dtype=dtype,
                                                                                        device=t.device)
    return t / 1000, (t - r) / 1000


class FluxMeanFlowPipeline(FewStepFluxPipeline):
    """FLUX sampled by a MeanFlow (dual-timestep) student in 1–N jumps.

    ``FluxMeanFlowPipeline.from_pretrained(teacher_folder, transformer=student)`` keeps the folder's
    ``FlowMatchEulerDiscreteScheduler`` (FLUX-dev's dynamic shift). ``pipe(prompt, num_inference_steps=4, ...,
    quantize_timesteps=False)``.
    """

    default_num_inference_steps = 4

    def _denoise(self, latents, num_inference_steps, cond, generator, *, quantize_timesteps: bool = False):
        """``quantize_timesteps``: round the 0–1000 timesteps to the model dtype first, as the reference (parity)."""
        transformer = self.transformer
        if not isinstance(transformer, FluxStudent) or not transformer.config.dual_timestep:
            raise TypeError(
                "`transformer`: the MeanFlow pipeline needs a dual-timestep FluxStudent, got "
                f"{type(transformer).__name__}; load it with load_student(..., kind='meanflow')"
            )
        if not isinstance(quantize_timesteps, bool):
            raise TypeError(f"`quantize_timesteps`: expected a bool, got {quantize_timesteps!r}")
        dtype = transformer.dtype
        sigmas, timesteps = meanflow_sigmas(num_inference_steps, latents.shape[1], self.scheduler,
                                            device=latents.device)
        self.scheduler.set_begin_index(0)
        self._num_timesteps = num_inference_steps
        batch = latents.shape[0]
        for i in self.progress_bar(range(num_inference_steps)):
            t, delta = meanflow_time_inputs(sigmas, timesteps, i, dtype, quantize_timesteps)
            u = transformer(hidden_states=latents, timestep=t.expand(batch), timestep2=delta.expand(batch),
                            return_dict=False, **cond)[0]
            latents = self.scheduler.step(u, timesteps[i], latents, return_dict=False)[0].to(dtype)
        return latents
