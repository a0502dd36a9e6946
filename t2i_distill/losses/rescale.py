"""The rescale loss: distil the stock (×1000) FLUX teacher into an identical-structure ×1 student (the paper's recipe,
arXiv 2512.13006 §4.2.1: "identical images, text prompts, and proportionally scaled timesteps by minimizing the smooth
L1 loss between their outputs").

Both models are :class:`~t2i_distill.models.FluxStudent`; the teacher is built with ``time_scale=1000`` and the student
with ``time_scale=1``, so both take the *same* t ∈ [0, 1] and the same raw guidance and each scales them itself: the
teacher sees 1000·t and 1000·g (what diffusers' FLUX computes from its pipeline's t/1000), the student t and g.

Defaults, chosen because the paper gives none (``RescaleConfig``):

* **time: uniform on [0, 1]**. The ×1 teacher is consumed by sCM (TrigFlow angles with P_mean 0.2, P_std 1.6 map to
  flow times over all of (0, 1), heavy at both ends) and MeanFlow (logit-normal(−0.4, 1) for t and r ≤ t down to 0);
  a logit-normal rescale would starve exactly the tails those samplers visit. ``--rescale_time_sampler
  logit_normal`` is there for FLUX's own training distribution.
* **guidance: uniform on [1, 6]**, covering FLUX's sampling default 3.5 and the distillation scales 4.0–5.0.
* **smooth-L1 β = 1.0**, PyTorch's default (the paper names smooth L1 without a β); configurable.
* **x_t = (1 − t)·x0 + t·ε**, FLUX's rectified-flow interpolant, with ε ~ N(0, I) shared by both models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t2i_distill.conditioning import pack_latents
from t2i_distill.losses.common import prepare_batch, teacher_autocast, unwrap

__all__ = ["RESCALE_TIME_SAMPLERS", "RescaleConfig", "RescaleDraws", "draw_rescale", "rescale_loss"]

RESCALE_TIME_SAMPLERS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class RescaleConfig:
    """Constants of the rescale loss (module docstring: why these defaults)."""

    smooth_l1_beta: float = 1.0
    rescale_time_sampler: str = "uniform"
    rescale_time_mu: float = 0.0
    rescale_time_sigma: float = 1.0
    rescale_guidance_range: tuple[float, float] = (1.0, 6.0)

    def __post_init__(self) -> None:
        problems = []
        if not (self.smooth_l1_beta > 0 and self.smooth_l1_beta < float("inf")):
            problems.append(f"--smooth_l1_beta must be a finite number > 0, got {self.smooth_l1_beta}")
        if self.rescale_time_sampler not in RESCALE_TIME_SAMPLERS:
            problems.append(f"--rescale_time_sampler must be one of {RESCALE_TIME_SAMPLERS}, got "
                            f"{self.rescale_time_sampler!r}")
        if not self.rescale_time_sigma > 0:
            problems.append(f"--rescale_time_sigma must be > 0, got {self.rescale_time_sigma}")
        low, high = (tuple(self.rescale_guidance_range) + (None, None))[:2]
        if len(tuple(self.rescale_guidance_range)) != 2 or not (0 <= low <= high < float("inf")):
            problems.append(f"--rescale_guidance_range must be MIN MAX with 0 <= MIN <= MAX, got "
                            f"{self.rescale_guidance_range}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class RescaleDraws:
    """The randomness of one rescale step: noise like the latents, flow time t (B,) in (0, 1), guidance (B,)."""

    noise: torch.Tensor
    t: torch.Tensor
    guidance: torch.Tensor


def draw_rescale(latents: torch.Tensor, config: RescaleConfig, generator: torch.Generator | None = None
                 ) -> RescaleDraws:
    """Draws for a batch of latents (B, C, h, w), on the latents' device, from ``generator`` (or the global RNG)."""
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if config.rescale_time_sampler == "uniform":
        t = torch.rand(b, generator=generator, device=device)
    else:
        normal = torch.randn(b, generator=generator, device=device)
        t = torch.sigmoid(config.rescale_time_mu + config.rescale_time_sigma * normal)
    low, high = config.rescale_guidance_range
    guidance = low + (high - low) * torch.rand(b, generator=generator, device=device)
    return RescaleDraws(noise=noise, t=t, guidance=guidance)


def rescale_outputs(student, teacher, batch: dict, draws: RescaleDraws):
    """``(student velocity, teacher velocity)`` on the same x_t, prompts, t and guidance (teacher under no_grad)."""
    core = unwrap(student)
    data = prepare_batch(batch, core)
    dtype, device = data.dtype, data.device
    t = draws.t.to(device=device, dtype=torch.float32)
    noise = draws.noise.to(device=device, dtype=torch.float32)
    x_t = pack_latents((1 - t.view(-1, 1, 1, 1)) * data.latents.float() + t.view(-1, 1, 1, 1) * noise).to(dtype)
    kwargs = {"hidden_states": x_t, "encoder_hidden_states": data.prompt_embeds, "pooled_projections": data.pooled,
              "timestep": t, "img_ids": data.img_ids, "txt_ids": data.txt_ids, "return_dict": False}
    if core.config.guidance_embeds:
        kwargs["guidance"] = draws.guidance.to(device=device, dtype=torch.float32)
    with torch.no_grad(), teacher_autocast(device, dtype):
        target = teacher(**kwargs)[0]
    prediction = student(**kwargs)[0]
    return prediction, target


def rescale_loss(student, teacher, batch: dict, *, config: RescaleConfig | None = None,
                 draws: RescaleDraws | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Smooth-L1 between the ×1 student's and the ×1000 teacher's velocities; logs ``loss`` and ``rel_l2``
    (‖student − teacher‖ / ‖teacher‖ over the batch)."""
    config = RescaleConfig() if config is None else config
    if draws is None:
        draws = draw_rescale(batch["latents"], config)
    prediction, target = rescale_outputs(student, teacher, batch, draws)
    loss = torch.nn.functional.smooth_l1_loss(prediction.float(), target.float().detach(), beta=config.smooth_l1_beta)
    with torch.no_grad():
        rel = torch.linalg.vector_norm(prediction.float() - target.float()) / torch.linalg.vector_norm(
            target.float()).clamp_min(1e-12)
    return loss, {"loss": loss.detach(), "rel_l2": rel}
