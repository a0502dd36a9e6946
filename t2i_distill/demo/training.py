"""The two training loops of the demo teacher: a tiny ``AutoencoderKL`` and a rectified-flow FLUX teacher.

Both draw every random number from one ``torch.Generator`` the caller seeds, so a run is reproducible on one machine
(bit-exact across machines only where the CPU math libraries agree: thread count and ISA change float summation).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from t2i_distill.conditioning import (
    TextConditioning,
    latent_image_ids,
    pack_latents,
    text_ids,
)

__all__ = ["FlowTrainingData", "latent_statistics", "train_autoencoder", "train_flow_teacher"]

logger = logging.getLogger(__name__)


def _check_steps(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}`: expected a positive int, got {value!r}")


def train_autoencoder(vae, images: torch.Tensor, *, steps: int, batch_size: int, lr: float, kl_weight: float,
                      generator: torch.Generator, foreground_below: float = 0.9,
                      log_every: int = 100) -> list[float]:
    """Train ``vae`` (AutoencoderKL, fp32) to reconstruct ``images`` (N, 3, R, R) in [-1, 1]; returns the losses.

    Loss = weighted MSE(decode(posterior sample), image) + ``kl_weight``·KL(posterior ‖ N(0, I)) per latent element;
    pixels with a channel below ``foreground_below`` (i.e. not white) weigh 10×. The small KL keeps the latent
    bounded and the posterior narrow, as in Stable Diffusion's autoencoders.
    """
    _check_steps("steps", steps)
    _check_steps("batch_size", batch_size)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = images[index]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        # Shapes cover ~10% of a white image: weighting their pixels ×10 makes colour, not just the blob, worth
        # learning within a few hundred steps (unweighted, a 200-step VAE decodes every colour as the same brown).
        weight = 1.0 + 9.0 * (batch.amin(dim=1, keepdim=True) < foreground_below).float()
        loss = (weight * (reconstruction - batch).square()).mean() + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            logger.info("vae step %d/%d loss %.5f", step + 1, steps, sum(losses[-log_every:]) / log_every)
    vae.eval()
    return losses


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, C, h, w) of every image: the flow teacher samples ``mean + std·ε`` per step."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start:start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@dataclass
class FlowTrainingData:
    """What the flow teacher trains on.

    Attributes:
        posterior_mean, posterior_std: VAE posteriors (N, C, h, w) fp32 of the N images.
        caption_index: (N,) int64, each image's row in ``text``.
        text: the encoded captions (K rows) followed by the empty prompt ``" "`` as the last row (prompt dropout).
        shift_factor, scaling_factor: FLUX's latent normalisation ``x0 = (z − shift)·scale``.
    """

    posterior_mean: torch.Tensor
    posterior_std: torch.Tensor
    caption_index: torch.Tensor
    text: TextConditioning
    shift_factor: float
    scaling_factor: float


def train_flow_teacher(model, data: FlowTrainingData, *, steps: int, batch_size: int, lr: float, ema_decay: float,
                       prompt_dropout: float, guidance_range: tuple[float, float], generator: torch.Generator,
                       log_every: int = 100) -> list[float]:
    """Rectified-flow matching of a ×1 FLUX teacher (``FluxStudent``, time_scale 1) on VAE latents.

    Per step: x0 = (z − shift)·scale with z a posterior sample; t = sigmoid(n), n ~ N(0, 1) (SD3/FLUX's logit-normal);
    x_t = (1 − t)·x0 + t·ε; target v = ε − x0; the model sees pack(x_t), timestep t and guidance g ~ U(guidance_range)
    (a nuisance input it learns to ignore, so any g the trainers draw is in distribution). A fraction
    ``prompt_dropout`` of samples gets the empty prompt " ", as the MeanFlow trainer feeds its teacher for dropped
    prompts. At the end the model holds the EMA of its weights (decay ``ema_decay``, warmed up). Returns the losses.
    """
    _check_steps("steps", steps)
    _check_steps("batch_size", batch_size)
    low, high = guidance_range
    latent_h, latent_w = data.posterior_mean.shape[-2:]
    img_ids = latent_image_ids(latent_h, latent_w)
    txt_ids = text_ids(data.text.prompt_embeds.shape[1])
    empty_row = len(data.text) - 1
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    for step in range(steps):
        index = torch.randint(len(data.caption_index), (batch_size,), generator=generator)
        noise_z = torch.randn(data.posterior_mean[index].shape, generator=generator)
        z = data.posterior_mean[index] + data.posterior_std[index] * noise_z
        x0 = (z - data.shift_factor) * data.scaling_factor
        t = torch.sigmoid(torch.randn(batch_size, generator=generator))
        eps = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        rows = data.caption_index[index].clone()
        rows[torch.rand(batch_size, generator=generator) < prompt_dropout] = empty_row
        guidance = low + (high - low) * torch.rand(batch_size, generator=generator)
        prediction = model(
            hidden_states=pack_latents(x_t), encoder_hidden_states=data.text.prompt_embeds[rows],
            pooled_projections=data.text.pooled_prompt_embeds[rows], timestep=t, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance,
        ).sample
        loss = F.mse_loss(prediction, pack_latents(eps - x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping keeps the first steps of a freshly initialised AdaLN model from overshooting.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(current, 1 - decay)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            logger.info("flow step %d/%d loss %.4f", step + 1, steps, sum(losses[-log_every:]) / log_every)
    model.load_state_dict(ema.state_dict())
    model.eval()
    return losses
