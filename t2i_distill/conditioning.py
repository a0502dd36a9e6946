"""FLUX conditioning, as the reference computes it (reference-spec §2.1): one module for trainers, cache and pipelines.

* **Text**: CLIP-L ``pooler_output`` from 77 padded tokens → ``pooled`` (B, 768); T5-XXL last hidden state at
  ``max_sequence_length`` tokens (default 256, padded to that length, **no attention mask**) → ``prompt_embeds``
  (B, T, 4096); ``text_ids`` = zeros (T, 3). Encoders run under ``no_grad`` in their own dtype (bf16 on GPUs).
  This is exactly diffusers' ``FluxPipeline.encode_prompt`` (tested against it), so cached, live and pipeline
  embeddings agree.
* **Latents**: ``z = vae.encode(img).latent_dist.sample(generator)`` (a random posterior sample), then
  ``x0 = (z − shift_factor)·scaling_factor``, shape (B, 16, R/8, R/8). sCM multiplies by σ_d inside its loss;
  MeanFlow uses x0 as is. The embedding cache stores the posterior instead (:func:`encode_image_posterior`: mean
  and std) and draws a fresh sample per step with :func:`sample_posterior_latents`, which draws ε exactly as
  diffusers does, so the same generator state gives the same latents live or cached.
* **Packing**: (B, C, h, w) → view (B, C, h/2, 2, w/2, 2) → permute (0, 2, 4, 1, 3, 5) → (B, h/2·w/2, 4C): channel
  order within a token is (c, dy, dx). :func:`unpack_latents` is the inverse. Image ids are the (h/2, w/2) grid of
  (0, row, col) flattened to (h/2·w/2, 3); text tokens come first in the joint sequence.

Here ``h, w`` are always the *unpacked latent* height and width (R/8 for FLUX's VAE), never pixels, so there is no
``vae_scale_factor`` convention to get wrong (the reference's unpack uses 16 = 2**len(blocks), diffusers' uses 8·2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CLIP_MAX_LENGTH",
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "TextConditioning",
    "TextEncoders",
    "decode_latents",
    "encode_image_posterior",
    "encode_images",
    "latent_image_ids",
    "latents_from_posterior",
    "pack_latents",
    "sample_posterior_latents",
    "text_ids",
    "unpack_latents",
]

#: CLIP's context length (FLUX pads the CLIP prompt to it).
CLIP_MAX_LENGTH = 77
#: T5 tokens the reference trains and samples with (``--max_sequence_length``).
DEFAULT_MAX_SEQUENCE_LENGTH = 256


# -- packing ----------------------------------------------------------------------------------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents → (B, h/2·w/2, 4C) FLUX tokens (2×2 patches, channel order (c, dy, dx))."""
    if latents.ndim != 4:
        raise ValueError(f"`latents`: expected a (B, C, h, w) tensor, got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"`latents`: height and width must be even to pack 2×2 patches, got {h}×{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) FLUX tokens → (B, C, h, w) latents; ``latent_h``/``latent_w`` are the unpacked sizes."""
    if tokens.ndim != 3:
        raise ValueError(f"`tokens`: expected a (B, tokens, channels) tensor, got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    if latent_h % 2 or latent_w % 2 or n != (latent_h // 2) * (latent_w // 2) or d % 4:
        raise ValueError(
            f"`tokens` of shape {tuple(tokens.shape)} do not unpack to a {latent_h}×{latent_w} latent: expected "
            f"{(latent_h // 2) * (latent_w // 2)} tokens of a multiple of 4 channels and an even latent size"
        )
    x = tokens.reshape(b, latent_h // 2, latent_w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, latent_h, latent_w)


def latent_image_ids(latent_h: int, latent_w: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image position ids (0, row, col) of the packed token grid of a ``latent_h × latent_w`` latent: (h/2·w/2, 3)."""
    rows, cols = latent_h // 2, latent_w // 2
    # Built by stacking, not by item assignment: `t2i-distill plan` runs this on fake CUDA tensors, where indexed
    # assignment needs a CUDA device guard that a CPU-only torch does not have.
    row = torch.arange(rows, device=device, dtype=dtype)[:, None].expand(rows, cols)
    col = torch.arange(cols, device=device, dtype=dtype)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros_like(row), row, col], dim=-1).reshape(rows * cols, 3)


def text_ids(num_tokens: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX text position ids: zeros (T, 3) (RoPE is the identity on text tokens)."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


# -- text -------------------------------------------------------------------------------------------------------
@dataclass
class TextConditioning:
    """Encoded prompts: T5 ``prompt_embeds`` (B, T, joint dim) and CLIP ``pooled_prompt_embeds`` (B, pooled dim)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    @property
    def text_ids(self) -> torch.Tensor:
        return text_ids(self.prompt_embeds.shape[1], self.prompt_embeds.device)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


class TextEncoders:
    """CLIP (pooled) + T5 (sequence) prompt encoding of FLUX; ``encode(prompts)`` → :class:`TextConditioning`.

    Built from the components of a FLUX folder (``from_pretrained``) or from objects (e.g. a pipeline's).
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        for encoder in (text_encoder, text_encoder_2):
            encoder.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                        revision: str | None = None, variant: str | None = None) -> "TextEncoders":
        """Load the four text components from a diffusers FLUX folder or hub id (subfolders ``tokenizer``,
        ``text_encoder``, ``tokenizer_2``, ``text_encoder_2``)."""
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        kw = {"revision": revision}
        model_kw = {**kw, "variant": variant, **({"dtype": dtype} if dtype is not None else {})}
        return cls(
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **model_kw).to(device),
            T5Tokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
            T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **model_kw).to(device),
        )

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder_2.parameters()).device

    def to(self, device: torch.device | str) -> "TextEncoders":
        self.text_encoder.to(device)
        self.text_encoder_2.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: str | list[str],
               max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> TextConditioning:
        """Encode prompts as FLUX does: pooled CLIP (77 tokens) and T5 at ``max_sequence_length`` tokens, no mask."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompts`: expected a non-empty list of str, got {prompts!r:.200}")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length`: expected a positive int, got {max_sequence_length!r}")
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                  return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return TextConditioning(embeds.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype))


# -- images -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, R, R) → FLUX latents ``(z − shift)·scale`` (B, C, R/8, R/8) in the VAE's dtype.

    ``sample=True`` draws the posterior sample as the reference (``generator`` makes it reproducible); False takes the
    posterior mean.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images`: expected (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    param = next(vae.parameters())
    dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return latents_from_posterior(vae, z)


@torch.no_grad()
def encode_image_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (B, 3, R, R) → the VAE posterior's ``(mean, std)``, each (B, C, R/8, R/8) in the VAE's
    dtype, *unscaled* (z space). What the cache stores: :func:`sample_posterior_latents` turns it into latents."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images`: expected (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    param = next(vae.parameters())
    dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
    return dist.mean, dist.std


def sample_posterior_latents(mean: torch.Tensor, std: torch.Tensor, shift_factor: float, scaling_factor: float,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """FLUX latents from a stored posterior: ``((mean + std·ε) − shift)·scale``, ε ~ N(0, 1) in ``mean``'s dtype.

    ε is drawn exactly as diffusers' ``DiagonalGaussianDistribution.sample(generator)`` draws it (on the generator's
    device, then moved), so a stored (mean, std) and the same generator state reproduce :func:`encode_images` of the
    same images (B, C, h, w); ``generator=None`` uses the global RNG of ``mean``'s device.
    """
    if mean.shape != std.shape:
        raise ValueError(f"`std`: expected the shape of `mean` {tuple(mean.shape)}, got {tuple(std.shape)}")
    rand_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=rand_device, dtype=mean.dtype).to(mean.device)
    z = mean + std.to(mean.dtype) * eps
    return (z - (shift_factor or 0.0)) * scaling_factor


def latents_from_posterior(vae, z: torch.Tensor) -> torch.Tensor:
    """``(z − shift_factor)·scaling_factor`` with the VAE config's constants (shift 0 when the config has none)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """FLUX latents (B, C, h, w) → images in [-1, 1] (B, 3, 8h, 8w): ``vae.decode(x/scale + shift)``."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z).sample
