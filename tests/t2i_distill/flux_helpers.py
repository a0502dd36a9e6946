"""Tiny FLUX configurations and reference runs shared by the patching and dual-forward tests."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill.models.flux import FluxStudent
from t2i_distill.tiny import TINY_FLUX_CONFIG, TinyFluxShape, tiny_flux_inputs

#: (name, config overrides): head dims 32 and 64, 1+1 and 2+2 blocks, guidance embeddings on (all of them).
TINY_CONFIGS = [
    ("hd32-1+1", {}),
    ("hd64-2+2", {"attention_head_dim": 64, "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2,
                  "axes_dims_rope": (16, 24, 24)}),
]
SHAPE = TinyFluxShape(batch=2, text_tokens=7, latent_h=4, latent_w=5)  # ragged: 27 joint tokens


def build(cls=FluxStudent, seed: int = 0, **overrides) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**{**TINY_FLUX_CONFIG, **overrides})
        # diffusers zero-initialises nothing here, but perturb every parameter so no term is trivially zero.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def split_inputs(model, seed: int = 0):
    """(x, t, rest): latents and timestep (the differentiated inputs) and the other forward kwargs."""
    inputs = tiny_flux_inputs(model, SHAPE, seed=seed)
    return inputs.pop("hidden_states"), inputs.pop("timestep"), inputs


def as_dtype(model, rest: dict, dtype: torch.dtype):
    """The model and its non-id inputs in ``dtype`` (a copy of the model)."""
    import copy

    twin = copy.deepcopy(model).to(dtype)
    moved = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("_ids") else v) for k, v in rest.items()}
    return twin, moved


def call(model, x, t, rest, **extra):
    return model(hidden_states=x, timestep=t, **rest, **extra, return_dict=False)[0]


def reference_jvp(model, x, t, tx, tt, rest):
    """What the reference does: torch.func.jvp over the unpatched model with math attention, no grad."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda x, t: call(model, x, t, rest), (x, t), (tx, tt))
