"""The few-step sampling schedules of the reference's pipelines (reference-spec §4.1, §4.2), as pure functions.

* sCM (diffusers ``SCMScheduler.set_timesteps``): TrigFlow angles from ``max_t`` = 1.5708 (≈ π/2, pure noise) to 0.
  2 steps with an intermediate angle (the reference passes 1.3): ``[1.5708, 1.3, 0]``; otherwise
  ``linspace(1.5708, 0, N + 1)``, so 1 step is ``[1.5708, 0]`` and 4 steps ``[1.5708, 1.1781, 0.7854, 0.3927, 0]``.
* MeanFlow (FLUX's ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting): ``σ = linspace(1, 1/N, N)``,
  shifted by ``σ' = e^μ / (e^μ + 1/σ − 1)`` with μ interpolated linearly in the image-token count (FLUX-dev:
  256 tokens → 0.5, 4096 → 1.15, so μ = 0.63 at 512 px and 1.15 at 1024 px), then 0 appended. Timesteps are
  ``1000·σ'``.

The pipelines compute their schedules through these functions (and the schedulers they wrap), so the tests of the
exact numbers test what sampling uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "SCM_MAX_TIMESTEP",
    "SCM_INTERMEDIATE_TIMESTEP",
    "calculate_shift",
    "meanflow_sigmas",
    "scm_timesteps",
]

#: The first TrigFlow angle of every sCM schedule (diffusers' default ``max_timesteps``; ≈ π/2).
SCM_MAX_TIMESTEP = 1.57080
#: The intermediate angle of the reference's 2-step sCM schedule (``test_sCM.py`` passes 1.3).
SCM_INTERMEDIATE_TIMESTEP = 1.3

#: FLUX-dev's dynamic-shift constants (the defaults when a scheduler config lacks them).
_FLUX_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def _check_steps(num_inference_steps: object) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps`: expected an int ≥ 1, got {num_inference_steps!r}")
    return num_inference_steps


def scm_timesteps(num_inference_steps: int, intermediate_timestep: float | None = SCM_INTERMEDIATE_TIMESTEP,
                  max_timestep: float = SCM_MAX_TIMESTEP, device: torch.device | str | None = None) -> torch.Tensor:
    """The sCM TrigFlow angles, fp32 tensor of ``num_inference_steps + 1`` values ending in 0.

    ``intermediate_timestep`` is used only for 2 steps (``[max, intermediate, 0]``); ``None`` (or any other step
    count) gives ``linspace(max, 0, N + 1)``. Computed by diffusers' ``SCMScheduler`` itself.
    """
    from diffusers import SCMScheduler

    steps = _check_steps(num_inference_steps)
    if intermediate_timestep is not None and not 0.0 < float(intermediate_timestep) < float(max_timestep):
        raise ValueError(
            f"`intermediate_timestep`: expected an angle in (0, max_timestep={max_timestep}), "
            f"got {intermediate_timestep!r}"
        )
    if not 0.0 < float(max_timestep) <= math.pi / 2 + 1e-4:
        raise ValueError(f"`max_timestep`: expected an angle in (0, π/2], got {max_timestep!r}")
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, device=device, max_timesteps=max_timestep,
                            intermediate_timesteps=intermediate_timestep if steps == 2 else None)
    return scheduler.timesteps


def calculate_shift(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution shift μ: linear in the image-token count through (base, base_shift) and (max, max_shift)."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"`image_seq_len`: expected a positive int (packed image tokens), got {image_seq_len!r}")
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_image_seq_len)


def meanflow_sigmas(num_inference_steps: int, image_seq_len: int, scheduler=None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, timesteps)`` of the MeanFlow sampler: fp32, ``N + 1`` shifted sigmas ending in 0 and ``N``
    timesteps ``1000·σ'``.

    ``scheduler`` is the teacher folder's ``FlowMatchEulerDiscreteScheduler`` (its shift constants are used and its
    state is set, as the pipeline steps it); ``None`` builds one with FLUX-dev's dynamic-shift config.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = _check_steps(num_inference_steps)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    **_FLUX_SHIFT_DEFAULTS)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"`scheduler`: expected a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    config = {key: scheduler.config.get(key, default) for key, default in _FLUX_SHIFT_DEFAULTS.items()}
    mu = calculate_shift(image_seq_len, **config)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    return scheduler.sigmas, scheduler.timesteps
