"""Shared by the pipeline tests: record what the transformer is called with, and the prompt conditioning by hand."""

from __future__ import annotations

import contextlib

import torch

PROMPT = "two red circles"
TOKENS = 16  # T5 tokens: small, so the tiny model runs in milliseconds


@contextlib.contextmanager
def recorded_calls(transformer):
    """Yield a list that fills with the keyword arguments of every transformer call (tensors detached, cloned)."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def conditioning(pipe, prompt: str = PROMPT, guidance: float = 3.5) -> dict:
    """The transformer's conditioning kwargs for one image, computed through FluxPipeline.encode_prompt directly."""
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=TOKENS)
    from t2i_distill.conditioning import latent_image_ids

    return {
        "encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
        "img_ids": latent_image_ids(8, 8), "guidance": torch.full((1,), guidance),
    }
