"""``encode_batch``: a live batch (pixels + captions) → the conditioning the trainers consume (the cached layout)."""

from __future__ import annotations

import torch

from t2i_distill.conditioning import DEFAULT_MAX_SEQUENCE_LENGTH, encode_images, sample_posterior_latents

__all__ = ["encode_batch"]

_CACHED_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


def encode_batch(batch: dict, text_encoders=None, vae=None, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                 generator: torch.Generator | None = None) -> dict:
    """Encode a :class:`~t2i_distill.data.TrainData` batch as the reference does (reference-spec §2.1).

    * Live batch ``{"pixel_values": (B, 3, R, R) in [-1, 1], "captions", "ids"}`` → ``{"latents": (B, 16, R/8, R/8)
      = (posterior sample − shift)·scale (``generator`` draws it; None: the global RNG), "prompt_embeds": (B, T, D)
      T5 at ``max_sequence_length``, "pooled_prompt_embeds": (B, P) CLIP pooled, "captions", "ids"}``, in the
      encoders'/VAE's dtypes, on their devices. Needs ``text_encoders`` (:class:`~t2i_distill.conditioning.
      TextEncoders`) and ``vae``.
    * Cached batch (has ``prompt_embeds``): returned as is (a shallow copy) when ``generator`` is None; with a
      ``generator`` its ``latents`` are redrawn from the stored ``latent_mean``/``latent_std`` with it. The encoders
      are not needed (pass None). Its T5 length must equal ``max_sequence_length``.
    """
    if not isinstance(batch, dict):
        raise TypeError(f"`batch`: expected a dict from TrainData, got {type(batch).__name__}")
    if not isinstance(max_sequence_length, int) or isinstance(max_sequence_length, bool) or max_sequence_length < 1:
        raise ValueError(f"`max_sequence_length`: expected a positive int, got {max_sequence_length!r}")
    if "prompt_embeds" in batch:
        missing = [k for k in _CACHED_KEYS if k not in batch]
        if missing:
            raise ValueError(f"`batch`: a cached batch needs {list(_CACHED_KEYS)}, missing {missing}")
        if batch["prompt_embeds"].shape[1] != max_sequence_length:
            raise ValueError(f"`max_sequence_length`: the cached batch holds {batch['prompt_embeds'].shape[1]} T5 "
                             f"tokens, got {max_sequence_length}")
        out = dict(batch)
        if generator is not None:
            if "latent_mean" not in batch:
                raise ValueError("`generator`: this cached batch stores no posterior (latent_mean/latent_std)")
            out["latents"] = sample_posterior_latents(batch["latent_mean"], batch["latent_std"],
                                                      batch["vae_shift_factor"], batch["vae_scaling_factor"],
                                                      generator=generator)
        return out
    if "pixel_values" not in batch or "captions" not in batch:
        raise ValueError(f"`batch`: expected a live batch (pixel_values, captions) or a cached one (prompt_embeds), "
                         f"got keys {sorted(batch)}")
    if text_encoders is None or vae is None:
        raise ValueError("`text_encoders` and `vae` are required to encode a live batch (got None)")
    text = text_encoders.encode(list(batch["captions"]), max_sequence_length=max_sequence_length)
    latents = encode_images(vae, batch["pixel_values"], generator=generator)
    return {"latents": latents, "prompt_embeds": text.prompt_embeds, "pooled_prompt_embeds": text.pooled_prompt_embeds,
            "captions": list(batch["captions"]), "ids": list(batch.get("ids", []))}
