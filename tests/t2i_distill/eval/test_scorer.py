"""The classical mini-GenEval detector and scorer, on images drawn with known content (positives and negatives)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from t2i_distill.eval.scorer import (
    connected_components,
    detect_shapes,
    evaluate_detections,
    format_scores,
    score_geneval_folder,
)
from t2i_distill.eval.shapes import PALETTE, ShapeScene, draw_scene, scene_for_index


def test_connected_components_against_a_hand_labelled_mask():
    mask = np.array([
        [1, 1, 0, 0, 1],
        [0, 1, 0, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0],
    ], dtype=bool)
    labels, n = connected_components(mask)
    assert n == 4  # diagonal neighbours are not connected (4-connectivity)
    groups = {frozenset(zip(*np.nonzero(labels == k))) for k in range(1, n + 1)}
    assert groups == {frozenset({(0, 0), (0, 1), (1, 1)}), frozenset({(0, 4), (1, 3), (1, 4)}),
                      frozenset({(2, 0), (3, 0), (3, 1)}), frozenset({(3, 3)})}
    assert (labels[~mask] == 0).all()


def test_connected_components_of_a_spiral_needing_many_passes():
    mask = np.zeros((9, 9), dtype=bool)
    mask[0, :] = mask[:, 8] = mask[8, :] = mask[2:, 0] = mask[2, :7] = mask[2:7, 6] = mask[6, 2:7] = True
    labels, n = connected_components(mask)
    assert n == 1 and (labels[mask] == 1).all()
    assert connected_components(np.zeros((3, 3), dtype=bool))[1] == 0


@pytest.mark.parametrize("resolution", [64, 128])
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_every_scene_is_detected_exactly(resolution, blur):
    """All 48 (shape, colour, count) scenes, sharp and blurred: the right number of the right shapes and colour."""
    for index in range(48):
        scene = scene_for_index(index)
        image, _ = draw_scene(scene, resolution, seed=100 + index)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur * resolution / 64))
        found = [(d.shape, d.color) for d in detect_shapes(image)]
        assert found == [(scene.shape, scene.color)] * scene.count, f"{scene.caption} (blur {blur}): {found}"


def test_mixed_scene_with_a_grey_background():
    image = Image.new("RGB", (96, 96), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((5, 5, 24, 24), fill=PALETTE["blue"])
    draw.rectangle((50, 8, 69, 27), fill=PALETTE["yellow"])
    draw.polygon(((10, 80), (34, 80), (22, 56)), fill=PALETTE["green"])
    draw.rectangle((60, 60, 61, 61), fill=PALETTE["red"])  # a 4-pixel speck: noise, not a shape
    found = sorted((d.color, d.shape) for d in detect_shapes(image))
    assert found == [("blue", "circle"), ("green", "triangle"), ("yellow", "square")]


def test_empty_image_and_noise_detect_nothing_countable():
    assert detect_shapes(Image.new("RGB", (64, 64), (255, 255, 255))) == []
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
    assert all(d.shape == "unknown" for d in detect_shapes(noise))


def _meta(tag, cls, count, color=None, exclude=False):
    req = {"class": cls, "count": count, **({"color": color} if color else {})}
    return {"tag": tag, "include": [req], **({"exclude": [{"class": cls, "count": count + 1}]} if exclude else {}),
            "prompt": "p"}


@pytest.mark.parametrize(("scene", "metadata", "correct"), [
    (ShapeScene("circle", "red", 2), _meta("counting", "circle", 2, exclude=True), True),
    (ShapeScene("circle", "red", 3), _meta("counting", "circle", 2, exclude=True), False),  # too many
    (ShapeScene("circle", "red", 1), _meta("counting", "circle", 2, exclude=True), False),  # too few
    (ShapeScene("square", "blue", 1), _meta("colors", "square", 1, "blue"), True),
    (ShapeScene("square", "green", 1), _meta("colors", "square", 1, "blue"), False),  # wrong colour
    (ShapeScene("triangle", "yellow", 1), _meta("single_object", "triangle", 1), True),
    (ShapeScene("circle", "yellow", 1), _meta("single_object", "triangle", 1), False),  # wrong shape
    (ShapeScene("square", "red", 3), _meta("single_object", "square", 1), True),  # "at least", as GenEval
])
def test_geneval_rules_on_drawn_images(scene, metadata, correct):
    image, _ = draw_scene(scene, 64, seed=3)
    verdict, reason = evaluate_detections(detect_shapes(image), metadata)
    assert verdict is correct, reason


def test_empty_image_fails_every_task():
    empty = detect_shapes(Image.new("RGB", (64, 64), (255, 255, 255)))
    for meta in (_meta("single_object", "circle", 1), _meta("colors", "circle", 1, "red"),
                 _meta("counting", "circle", 2, exclude=True)):
        verdict, reason = evaluate_detections(empty, meta)
        assert not verdict and "found 0" in reason


def _write_prompt(root, index, metadata, scenes):
    folder = root / f"{index:05d}"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for k, scene in enumerate(scenes):
        image = Image.new("RGB", (64, 64), (255, 255, 255)) if scene is None else draw_scene(scene, 64, k)[0]
        image.save(folder / "samples" / f"{k:04d}.png")


def test_score_folder_per_task_accuracy(tmp_path):
    _write_prompt(tmp_path, 0, _meta("single_object", "circle", 1),
                  [ShapeScene("circle", "red", 1), ShapeScene("square", "red", 1)])  # 1/2
    _write_prompt(tmp_path, 1, _meta("colors", "square", 1, "blue"),
                  [ShapeScene("square", "blue", 1), ShapeScene("square", "blue", 2)])  # 2/2
    _write_prompt(tmp_path, 2, _meta("counting", "triangle", 3, exclude=True),
                  [ShapeScene("triangle", "green", 3), None, ShapeScene("triangle", "green", 4),
                   ShapeScene("triangle", "green", 2)])  # 1/4
    summary = score_geneval_folder(tmp_path, tmp_path / "results.jsonl")
    assert summary["tasks"] == {"colors": 1.0, "counting": 0.25, "single_object": 0.5}
    assert summary["overall"] == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    assert (summary["images"], summary["correct"], summary["prompts"]) == (8, 4, 3)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"filename", "tag", "prompt", "correct", "reason", "metadata"} <= set(rows[0])
    table = format_scores(summary, "teacher")
    assert "| teacher | 1.000 | 0.250 | 0.500 | 0.583 | 8 |" in table and "colour" in table


def test_score_folder_refuses_a_folder_without_the_layout(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        score_geneval_folder(tmp_path)
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(ValueError, match="metadata.jsonl"):
        score_geneval_folder(tmp_path)


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match="image"):
        detect_shapes(np.zeros((8, 8), dtype=np.float32))


def test_real_geneval_prompts_are_refused_naming_the_classes(tmp_path):
    import json as _json

    from t2i_distill.errors import ConfigurationError
    from t2i_distill.eval.scorer import score_geneval_folder

    folder = tmp_path / "00000"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(_json.dumps({"tag": "single_object", "include": [{"class": "bench",
                                                                                             "count": 1}],
                                                        "prompt": "a photo of a bench"}) + "\n")
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(folder / "samples" / "0000.png")
    with pytest.raises(ConfigurationError, match=r"knows only the synthetic shapes.*'bench' \(first in 00000\)"):
        score_geneval_folder(tmp_path)
