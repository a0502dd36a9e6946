"""Every random draw of one sCM or MeanFlow loss call, as a record the loss can be given (so it is deterministic).

``draw_scm`` / ``draw_meanflow`` without a generator draw in the reference's order and from the same RNGs
(reference-spec §2.4), so a seeded run consumes the global RNG streams as T2I-Distill does:

* sCM: ``np.random.choice`` (guidance) → device ``randn_like`` (noise) → CPU ``randn`` (time normals);
* MeanFlow: ``np.random.choice`` (guidance) → device ``rand`` (prompt dropout, only when ``cfg_prob > 0``) →
  device ``randn(B, 2)`` or ``rand(B, 2)`` (the time pair, in the model dtype) → device ``rand`` (r = t mask) →
  device ``randn_like`` (noise).

With a ``torch.Generator`` every draw comes from it, on the generator's device, in the same order (guidance by
``randint`` over the list instead of numpy), then moves to the latents' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from t2i_distill.losses.config import MeanFlowConfig, SCMConfig

__all__ = ["MeanFlowDraws", "SCMDraws", "draw_meanflow", "draw_scm"]


def _check_vector(name: str, value: object, batch: int, *, boolean: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}`: expected a tensor of shape ({batch},), got {type(value).__name__}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"`{name}`: expected shape ({batch},), got {tuple(value.shape)}")
    if boolean and value.dtype != torch.bool:
        raise ValueError(f"`{name}`: expected a bool tensor, got {value.dtype}")
    if not boolean and (not value.is_floating_point() or not bool(torch.isfinite(value).all())):
        raise ValueError(f"`{name}`: expected finite floating-point values, got {value.dtype} {value.tolist()}")


def _check_noise(noise: object, latents_shape: tuple[int, ...]) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"`noise`: expected a tensor of shape {latents_shape}, got {type(noise).__name__}")
    if tuple(noise.shape) != latents_shape:
        raise ValueError(f"`noise`: expected the latents' shape {latents_shape}, got {tuple(noise.shape)}")


@dataclass
class SCMDraws:
    """The random inputs of one sCM loss call (B samples).

    Attributes:
        noise: ε ~ N(0, I), the latents' shape (B, C, h, w); the loss uses σ_d·ε as the noise.
        guidance: (B,) guidance-embedding values (float64, as the reference's ``torch.tensor(np.random.choice)``).
        time_normal: (B,) n ~ N(0, 1) of the time sampler (float32 on the CPU, as the reference), or None.
        t: (B,) TrigFlow angles in (0, π/2), or None. Exactly one of ``time_normal`` and ``t`` is given.
    """

    noise: torch.Tensor
    guidance: torch.Tensor
    time_normal: torch.Tensor | None = None
    t: torch.Tensor | None = None

    def validate(self, latents_shape: tuple[int, ...]) -> None:
        batch = latents_shape[0]
        _check_noise(self.noise, latents_shape)
        _check_vector("guidance", self.guidance, batch)
        if (self.time_normal is None) == (self.t is None):
            raise ValueError("SCMDraws: give exactly one of `time_normal` (n of the sampler) and `t` (the angles); "
                             f"got time_normal={'set' if self.time_normal is not None else None}, "
                             f"t={'set' if self.t is not None else None}")
        if self.time_normal is not None:
            _check_vector("time_normal", self.time_normal, batch)
        else:
            _check_vector("t", self.t, batch)
            if not bool(((self.t > 0) & (self.t < math.pi / 2)).all()):
                raise ValueError(f"`t`: TrigFlow angles must lie in (0, π/2), got {self.t.tolist()}")

    def angles(self, config: SCMConfig) -> torch.Tensor:
        """t (B,): the given angles, or arctan(exp(P_std·n + P_mean) / σ) with σ per ``config.time_sampler_sigma``.

        Computed in the dtype and on the device of ``time_normal`` (fp32 CPU in the reference)."""
        if self.t is not None:
            return self.t
        sigma = (self.time_normal * config.logit_std + config.logit_mean).exp()
        return torch.atan(sigma / config.sampler_sigma)


@dataclass
class MeanFlowDraws:
    """The random inputs of one MeanFlow loss call (B samples).

    Attributes:
        noise: ε ~ N(0, I), the latents' shape (B, C, h, w).
        guidance: (B,) guidance-embedding values (float64).
        r, t: (B,) the sorted time pair, 0 ≤ r ≤ t ≤ 1, *before* the r = t mask is applied.
        equal_mask: (B,) bool, True where r := t (probability 1 − ``ratio_r_not_equal_t``).
        dropout_mask: (B,) bool, True where the prompt is replaced by the " " prompt (probability ``cfg_prob``).
    """

    noise: torch.Tensor
    guidance: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    equal_mask: torch.Tensor
    dropout_mask: torch.Tensor

    def validate(self, latents_shape: tuple[int, ...]) -> None:
        batch = latents_shape[0]
        _check_noise(self.noise, latents_shape)
        for name in ("guidance", "r", "t"):
            _check_vector(name, getattr(self, name), batch)
        for name in ("equal_mask", "dropout_mask"):
            _check_vector(name, getattr(self, name), batch, boolean=True)
        ok = (self.r >= 0) & (self.r <= self.t) & (self.t <= 1)
        if not bool(ok.all()):
            raise ValueError(f"`r`, `t`: expected 0 <= r <= t <= 1, got r={self.r.tolist()}, t={self.t.tolist()}")

    def times(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t) with the r = t mask applied (the reference's ``torch.where(equal_mask, t, r)``)."""
        return torch.where(self.equal_mask.to(self.t.device), self.t, self.r), self.t


def _latents(batch: dict) -> torch.Tensor:
    latents = batch.get("latents") if isinstance(batch, dict) else None
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"`batch['latents']`: expected a (B, C, h, w) tensor, got {got}")
    return latents


def _guidance(scales: tuple[float, ...], batch: int, device, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.tensor(np.random.choice(scales, size=batch, replace=True), device=device)
    idx = torch.randint(len(scales), (batch,), generator=generator, device=generator.device)
    return torch.tensor(scales, dtype=torch.float64, device=generator.device)[idx].to(device)


def draw_scm(batch: dict, config: SCMConfig, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None) -> SCMDraws:
    """Draw the sCM randomness for ``batch`` (only ``batch['latents']`` (B, C, h, w) is read).

    ``dtype`` is the noise's dtype (default: the latents'); the reference draws it in the weight dtype (bf16).
    """
    latents = _latents(batch)
    b, dtype = latents.shape[0], dtype or latents.dtype
    guidance = _guidance(config.scm_cfg_scale, b, latents.device, generator)
    if generator is None:
        noise = torch.randn(latents.shape, device=latents.device, dtype=dtype)
        time_normal = torch.randn(b, device="cpu")
    else:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=dtype)
        noise = noise.to(latents.device)
        time_normal = torch.randn(b, generator=generator, device=generator.device).cpu()
    return SCMDraws(noise=noise, guidance=guidance, time_normal=time_normal)


def draw_meanflow(batch: dict, config: MeanFlowConfig, generator: torch.Generator | None = None,
                  dtype: torch.dtype | None = None) -> MeanFlowDraws:
    """Draw the MeanFlow randomness for ``batch`` (only ``batch['latents']`` (B, C, h, w) is read).

    ``dtype`` is the dtype of the time pair and the noise (default: the latents'; the reference: bf16).
    """
    latents = _latents(batch)
    b, dtype = latents.shape[0], dtype or latents.dtype
    device = latents.device if generator is None else generator.device
    kw = {"device": device} if generator is None else {"device": device, "generator": generator}
    guidance = _guidance(config.cfg_scale, b, latents.device, generator)
    if config.cfg_prob > 0:
        dropout_mask = torch.rand(b, **kw) < config.cfg_prob
    else:  # the reference draws nothing then
        dropout_mask = torch.zeros(b, dtype=torch.bool, device=device)
    if config.time_sampler == "uniform":
        pair = torch.rand(b, 2, dtype=dtype, **kw)
    else:
        pair = torch.sigmoid(torch.randn(b, 2, dtype=dtype, **kw) * config.time_sigma + config.time_mu)
    pair, _ = torch.sort(pair, dim=1)
    equal_mask = torch.rand(b, **kw) < (1.0 - config.ratio_r_not_equal_t)
    noise = torch.randn(latents.shape, dtype=dtype, **kw)
    move = {"device": latents.device}
    return MeanFlowDraws(noise=noise.to(**move), guidance=guidance, r=pair[:, 0].to(**move), t=pair[:, 1].to(**move),
                         equal_mask=equal_mask.to(**move), dropout_mask=dropout_mask.to(**move))
