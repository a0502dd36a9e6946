"""The demo teacher's quality figure on images with known content: drawn scenes and hand-made arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from t2i_distill.demo.quality import dominant_colour, score_samples
from t2i_distill.eval.shapes import PALETTE, ShapeScene, draw_scene, scene_for_index


def test_drawn_scenes_score_perfectly_and_wrong_prompts_do_not():
    scenes = [scene_for_index(i) for i in range(48)]
    images = np.stack([np.asarray(draw_scene(s, 32, seed=i)[0]) for i, s in enumerate(scenes)])
    assert dataclasses.asdict(score_samples(images, scenes)) == {
        "colour_accuracy": 1.0, "shape_accuracy": 1.0, "count_accuracy": 1.0, "num_samples": 48}
    wrong_count = [ShapeScene(s.shape, s.color, s.count % 4 + 1) for s in scenes]
    wrong_colour = [ShapeScene(s.shape, "red" if s.color != "red" else "blue", s.count) for s in scenes]
    assert score_samples(images, wrong_count).count_accuracy == 0.0
    score = score_samples(images, wrong_colour)
    assert (score.colour_accuracy, score.shape_accuracy, score.count_accuracy) == (0.0, 0.0, 0.0)


def test_dominant_colour_by_hand():
    image = np.full((4, 4, 3), 255, np.uint8)
    assert dominant_colour(image, PALETTE) is None
    image[:2] = PALETTE["green"]
    image[3, 0] = PALETTE["blue"]
    image[3, 1] = (250, 250, 250)  # near-white: background, not a colour
    assert dominant_colour(image, PALETTE) == "green"


def test_bad_inputs():
    with pytest.raises(ValueError, match="image"):
        dominant_colour(np.zeros((4, 4)), PALETTE)
    with pytest.raises(ValueError, match="same non-zero length"):
        score_samples(np.zeros((1, 32, 32, 3), np.uint8), [])
