"""Tiny sCM / MeanFlow models, batches and fixed draws shared by the loss tests."""

from __future__ import annotations

import copy

import torch

from t2i_distill.losses import MeanFlowDraws, SCMDraws
from t2i_distill.models import FluxStudent, TrigFlowStudent
from t2i_distill.tiny import TINY_FLUX_CONFIG
from tests.t2i_distill.flux_helpers import build as build_tiny

#: Latents (B, 4, 4, 4) pack to 4 tokens of 16 channels (TINY_FLUX_CONFIG's in_channels); 3 text tokens.
LATENT_C, LATENT_H, LATENT_W, TEXT_TOKENS = 4, 4, 4, 3


def build(cls, seed: int, **overrides) -> torch.nn.Module:
    """A seeded tiny model with every parameter perturbed, so no term of the losses is trivially zero (the patching
    tests' builder, in train mode as a trainer holds its student; FLUX has no dropout or batch statistics)."""
    return build_tiny(cls, seed, **overrides).train()


def scm_models():
    return build(TrigFlowStudent, 0), build(TrigFlowStudent, 1).requires_grad_(False)


def meanflow_models():
    student = build(FluxStudent, 0, dual_timestep=True)
    with torch.no_grad():  # MeanFlow initialises embedder 2 from embedder 1; perturb so both time inputs matter
        for p2, p1 in zip(student.timestep_embedder2.parameters(),
                          student.time_text_embed.timestep_embedder.parameters()):
            p2.copy_(p1 + 0.05 * torch.randn_like(p1))
    return student, build(FluxStudent, 1).requires_grad_(False)


def make_batch(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dim = TINY_FLUX_CONFIG["joint_attention_dim"]
    return {"latents": torch.randn(batch, LATENT_C, LATENT_H, LATENT_W, generator=gen),
            "prompt_embeds": torch.randn(batch, TEXT_TOKENS, dim, generator=gen),
            "pooled_prompt_embeds": torch.randn(batch, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=gen)}


def null_condition(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, TEXT_TOKENS, TINY_FLUX_CONFIG["joint_attention_dim"], generator=gen),
            torch.randn(1, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=gen))


def scm_draws(batch: int, seed: int = 1) -> SCMDraws:
    """Moderate angles (n in [-0.8, 0.8]) so 1/tan t stays O(1)."""
    gen = torch.Generator().manual_seed(seed)
    return SCMDraws(noise=torch.randn(batch, LATENT_C, LATENT_H, LATENT_W, generator=gen),
                    guidance=torch.tensor([4.0, 5.0, 4.5, 4.0][:batch], dtype=torch.float64),
                    time_normal=torch.linspace(-0.8, 0.8, batch))


def meanflow_draws(t, r, equal, dropped, seed: int = 2) -> MeanFlowDraws:
    gen = torch.Generator().manual_seed(seed)
    b = len(t)
    return MeanFlowDraws(noise=torch.randn(b, LATENT_C, LATENT_H, LATENT_W, generator=gen),
                         guidance=torch.tensor([4.0, 4.5, 5.0, 4.0][:b], dtype=torch.float64),
                         r=torch.tensor(r), t=torch.tensor(t), equal_mask=torch.tensor(equal),
                         dropout_mask=torch.tensor(dropped))


def to_float64(model, batch, draws, null=None):
    """Copies of model, batch, draws (and null condition) in float64: the truth of the parity rule."""
    twin = copy.deepcopy(model).double()
    batch64 = {k: v.double() for k, v in batch.items()}
    draws64 = copy.deepcopy(draws)
    for name in ("noise", "r", "t", "time_normal"):
        value = getattr(draws64, name, None)
        if value is not None:
            setattr(draws64, name, value.double())
    null64 = None if null is None else tuple(x.double() for x in null)
    return twin, batch64, draws64, null64


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
