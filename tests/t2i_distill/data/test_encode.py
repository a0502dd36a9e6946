"""encode_batch: live batches through the real tiny encoders; cached batches pass through or redraw their latents."""

from __future__ import annotations

import pytest
import torch

from t2i_distill.conditioning import encode_images, sample_posterior_latents
from t2i_distill.data import encode_batch


def _live(n: int = 3) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1,
            "captions": ["a red cat", "two blue squares", "Zebra!"][:n], "ids": [f"i{k}" for k in range(n)]}


def test_live_batch_is_encoded_as_the_reference(tiny_models):
    te, vae = tiny_models
    batch = _live()
    out = encode_batch(batch, te, vae, max_sequence_length=20, generator=torch.Generator().manual_seed(4))
    text = te.encode(batch["captions"], max_sequence_length=20)
    assert torch.equal(out["prompt_embeds"], text.prompt_embeds) and out["prompt_embeds"].shape == (3, 20, 32)
    assert torch.equal(out["pooled_prompt_embeds"], text.pooled_prompt_embeds)
    expected = encode_images(vae, batch["pixel_values"], generator=torch.Generator().manual_seed(4))
    assert torch.equal(out["latents"], expected) and out["latents"].shape == (3, 16, 2, 2)
    assert out["captions"] == batch["captions"] and out["ids"] == batch["ids"]


def test_cached_batch_passes_through_or_redraws_from_its_posterior():
    mean, std = torch.randn(2, 16, 2, 2), torch.rand(2, 16, 2, 2)
    cached = {"latents": torch.zeros(2, 16, 2, 2), "latent_mean": mean, "latent_std": std,
              "prompt_embeds": torch.randn(2, 8, 32), "pooled_prompt_embeds": torch.randn(2, 32),
              "vae_shift_factor": 0.1, "vae_scaling_factor": 0.5, "captions": ["a", "b"], "ids": ["0", "1"]}
    same = encode_batch(cached, max_sequence_length=8)
    assert same is not cached and all(same[k] is cached[k] for k in cached)
    redrawn = encode_batch(cached, max_sequence_length=8, generator=torch.Generator().manual_seed(1))
    expected = sample_posterior_latents(mean, std, 0.1, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(redrawn["latents"], expected)
    torch.testing.assert_close(expected, (mean + std * torch.randn(2, 16, 2, 2, generator=torch.Generator(
    ).manual_seed(1)) - 0.1) * 0.5)
    with pytest.raises(ValueError, match="holds 8 T5 tokens, got 256"):
        encode_batch(cached)


def test_bad_batches_and_missing_encoders_are_named():
    with pytest.raises(TypeError, match="`batch`: expected a dict"):
        encode_batch([1, 2])
    with pytest.raises(ValueError, match="`text_encoders` and `vae` are required"):
        encode_batch(_live())
    with pytest.raises(ValueError, match=r"got keys \['ids'\]"):
        encode_batch({"ids": []})
    with pytest.raises(ValueError, match=r"missing \['latents', 'pooled_prompt_embeds'\]"):
        encode_batch({"prompt_embeds": torch.zeros(1, 256, 4)})
    with pytest.raises(ValueError, match="`max_sequence_length`: expected a positive int"):
        encode_batch(_live(), max_sequence_length=0)
