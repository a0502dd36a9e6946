"""A quick, classical quality check of coloured-shape samples: dominant colour and object count per image.

Foreground = pixels farther than ``threshold`` (RGB Euclidean, 0–255 scale) from the background; each foreground pixel
takes the nearest palette colour. The *dominant colour* is the palette colour with most pixels; the *count* is the
number of 4-connected components of that colour's mask with at least ``min_area`` pixels. This is the demo teacher's
own sanity figure; the project's mini-GenEval scorer (``t2i_distill.eval``) is the evaluation of record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShapeScore", "count_components", "dominant_colour", "score_samples"]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"`image`: expected an (H, W, 3) numpy array of RGB values in 0..255, got shape {shape}")


def _nearest_palette(image: np.ndarray, palette: dict[str, tuple[int, int, int]],
                     background: tuple[int, int, int], threshold: float) -> tuple[np.ndarray, list[str]]:
    """(H, W) int map: -1 background, else the index of the nearest palette colour in ``names``."""
    _check_image(image)
    names = list(palette)
    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - np.asarray(background, np.float32), axis=-1) > threshold
    colours = np.asarray([palette[n] for n in names], np.float32)  # (K, 3)
    nearest = np.linalg.norm(pixels[:, :, None, :] - colours[None, None], axis=-1).argmin(-1)
    return np.where(foreground, nearest, -1), names


def dominant_colour(image: np.ndarray, palette: dict[str, tuple[int, int, int]],
                    background: tuple[int, int, int] = (255, 255, 255), threshold: float = 80.0) -> str | None:
    """The palette colour covering most foreground pixels of ``image`` (H, W, 3), or None with no foreground."""
    labels, names = _nearest_palette(image, palette, background, threshold)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(names))
    return names[int(counts.argmax())] if counts.sum() else None


def count_components(mask: np.ndarray, min_area: int = 4) -> int:
    """Number of 4-connected components of a boolean (H, W) mask with at least ``min_area`` pixels."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"`mask`: expected a 2-D boolean numpy array, got {getattr(mask, 'shape', type(mask))}")
    seen = np.zeros(mask.shape, dtype=bool)
    height, width = mask.shape
    found = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, area = True, [start], 0
        while stack:
            y, x = stack.pop()
            area += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found += area >= min_area
    return found


@dataclass
class ShapeScore:
    """Fractions of samples whose dominant colour matches the prompt, and whose count of it matches too."""

    colour_accuracy: float
    count_accuracy: float
    num_samples: int


def score_samples(images: np.ndarray, labels: list[tuple[int, str, str]], palette: dict[str, tuple[int, int, int]],
                  background: tuple[int, int, int] = (255, 255, 255), threshold: float = 80.0,
                  min_area: int = 4) -> ShapeScore:
    """Score images (N, H, W, 3) uint8 against their (count, colour, shape) labels."""
    if len(images) != len(labels) or not len(labels):
        raise ValueError(f"`images` and `labels`: expected the same non-zero length, got {len(images)} and "
                         f"{len(labels)}")
    colour_hits = count_hits = 0
    for image, (count, colour, _shape) in zip(images, labels):
        colour_map, names = _nearest_palette(image, palette, background, threshold)
        counts = np.bincount(colour_map[colour_map >= 0].ravel(), minlength=len(names))
        dominant = names[int(counts.argmax())] if counts.sum() else None
        colour_hits += dominant == colour
        if dominant == colour:
            count_hits += count_components(colour_map == names.index(colour), min_area) == count
    n = len(labels)
    return ShapeScore(colour_hits / n, count_hits / n, n)
