"""The mini-GenEval scorer: a classical detector of the synthetic shapes (no learned weights; numpy + PIL only).

**Detection** (:func:`detect_shapes`), per image:

1. *Colour segmentation.* A pixel is foreground when its chroma (max − min of R, G, B) is at least
   ``min_chroma`` (white, grey and black backgrounds are not); a foreground pixel takes the palette colour nearest
   in hue (:data:`~t2i_distill.eval.shapes.PALETTE`), which blending with the background does not change.
2. *Connected components* of each colour's mask (4-connectivity; min-label propagation with pointer jumping,
   :func:`connected_components`); components smaller than ``min_area_fraction`` of the image are noise.
3. *Shape test* on each component: template matching inside its bounding box. The component's mask is compared
   (IoU) with the ideal square (the box), circle (the inscribed ellipse) and upright triangle of that box
   (:func:`shape_templates`); the best template wins if its IoU is at least ``min_iou`` (0.7) and the box is not
   elongated. The templates are far apart (a perfect circle scores π/4 ≈ 0.785 against the square, a triangle 0.5),
   blur moves a shape little, and irregular blobs (noise, broken samples) fit none: they are ``"unknown"``.

**Scoring** (:func:`evaluate_detections`) follows GenEval's rules: an image is correct when every ``include`` entry
has at least ``count`` detections of its ``class`` (and ``color``, if given), and every ``exclude`` entry has fewer
than ``count``. :func:`score_geneval_folder` reads GenEval's layout (``<out>/<index:05d>/metadata.jsonl`` +
``samples/<k:04d>.png``) and reports per-task accuracy (GenEval's tags; the mini-GenEval's are ``single_object``
= shape, ``colors`` = colour, ``counting`` = count) and the overall score (the mean over tasks, as GenEval).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from t2i_distill.eval.shapes import PALETTE

__all__ = [
    "TASK_NAMES",
    "Detection",
    "connected_components",
    "detect_shapes",
    "evaluate_detections",
    "format_scores",
    "score_geneval_folder",
]

#: GenEval tag → the short task name the reports print.
TASK_NAMES = {"single_object": "shape", "colors": "colour", "counting": "count"}


@dataclass(frozen=True)
class Detection:
    """One detected component: its class (``"unknown"`` if no shape template fits), colour, pixel area, bounding box
    (x0, y0, x1, y1; exclusive ends) and the IoU of the best-fitting template."""

    shape: str
    color: str
    area: int
    box: tuple[int, int, int, int]
    iou: float


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask → (int64 labels (H, W), 0 = background, 1…n; n)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask`: expected a 2-d boolean array, got shape {mask.shape}")
    h, w = mask.shape
    none = h * w + 1  # larger than every label
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        cur = np.where(mask, labels, none)
        low = cur.copy()
        np.minimum(low[1:], cur[:-1], out=low[1:])
        np.minimum(low[:-1], cur[1:], out=low[:-1])
        np.minimum(low[:, 1:], cur[:, :-1], out=low[:, 1:])
        np.minimum(low[:, :-1], cur[:, 1:], out=low[:, :-1])
        low = np.where(mask, low, 0)
        # Pointer jumping: a label is (index + 1) of a pixel of the same component; that pixel's label is ≤ it.
        flat = low.ravel()
        jumped = np.where(flat > 0, flat[np.maximum(flat - 1, 0)], 0).reshape(h, w)
        new = np.where(mask, np.minimum(low, jumped), 0)
        if np.array_equal(new, labels):
            break
        labels = new
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w)
    if roots.size and roots[0] == 0:
        return dense, int(roots.size - 1)
    return dense + 1, int(roots.size)  # no background pixel at all


def shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    """The ideal masks (H, W) of each shape filling a ``height × width`` box: the full box, the inscribed ellipse and
    the upright isoceles triangle (apex at the top centre, base along the bottom), sampled at pixel centres."""
    y = (np.arange(height)[:, None] + 0.5) / height  # 0 (top) … 1 (bottom)
    x = (np.arange(width)[None, :] + 0.5) / width
    return {
        "square": np.ones((height, width), dtype=bool),
        "circle": (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1.0,
        "triangle": np.abs(2 * x - 1) <= y,
    }


def _best_template(crop: np.ndarray) -> tuple[str, float]:
    """The template with the highest IoU against the component's mask inside its bounding box, and that IoU."""
    scores = {name: float((crop & t).sum()) / float((crop | t).sum())
              for name, t in shape_templates(*crop.shape).items()}
    best = max(scores, key=scores.get)
    return best, scores[best]


def _hue(rgb: np.ndarray) -> np.ndarray:
    """PIL's HSV hue (0…255, circular) of a uint8 (H, W, 3) array, as int32."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))[:, :, 0].astype(np.int32)


def detect_shapes(image, *, min_chroma: int = 70, min_area_fraction: float = 0.01, min_iou: float = 0.7,
                  max_aspect: float = 1.5) -> list[Detection]:
    """Detect palette-coloured circles, squares and triangles in ``image`` (PIL image or uint8 (H, W, 3) array).

    Returns the detections sorted by (colour, y, x), including components that match no shape (``"unknown"``:
    IoU below ``min_iou`` or a bounding box more elongated than ``max_aspect``), which no requirement counts.
    """
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"`image`: expected a PIL image or a uint8 (H, W, 3) array, got {array.dtype} "
                         f"{array.shape}")
    pixels = array.astype(np.int32)
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    names = list(PALETTE)
    # Nearest palette colour by *hue*: blending with the white background (blur, anti-aliasing) keeps the hue but
    # moves RGB towards white, where RGB-nearest would pick another colour (pink fringes become "yellow").
    hue = _hue(array)
    palette_hue = _hue(np.array([[PALETTE[n] for n in names]], dtype=np.uint8))[0]  # (C,)
    gap = np.abs(hue[:, :, None] - palette_hue[None, None])
    nearest = np.minimum(gap, 256 - gap).argmin(axis=2)
    foreground = chroma >= min_chroma
    min_area = max(int(min_area_fraction * array.shape[0] * array.shape[1]), 1)
    found = []
    for c, name in enumerate(names):
        labels, n = connected_components(foreground & (nearest == c))
        for k in range(1, n + 1):
            component = labels == k
            area = int(component.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(component)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            crop = component[y0:y1, x0:x1]
            shape, iou = _best_template(crop)
            aspect = max(crop.shape) / min(crop.shape)
            if iou < min_iou or aspect > max_aspect:
                shape = "unknown"
            found.append(Detection(shape, name, area, (int(x0), int(y0), int(x1), int(y1)), round(iou, 4)))
    return sorted(found, key=lambda d: (d.color, d.box[1], d.box[0]))


def evaluate_detections(detections: list[Detection], metadata: dict) -> tuple[bool, str]:
    """GenEval's rule for one image: ``(correct, reason)``; ``reason`` names the first failed requirement."""
    if not isinstance(metadata, dict) or "include" not in metadata:
        raise ValueError(f"`metadata`: expected a GenEval metadata dict with an 'include' list, got {metadata!r:.200}")

    def matching(req: dict) -> int:
        return sum(d.shape == req["class"] and ("color" not in req or d.color == req["color"]) for d in detections)

    def describe(req: dict) -> str:
        return f"{req.get('color', '') + ' ' if 'color' in req else ''}{req['class']}"

    for req in metadata["include"]:
        found = matching(req)
        if found < req.get("count", 1):
            return False, f"expected {req.get('count', 1)} {describe(req)}, found {found}"
    for req in metadata.get("exclude", []):
        found = matching(req)
        if found >= req["count"]:
            return False, f"expected fewer than {req['count']} {describe(req)}, found {found}"
    return True, "correct"


def score_geneval_folder(output_dir: str | os.PathLike, results_path: str | os.PathLike | None = None,
                         **detector_options) -> dict:
    """Score every image of a GenEval-layout folder; return ``{"tasks": {tag: accuracy}, "overall", "images",
    "correct", "prompts"}`` and, with ``results_path``, write one JSON line per image (GenEval's ``results.jsonl``
    fields: filename, tag, prompt, correct, reason, metadata, plus the detections)."""
    root = Path(output_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    if not folders:
        raise ValueError(f"`output_dir` {str(root)!r}: expected GenEval's layout (<index:05d>/metadata.jsonl + "
                         "samples/<k:04d>.png), found no prompt folders")
    rows, per_tag = [], {}
    metas = {}
    for folder in folders:
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            raise ValueError(f"prompt folder {str(folder)!r} has no metadata.jsonl (incomplete generation?)")
        metas[folder] = json.loads(meta_path.read_text(encoding="utf-8").splitlines()[0])
    _check_detectable(metas)
    for folder in folders:
        metadata = metas[folder]
        samples = sorted((folder / "samples").glob("*.png"))
        if not samples:
            raise ValueError(f"prompt folder {str(folder)!r} has no samples/*.png")
        from PIL import Image

        for sample in samples:
            with Image.open(sample) as image:
                detections = detect_shapes(image, **detector_options)
            correct, reason = evaluate_detections(detections, metadata)
            tag = metadata.get("tag", "untagged")
            per_tag.setdefault(tag, []).append(correct)
            rows.append({"filename": str(sample), "tag": tag, "prompt": metadata.get("prompt"), "correct": correct,
                         "reason": reason, "metadata": json.dumps(metadata),
                         "detections": [asdict(d) for d in detections]})
    tasks = {tag: sum(v) / len(v) for tag, v in sorted(per_tag.items())}
    summary = {"tasks": tasks, "overall": sum(tasks.values()) / len(tasks), "images": len(rows),
               "correct": sum(r["correct"] for r in rows), "prompts": len(folders)}
    if results_path is not None:
        Path(results_path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return summary


def _check_detectable(metas: dict) -> None:
    """Refuse prompts whose classes or colours the classical detector does not know (GenEval's 80 COCO classes
    need GenEval's own Mask2Former scorer): scoring them would print 0.000 as if the images were wrong."""
    from t2i_distill.errors import ConfigurationError

    shapes, colours = set(shape_templates(8, 8)), set(PALETTE)
    unknown = {}
    for folder, metadata in metas.items():
        for req in [*metadata.get("include", []), *metadata.get("exclude", [])]:
            for value, known in ((req.get("class"), shapes), (req.get("color"), colours)):
                if value is not None and value not in known:
                    unknown.setdefault(value, folder.name)
    if unknown:
        shown = ", ".join(f"{name!r} (first in {folder})" for name, folder in list(unknown.items())[:8])
        raise ConfigurationError(
            f"`score` knows only the synthetic shapes ({', '.join(sorted(shapes))}) in the colours "
            f"{', '.join(sorted(colours))}; these prompts ask for {len(unknown)} other class(es)/colour(s): {shown}. "
            "Real GenEval prompts need GenEval's own scorer (github.com/djghosh13/geneval, evaluation/)")


def format_scores(summary: dict, label: str = "") -> str:
    """One markdown table row block: task accuracies (short names) and the overall score."""
    names = [TASK_NAMES.get(tag, tag) for tag in summary["tasks"]]
    head = "| " + " | ".join(["run", *names, "overall", "images"]) + " |"
    sep = "|" + "---|" * (len(names) + 3)
    cells = [f"{v:.3f}" for v in summary["tasks"].values()]
    row = "| " + " | ".join([label or "-", *cells, f"{summary['overall']:.3f}", str(summary["images"])]) + " |"
    return "\n".join([head, sep, row])


# -- command line -----------------------------------------------------------------------------------------------
def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score a GenEval-layout folder of shape images with the mini-GenEval "
                                            "classical detector")
    p.add_argument("output_dir", help="the folder `t2i-distill geneval` wrote (<index:05d>/metadata.jsonl + samples)")
    p.add_argument("--results", default=None, help="write per-image results here (default: <output_dir>/"
                                                   "results.jsonl; '-' for none)")
    p.add_argument("--json", default=None, help="also write the summary as JSON to this path")
    p.set_defaults(func=_cmd_score)


def _cmd_score(args) -> int:
    results = None if args.results == "-" else (args.results or str(Path(args.output_dir) / "results.jsonl"))
    summary = score_geneval_folder(args.output_dir, results)
    print(format_scores(summary, Path(args.output_dir).name))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0
