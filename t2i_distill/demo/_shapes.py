"""Private stand-in for ``t2i_distill.eval.shapes`` (another branch), with its API and distribution; deleted when
that module lands.

One shape class and one colour per image, 1–4 copies on white, sides 3/16–1/4 of the image, gaps ≥ 1/16; image
``i`` shows scene ``i mod 48`` of (shape, colour, count) with a layout seeded by (seed, i); captions
``"<count word> <colour> <shape>[s]"`` ("two red circles").
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

__all__ = ["BACKGROUND", "COUNT_WORDS", "PALETTE", "SHAPES", "ShapeScene", "draw_scene", "scene_for_index"]

#: Colour name → RGB: saturated and far apart, so nearest-colour segmentation separates them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
_SCENES = list(itertools.product(SHAPES, PALETTE, COUNT_WORDS))


@dataclass(frozen=True)
class ShapeScene:
    """``count`` copies of one ``shape`` in one ``color``."""

    shape: str
    color: str
    count: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"`shape`: expected one of {SHAPES}, got {self.shape!r}")
        if self.color not in PALETTE:
            raise ValueError(f"`color`: expected one of {tuple(PALETTE)}, got {self.color!r}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"`count`: expected one of {tuple(COUNT_WORDS)}, got {self.count!r}")

    @property
    def caption(self) -> str:
        return f"{COUNT_WORDS[self.count]} {self.color} {self.shape}{'s' if self.count > 1 else ''}"


def scene_for_index(index: int) -> ShapeScene:
    """Scene ``index mod 48`` of (shape, colour, count)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"`index`: expected an int ≥ 0, got {index!r}")
    return ShapeScene(*_SCENES[index % len(_SCENES)])


def draw_scene(scene: ShapeScene, resolution: int = 64, seed: int = 0):
    """``(PIL RGB image, boxes)`` of ``scene``; boxes ``(x, y, side)`` are the shapes' bounding squares."""
    from PIL import Image, ImageDraw

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32:
        raise ValueError(f"`resolution`: expected an int ≥ 32 pixels, got {resolution!r}")
    rng = random.Random(seed)
    small, large = max(3 * resolution // 16, 6), max(resolution // 4, 7)
    gap, margin = max(resolution // 16, 2), max(resolution // 32, 1)
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < scene.count:  # restart the layout when crowded
        boxes = []
        for _ in range(200):
            side = rng.randint(small, large)
            x, y = rng.randint(margin, resolution - margin - side), rng.randint(margin, resolution - margin - side)
            if all(x + side + gap <= bx or bx + bs + gap <= x or y + side + gap <= by or by + bs + gap <= y
                   for bx, by, bs in boxes):
                boxes.append((x, y, side))
                if len(boxes) == scene.count:
                    break
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    pen = ImageDraw.Draw(image)
    fill = PALETTE[scene.color]
    for x, y, side in boxes:
        end = side - 1  # PIL boxes include both end pixels
        if scene.shape == "circle":
            pen.ellipse((x, y, x + end, y + end), fill=fill)
        elif scene.shape == "square":
            pen.rectangle((x, y, x + end, y + end), fill=fill)
        else:
            pen.polygon(((x, y + end), (x + end, y + end), (x + end / 2, y)), fill=fill)
    return image, boxes
