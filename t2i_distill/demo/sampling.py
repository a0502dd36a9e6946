"""Sampling the demo teacher through diffusers' ``FluxPipeline``: a grid PNG and the colour/count quality figure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["sample_grid", "sample_images"]


@torch.no_grad()
def sample_images(pipe, prompts: list[str], *, resolution: int, steps: int, guidance: float, max_sequence_length: int,
                  seed: int, batch_size: int = 36) -> np.ndarray:
    """Teacher samples (N, R, R, 3) uint8 for ``prompts``, ``steps`` Euler steps of the pipeline's scheduler."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        images = pipe(prompts[start:start + batch_size], height=resolution, width=resolution,
                      num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_sequence_length,
                      generator=generator, output_type="np").images
        chunks.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(chunks)


def save_grid(images: np.ndarray, path: str | os.PathLike, columns: int, upscale: int = 2) -> None:
    """Tile images (N, R, R, 3) uint8 into rows of ``columns`` (1 px grey gaps), nearest-upscaled, as a PNG."""
    from PIL import Image

    n, r = images.shape[0], images.shape[1]
    rows = -(-n // columns)
    grid = np.full((rows * (r + 1) + 1, columns * (r + 1) + 1, 3), 128, np.uint8)
    for i, image in enumerate(images):
        y, x = divmod(i, columns)
        grid[1 + y * (r + 1):1 + y * (r + 1) + r, 1 + x * (r + 1):1 + x * (r + 1) + r] = image
    Image.fromarray(grid).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST).save(path)


def sample_grid(pipe, config, seed: int, png_path: str | os.PathLike) -> dict[str, object]:
    """Sample ``config.quality_samples`` prompts cycling through every label, save a grid, return the quality dict.

    Sample ``k`` asks for scene ``k mod 48``; the grid has 16 columns: (colour, count) within a shape's row.
    """
    from t2i_distill.demo.quality import score_samples
    from t2i_distill.eval.shapes import scene_for_index

    scenes = [scene_for_index(k) for k in range(config.quality_samples)]
    images = sample_images(pipe, [scene.caption for scene in scenes], resolution=config.resolution,
                           steps=config.quality_steps, guidance=config.quality_guidance,
                           max_sequence_length=config.max_sequence_length, seed=seed + 2)
    save_grid(images, Path(png_path), columns=16)
    score = score_samples(images, scenes)
    return {"colour_accuracy": score.colour_accuracy, "shape_accuracy": score.shape_accuracy,
            "count_accuracy": score.count_accuracy, "num_samples": score.num_samples, "steps": config.quality_steps,
            "guidance": config.quality_guidance}
