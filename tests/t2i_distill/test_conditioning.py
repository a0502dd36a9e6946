"""FLUX conditioning: pack/unpack/ids against hand-built examples and diffusers' own helpers, prompt encoding equal to
``FluxPipeline.encode_prompt``, and the VAE latent maps (sample, stored posterior, decode)."""

from __future__ import annotations

import pytest
import torch

from t2i_distill.conditioning import (
    CLIP_MAX_LENGTH,
    TextEncoders,
    decode_latents,
    encode_image_posterior,
    encode_images,
    latent_image_ids,
    latents_from_posterior,
    pack_latents,
    sample_posterior_latents,
    text_ids,
    unpack_latents,
)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import FluxPipeline

    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    return FluxPipeline.from_pretrained(write_tiny_flux_pipeline(tmp_path_factory.mktemp("t") / "flux", seed=1))


def test_pack_matches_a_hand_built_token_layout_and_diffusers():
    b, c, h, w = 2, 3, 4, 6
    x = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    expected = torch.empty(b, (h // 2) * (w // 2), 4 * c)
    for n in range(b):
        for row in range(h // 2):
            for col in range(w // 2):
                for ch in range(c):
                    for dy in range(2):
                        for dx in range(2):  # token (row, col), channel order (c, dy, dx)
                            expected[n, row * (w // 2) + col, ch * 4 + dy * 2 + dx] = x[n, ch, 2 * row + dy,
                                                                                        2 * col + dx]
    tokens = pack_latents(x)
    assert torch.equal(tokens, expected)
    from diffusers import FluxPipeline

    assert torch.equal(tokens, FluxPipeline._pack_latents(x, b, c, h, w))
    assert torch.equal(unpack_latents(tokens, h, w), x)
    # diffusers' unpack takes *pixel* sizes and its VAE factor 8 (the reference: 16 with pixel/16 sizes).
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 8 * h, 8 * w, 8), x)


def test_pack_and_unpack_reject_shapes_they_cannot_serve():
    with pytest.raises(ValueError, match="height and width must be even.*3×4"):
        pack_latents(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match=r"expected a \(B, C, h, w\) tensor, got shape \(16, 4, 4\)"):
        pack_latents(torch.zeros(16, 4, 4))
    with pytest.raises(ValueError, match="do not unpack to a 4×4 latent: expected 4 tokens"):
        unpack_latents(torch.zeros(1, 6, 64), 4, 4)


def test_image_and_text_ids_against_hand_built_grids():
    expected = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]], dtype=torch.float32)
    assert torch.equal(latent_image_ids(4, 6), expected)
    from diffusers import FluxPipeline

    assert torch.equal(latent_image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))
    assert latent_image_ids(4, 6, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(text_ids(5), torch.zeros(5, 3))


@pytest.mark.parametrize("max_sequence_length", [16, 256])
def test_prompt_encoding_equals_flux_pipeline_encode_prompt(pipe, max_sequence_length):
    prompts = ["a photo of two red cats", "Zebra-striped QUANTUM teapot, 3 lamps!", " "]
    encoders = TextEncoders(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    ours = encoders.encode(prompts, max_sequence_length=max_sequence_length)
    embeds, pooled, ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=max_sequence_length)
    assert ours.prompt_embeds.shape == (3, max_sequence_length, 32) and ours.pooled_prompt_embeds.shape == (3, 32)
    assert torch.equal(ours.prompt_embeds, embeds) and torch.equal(ours.pooled_prompt_embeds, pooled)
    assert torch.equal(ours.text_ids, ids) and len(ours) == 3
    one = encoders.encode(prompts[0], max_sequence_length=max_sequence_length)  # a str is a batch of one
    torch.testing.assert_close(one.prompt_embeds, ours.prompt_embeds[:1])


def test_encoders_from_the_folder_and_their_dtype(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = TextEncoders.from_pretrained(str(tmp_path))
    reference = TextEncoders(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
    a, b = loaded.encode(["a blue square"], 8), reference.encode(["a blue square"], 8)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and torch.equal(a.pooled_prompt_embeds, b.pooled_prompt_embeds)
    half = TextEncoders.from_pretrained(str(tmp_path), dtype=torch.bfloat16).encode(["a blue square"], 8)
    assert half.prompt_embeds.dtype == half.pooled_prompt_embeds.dtype == torch.bfloat16  # the reference's dtype
    ids = loaded.tokenizer(["x"], padding="max_length", max_length=CLIP_MAX_LENGTH).input_ids
    assert len(ids[0]) == CLIP_MAX_LENGTH
    with pytest.raises(TypeError, match="non-empty list of str"):
        loaded.encode([])
    with pytest.raises(ValueError, match="`max_sequence_length`: expected a positive int, got 0"):
        loaded.encode(["x"], max_sequence_length=0)


def test_latents_sample_and_stored_posterior_agree_with_the_vae(pipe):
    vae = pipe.vae
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dist = vae.encode(images).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    by_hand = (dist.mean + dist.std * eps - vae.config.shift_factor) * vae.config.scaling_factor
    sampled = encode_images(vae, images, generator=torch.Generator().manual_seed(5))
    assert sampled.shape == (2, 16, 4, 4)
    torch.testing.assert_close(sampled, by_hand, rtol=0, atol=0)
    mean, std = encode_image_posterior(vae, images)
    stored = sample_posterior_latents(mean, std, vae.config.shift_factor, vae.config.scaling_factor,
                                      generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(stored, sampled, rtol=0, atol=0)
    torch.testing.assert_close(encode_images(vae, images, sample=False),
                               (dist.mean - vae.config.shift_factor) * vae.config.scaling_factor)
    z = dist.mean
    torch.testing.assert_close(decode_latents(vae, latents_from_posterior(vae, z)), vae.decode(z).sample)
    with pytest.raises(ValueError, match=r"`images`: expected \(B, 3, H, W\)"):
        encode_images(vae, images[:, :1])
    with pytest.raises(ValueError, match="`std`: expected the shape of `mean`"):
        sample_posterior_latents(mean, std[:1], 0.0, 1.0)
