"""Validation images during training: the current student (or its EMA) at 1, 2 and 4 steps on ``--validation_prompts``,
as one labelled grid per step count, logged to the trackers and saved under ``<output_dir>/validation/``.

Runs on the main rank only, with the method's few-step pipeline (:mod:`t2i_distill.pipelines`) around the live student
(no copy of its weights; the EMA, when kept, is swapped in for the duration and swapped back). A live-data run reuses
the trainer's text encoders and VAE; a cached run (which loads none for training) loads them here, once, on the main
rank. Seeds are fixed per prompt, so grids of successive validations differ only by what the student learned.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

__all__ = ["Validator"]


class Validator:
    """``run(student, ema, step)`` → ``{tag: grid}``; builds the pipeline once around the live student."""

    def __init__(self, args, text_encoders, vae, device: torch.device):
        from diffusers import AutoencoderKL

        from t2i_distill.conditioning import TextEncoders

        self.args, self.device = args, device
        self.prompts = list(args.validation_prompts)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if text_encoders is None:
            text_encoders = TextEncoders.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype,
                                                         device=device, revision=args.revision, variant=args.variant)
        if vae is None:
            vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                                dtype=dtype, revision=args.revision).to(device)
        self.text_encoders, self.vae, self.pipe = text_encoders, vae, None
        self.guidance = args.validation_guidance_scale
        if self.guidance is None:
            self.guidance = (args.scm_cfg_scale if args.method == "scm" else args.cfg_scale)[0]
        self.out_dir = Path(args.output_dir) / "validation"

    def _pipeline(self, student):
        if self.pipe is None:
            from diffusers import FlowMatchEulerDiscreteScheduler, SCMScheduler

            from t2i_distill.pipelines.meanflow import FluxMeanFlowPipeline
            from t2i_distill.pipelines.scm import FluxSCMPipeline

            te = self.text_encoders
            if self.args.method == "scm":
                cls = FluxSCMPipeline
                scheduler = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow",
                                         sigma_data=self.args.sigma_data)
            else:
                cls = FluxMeanFlowPipeline
                scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
                    self.args.pretrained_model_name_or_path, subfolder="scheduler", revision=self.args.revision)
            self.pipe = cls(scheduler=scheduler, vae=self.vae, text_encoder=te.text_encoder, tokenizer=te.tokenizer,
                            text_encoder_2=te.text_encoder_2, tokenizer_2=te.tokenizer_2, transformer=student)
            self.pipe.set_progress_bar_config(disable=True)
        return self.pipe

    @contextlib.contextmanager
    def _weights(self, student, ema):
        """The EMA weights in the student for the duration (when kept), eval mode; restored afterwards."""
        was_training = student.training
        student.eval()
        try:
            with ema.average_parameters(student) if ema is not None else contextlib.nullcontext():
                yield
        finally:
            student.train(was_training)

    @torch.no_grad()
    def run(self, student, ema, step: int) -> dict:
        from t2i_distill.eval.grid import labelled_grid

        pipe = self._pipeline(student)
        grids = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self._weights(student, ema):
            for steps in self.args.validation_inference_steps:
                rows = []
                for k in range(self.args.num_validation_images):
                    images = []
                    for index, prompt in enumerate(self.prompts):
                        generator = torch.Generator(device="cpu").manual_seed(1000 * k + index)
                        images += pipe(prompt, num_inference_steps=steps, guidance_scale=self.guidance,
                                       height=self.args.resolution, width=self.args.resolution, generator=generator,
                                       max_sequence_length=self.args.max_sequence_length).images
                    rows.append(images)
                grid = labelled_grid(rows, column_labels=self.prompts, row_labels=[f"#{k}" for k in range(len(rows))])
                grid.save(self.out_dir / f"step{step:07d}_nfe{steps}.png")
                grids[f"validation/nfe{steps}"] = grid
        return grids
