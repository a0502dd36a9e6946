"""A quick quality figure for coloured-shape samples: dominant colour, plus shape and count by the mini-GenEval
detector (:func:`t2i_distill.eval.scorer.detect_shapes`).

* *colour*: foreground = pixels farther than ``threshold`` (RGB Euclidean, 0–255) from the background; each takes the
  nearest palette colour; the image's dominant colour (most pixels) must be the prompt's.
* *shape*: at least one detection of the prompt's shape in the prompt's colour.
* *count*: exactly ``count`` such detections (GenEval's counting rule: at least n, fewer than n + 1).

The demo teacher records these in ``demo_teacher.json``; the mini-GenEval run is the evaluation of record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShapeScore", "dominant_colour", "score_samples"]


def dominant_colour(image: np.ndarray, palette: dict[str, tuple[int, int, int]],
                    background: tuple[int, int, int] = (255, 255, 255), threshold: float = 80.0) -> str | None:
    """The palette colour covering most foreground pixels of ``image`` (H, W, 3) uint8, or None with no foreground."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"`image`: expected an (H, W, 3) numpy array of RGB values in 0..255, got shape {shape}")
    names = list(palette)
    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - np.asarray(background, np.float32), axis=-1) > threshold
    colours = np.asarray([palette[n] for n in names], np.float32)  # (K, 3)
    nearest = np.linalg.norm(pixels[foreground][:, None, :] - colours[None], axis=-1).argmin(-1)
    counts = np.bincount(nearest, minlength=len(names))
    return names[int(counts.argmax())] if counts.sum() else None


@dataclass
class ShapeScore:
    """Fractions of samples whose dominant colour, shape (≥ 1 found) and exact count match the prompt."""

    colour_accuracy: float
    shape_accuracy: float
    count_accuracy: float
    num_samples: int


def score_samples(images: np.ndarray, scenes: list) -> ShapeScore:
    """Score images (N, H, W, 3) uint8 against their :class:`t2i_distill.eval.shapes.ShapeScene` prompts."""
    from t2i_distill.eval.scorer import detect_shapes
    from t2i_distill.eval.shapes import BACKGROUND, PALETTE

    if len(images) != len(scenes) or not len(scenes):
        raise ValueError(f"`images` and `scenes`: expected the same non-zero length, got {len(images)} and "
                         f"{len(scenes)}")
    colour = shape = count = 0
    for image, scene in zip(images, scenes):
        colour += dominant_colour(image, PALETTE, BACKGROUND) == scene.color
        found = sum(d.shape == scene.shape and d.color == scene.color for d in detect_shapes(image))
        shape += found >= 1
        count += found == scene.count
    n = len(scenes)
    return ShapeScore(colour / n, shape / n, count / n, n)
