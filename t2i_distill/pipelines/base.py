"""What the few-step FLUX pipelines share: a ``FluxPipeline`` subclass that encodes, draws noise, decodes.

Both students sample with one transformer call per step and guidance only through FLUX's guidance embedding (no
negative prompt, no second pass), so everything but the denoising loop is FLUX's own: ``encode_prompt`` (CLIP pooled
+ T5 at ``max_sequence_length`` tokens, no mask), ``prepare_latents`` (seeded noise, packed into 2×2 patches) and the
VAE decode + post-processing. A subclass implements :meth:`FewStepFluxPipeline._denoise`.

Dtypes: the working dtype is the transformer's. Prompt embeddings and noise are cast to it, and each step's result is
cast back to it, so a bf16 (or fp16) pipeline runs without an outer ``torch.autocast`` (the reference's sCM pipeline
needs one: its latents turn fp32 after the first step, reference-spec §5 B10).
"""

from __future__ import annotations

import numbers

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

__all__ = ["FewStepFluxPipeline", "OUTPUT_TYPES"]

#: ``output_type`` values: PIL images, a float numpy array (N, H, W, 3) in [0, 1], a tensor (N, 3, H, W) in [0, 1],
#: or the packed final latents (N, image tokens, 64).
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FewStepFluxPipeline(FluxPipeline):
    """Base of :class:`~t2i_distill.pipelines.FluxSCMPipeline` and :class:`~t2i_distill.pipelines.FluxMeanFlowPipeline`.

    Constructed like ``FluxPipeline`` (``from_pretrained(teacher_folder, transformer=student, ...)``).
    """

    #: Steps when the caller gives none (subclasses override).
    default_num_inference_steps = 2

    def _denoise(self, latents: torch.Tensor, num_inference_steps: int, cond: dict, generator, **options):
        """Run the sampler from packed noise (B, image tokens, 64) and return the final packed latents."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 256,
        **sampler_options,
    ) -> FluxPipelineOutput | tuple:
        """Generate images: ``num_images_per_prompt`` per prompt, in prompt order.

        Args:
            prompt: one prompt or a list (or give ``prompt_embeds`` + ``pooled_prompt_embeds``).
            num_inference_steps: sampler steps (transformer calls); ``None``: the class default.
            guidance_scale: the value fed to FLUX's guidance embedding (raw for ×1 students; the reference samples
                at 3.5 although it distils at {4, 4.5, 5}, reference-spec §5 B11).
            generator: seeds the initial noise and every step's fresh noise (one generator, or one per image).
            height, width: pixels, multiples of 2·``vae_scale_factor`` (16 for FLUX); default 1024.
            num_images_per_prompt: images per prompt (the reference's GenEval runs use 4).
            output_type: one of :data:`OUTPUT_TYPES`.
            latents: optional packed initial noise (B·n, image tokens, 64) instead of drawing it.
            max_sequence_length: T5 tokens (the reference trains and samples with 256).
            sampler_options: the subclass's options (e.g. ``intermediate_timestep``, ``quantize_timesteps``).

        Returns:
            ``FluxPipelineOutput(images=...)`` or ``(images,)`` when ``return_dict`` is False.
        """
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        self._check_call(prompt, steps, guidance_scale, height, width, num_images_per_prompt, output_type,
                         max_sequence_length)
        device = self._execution_device
        dtype = self.transformer.dtype
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
        )
        batch = prompt_embeds.shape[0]
        noise, image_ids = self.prepare_latents(batch, self.transformer.config.in_channels // 4, height, width,
                                                dtype, device, generator, latents)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
        cond = {
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "pooled_projections": pooled_prompt_embeds.to(dtype),
            "txt_ids": text_ids,
            "img_ids": image_ids,
            "guidance": guidance,
        }
        final = self._denoise(noise, steps, cond, generator, **sampler_options)
        if output_type == "latent":
            images = final
        else:
            unpacked = self._unpack_latents(final, height, width, self.vae_scale_factor)
            unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if return_dict else (images,)

    def _check_call(self, prompt, steps, guidance_scale, height, width, num_images_per_prompt, output_type,
                    max_sequence_length) -> None:
        if prompt is not None and not isinstance(prompt, str) and not (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        ):
            raise TypeError(f"`prompt`: expected a str or a non-empty list of str, got {prompt!r:.200}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`num_inference_steps`: expected an int ≥ 1, got {steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(f"`guidance_scale`: expected a real number, got {guidance_scale!r}")
        multiple = self.vae_scale_factor * 2
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, int) or size < multiple or size % multiple:
                raise ValueError(f"`{name}`: expected a positive multiple of {multiple} pixels, got {size!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt`: expected an int ≥ 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type`: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"`max_sequence_length`: expected an int in [1, 512], got {max_sequence_length!r}")
