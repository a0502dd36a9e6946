"""A deterministic synthetic captioned dataset: 1–4 coloured shapes on a plain background ("two red circles").

What the offline demo distils on, and what the mini-GenEval asks for. Designed so a classical detector
(:mod:`t2i_distill.eval.scorer`) reads it back without learned weights:

* background: plain white; colours: a small palette of saturated, far-apart RGB values (:data:`PALETTE`), so
  nearest-colour segmentation separates them even on blurry samples;
* shapes: axis-aligned ``circle``, ``square`` and upright ``triangle`` (isoceles, apex up), each inside a square
  bounding box; their fill ratios (π/4, 1, 1/2) and the triangle's top/bottom asymmetry tell them apart;
* one shape class and one colour per image, 1–4 copies, sizes 3/16–1/4 of the image side, never touching (a gap of
  ≥ 1/16 of the side), placed by seeded rejection sampling;
* captions ``"<count> <colour> <shape>[s]"`` with the count as a word ("one blue square", "three yellow triangles").

Image ``i`` depends only on ``(seed, i, resolution)``: its scene is combination ``i mod 48`` of (shape, colour,
count) — so any 48 consecutive images are balanced — and its layout comes from a generator seeded by (seed, i).

Written as a diffusers/datasets **imagefolder**: ``<dir>/<i:05d>.png`` and ``<dir>/metadata.jsonl`` with one
``{"file_name", "text", "shape", "color", "count"}`` object per line (``load_dataset("imagefolder", data_dir=dir)``
gives columns ``image``, ``text``, ...). :func:`mini_geneval_metadata` writes the evaluation prompts in GenEval's
metadata format.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKGROUND",
    "COUNT_WORDS",
    "PALETTE",
    "SHAPES",
    "ShapeScene",
    "draw_scene",
    "mini_geneval_metadata",
    "scene_for_index",
    "write_metadata_jsonl",
    "write_shapes_dataset",
]

#: Colour name → RGB. Far apart in RGB and in hue, so nearest-colour segmentation is robust.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
_SCENES = list(itertools.product(SHAPES, PALETTE, COUNT_WORDS))  # 48 (shape, colour, count) combinations


@dataclass(frozen=True)
class ShapeScene:
    """What an image shows: ``count`` copies of one ``shape`` in one ``color``."""

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
        """``"two red circles"``: count word, colour, shape (plural from two on)."""
        return f"{COUNT_WORDS[self.count]} {self.color} {self.shape}{'s' if self.count > 1 else ''}"


def scene_for_index(index: int) -> ShapeScene:
    """The scene of dataset image ``index``: combination ``index mod 48`` of (shape, colour, count)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"`index`: expected an int ≥ 0, got {index!r}")
    return ShapeScene(*_SCENES[index % len(_SCENES)])


def _check_resolution(resolution: object) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32:
        raise ValueError(f"`resolution`: expected an int ≥ 32 pixels, got {resolution!r}")
    return resolution


def _layout(count: int, resolution: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """``count`` non-touching square boxes (x, y, side) inside the image; retried from scratch if crowded."""
    small, large = max(3 * resolution // 16, 6), max(resolution // 4, 7)
    gap, margin = max(resolution // 16, 2), max(resolution // 32, 1)
    for _ in range(1000):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200):
            side = rng.randint(small, large)
            x = rng.randint(margin, resolution - margin - side)
            y = rng.randint(margin, resolution - margin - side)
            if all(x + side + gap <= bx or bx + bs + gap <= x or y + side + gap <= by or by + bs + gap <= y
                   for bx, by, bs in boxes):
                boxes.append((x, y, side))
                if len(boxes) == count:
                    return boxes
    raise RuntimeError(f"could not place {count} shapes in a {resolution}px image")  # unreachable for count ≤ 4


def draw_scene(scene: ShapeScene, resolution: int = 64, seed: int = 0):
    """The image (PIL RGB, ``resolution``²) of ``scene``, its layout drawn from ``seed``. Returns ``(image, boxes)``
    with boxes ``(x, y, side)`` of the shapes' bounding squares."""
    from PIL import Image, ImageDraw

    resolution = _check_resolution(resolution)
    rng = random.Random(seed)
    boxes = _layout(scene.count, resolution, rng)
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = PALETTE[scene.color]
    for x, y, side in boxes:
        end = side - 1  # PIL boxes include both end pixels: the shape is exactly `side` pixels wide
        if scene.shape == "circle":
            draw.ellipse((x, y, x + end, y + end), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x, y, x + end, y + end), fill=fill)
        else:
            draw.polygon(((x, y + end), (x + end, y + end), (x + end / 2, y)), fill=fill)
    return image, boxes


def _image_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index  # distinct per (seed, index) for any realistic dataset size


def write_metadata_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, one object per line) through a temporary file; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_shapes_dataset(output_dir: str | os.PathLike, num_images: int = 480, resolution: int = 64,
                         seed: int = 0) -> Path:
    """Write the imagefolder (``<i:05d>.png`` + ``metadata.jsonl``) of images 0…num_images−1; return its path.

    Raises ``FileExistsError`` if ``output_dir`` exists and is not empty.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images`: expected an int ≥ 1, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed`: expected an int ≥ 0, got {seed!r}")
    resolution = _check_resolution(resolution)
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"`output_dir` {str(out)!r} exists and is not an empty folder; choose a new path")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_images):
        scene = scene_for_index(index)
        image, _ = draw_scene(scene, resolution, _image_seed(seed, index))
        name = f"{index:05d}.png"
        image.save(out / name)
        rows.append({"file_name": name, "text": scene.caption, "shape": scene.shape, "color": scene.color,
                     "count": scene.count})
    write_metadata_jsonl(out / "metadata.jsonl", rows)  # last: a folder with metadata is complete
    return out


def mini_geneval_metadata(per_task: int = 4) -> list[dict]:
    """The mini-GenEval prompts in GenEval's metadata format, ``per_task`` per task, deterministic.

    * ``single_object`` (shape): "one <colour> <shape>", include ``[{"class": shape, "count": 1}]``;
    * ``colors`` (colour): "one <colour> <shape>", include ``[{"class": shape, "count": 1, "color": colour}]``;
    * ``counting`` (count): "<n> <colour> <shape>s" with n ∈ 2..4, include ``[{"class": shape, "count": n}]`` and
      exclude ``[{"class": shape, "count": n + 1}]`` (exactly n, as GenEval's counting task).

    Every prompt is a caption of the training distribution; shapes, colours and counts cycle so each appears.
    """
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise ValueError(f"`per_task`: expected an int ≥ 1, got {per_task!r}")
    colours = list(PALETTE)
    rows = []
    for k in range(per_task):
        scene = ShapeScene(SHAPES[k % 3], colours[(k + 1) % 4], 1)
        rows.append({"tag": "single_object", "include": [{"class": scene.shape, "count": 1}],
                     "prompt": scene.caption})
    for k in range(per_task):
        scene = ShapeScene(SHAPES[(k + 1) % 3], colours[k % 4], 1)
        rows.append({"tag": "colors", "include": [{"class": scene.shape, "count": 1, "color": scene.color}],
                     "prompt": scene.caption})
    for k in range(per_task):
        scene = ShapeScene(SHAPES[(k + 2) % 3], colours[(k + 2) % 4], 2 + k % 3)
        rows.append({"tag": "counting", "include": [{"class": scene.shape, "count": scene.count}],
                     "exclude": [{"class": scene.shape, "count": scene.count + 1}], "prompt": scene.caption})
    return rows


# -- command line -----------------------------------------------------------------------------------------------
def add_subparser(subparsers) -> None:
    from t2i_distill.flag_types import nonnegative_int, positive_int

    p = subparsers.add_parser("shapes", help="write the synthetic coloured-shapes imagefolder and mini-GenEval prompts")
    p.add_argument("--output_dir", required=True, help="new (or empty) folder for the imagefolder")
    p.add_argument("--num_images", type=positive_int, default=480,
                   help="images (48 scenes cycle; default: %(default)s)")
    p.add_argument("--resolution", type=positive_int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="layout seed (default: %(default)s)")
    p.add_argument("--geneval_metadata", default=None,
                   help="also write the mini-GenEval prompts (GenEval's metadata format) to this .jsonl path")
    p.add_argument("--per_task", type=positive_int, default=4,
                   help="mini-GenEval prompts per task (default: %(default)s)")
    p.set_defaults(func=_cmd_shapes)


def _cmd_shapes(args) -> int:
    out = write_shapes_dataset(args.output_dir, args.num_images, args.resolution, args.seed)
    print(f"wrote {args.num_images} images ({args.resolution}px) and metadata.jsonl to {out}")
    if args.geneval_metadata:
        path = write_metadata_jsonl(args.geneval_metadata, mini_geneval_metadata(args.per_task))
        print(f"wrote {3 * args.per_task} mini-GenEval prompts to {path}")
    return 0
