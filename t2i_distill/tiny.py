"""An embedded tiny FLUX configuration: real diffusers ``FluxTransformer2DModel`` code, random weights, no downloads.

Used by the demo/report and by tests. The shapes keep FLUX's structure (double + single blocks, guidance embedding,
3-axis RoPE whose axes sum to the head dim, text tokens before image tokens) at a size the CPU runs in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Constructor arguments of the tiny model (FLUX.1-lite-8B: 3072 = 24 × 128, 8 + 38 blocks, axes (16, 56, 56)).
TINY_FLUX_CONFIG: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (8, 12, 12),
}


@dataclass(frozen=True)
class TinyFluxShape:
    """Batch and token counts of the tiny inputs: ``latent_h × latent_w`` image tokens after packing."""

    batch: int = 2
    text_tokens: int = 16
    latent_h: int = 8
    latent_w: int = 8

    @property
    def image_tokens(self) -> int:
        return self.latent_h * self.latent_w

    @property
    def joint_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


def build_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    **overrides: object):
    """A seeded tiny ``FluxTransformer2DModel`` in eval mode (``overrides`` change config entries)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides})
    model = model.to(device=device)
    if dtype != torch.float32:  # diffusers warns on every `.to(dtype)`, also a no-op one
        model = model.to(dtype=dtype)
    return model.eval()


def image_ids(latent_h: int, latent_w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """FLUX image position ids (0, row, col) for a ``latent_h × latent_w`` token grid, as (H·W, 3)."""
    ids = torch.zeros(latent_h, latent_w, 3, device=device)
    ids[..., 1] = torch.arange(latent_h, device=device)[:, None]
    ids[..., 2] = torch.arange(latent_w, device=device)[None, :]
    return ids.reshape(-1, 3)


def tiny_flux_inputs(model, shape: TinyFluxShape = TinyFluxShape(), seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs of ``model.forward`` (minus ``return_dict``): random latents, text states and times."""
    config = model.config
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=param.device, dtype=param.dtype)

    return {
        "hidden_states": randn(shape.batch, shape.image_tokens, config.in_channels),
        "encoder_hidden_states": randn(shape.batch, shape.text_tokens, config.joint_attention_dim),
        "pooled_projections": randn(shape.batch, config.pooled_projection_dim),
        "timestep": torch.rand(shape.batch, generator=gen).to(device=param.device, dtype=param.dtype),
        "img_ids": image_ids(shape.latent_h, shape.latent_w, param.device),
        "txt_ids": torch.zeros(shape.text_tokens, 3, device=param.device),
        "guidance": torch.full((shape.batch,), 3.5, device=param.device, dtype=param.dtype),
    }
