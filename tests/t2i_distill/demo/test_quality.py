"""The demo teacher's colour/count check on images with known content: drawn scenes and hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from t2i_distill.demo._shapes import BACKGROUND, PALETTE, draw_scene, scene_for_index
from t2i_distill.demo.quality import count_components, dominant_colour, score_samples


def _scenes(n: int = 48):
    scenes = [scene_for_index(i) for i in range(n)]
    images = np.stack([np.asarray(draw_scene(s, 32, seed=i)[0]) for i, s in enumerate(scenes)])
    return images, [(s.count, s.color, s.shape) for s in scenes]


def test_drawn_scenes_score_perfectly_and_wrong_labels_do_not():
    images, labels = _scenes()
    assert score_samples(images, labels, PALETTE, BACKGROUND).__dict__ == {
        "colour_accuracy": 1.0, "count_accuracy": 1.0, "num_samples": 48}
    shifted = [(count % 4 + 1, colour, shape) for count, colour, shape in labels]  # every count wrong
    wrong_colour = [(count, "red" if colour != "red" else "blue", shape) for count, colour, shape in labels]
    assert score_samples(images, shifted, PALETTE, BACKGROUND).count_accuracy == 0.0
    assert score_samples(images, wrong_colour, PALETTE, BACKGROUND).colour_accuracy == 0.0


def test_count_components_and_dominant_colour_by_hand():
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = True  # area 4
    mask[4:6, 3:6] = True  # area 6
    mask[0, 5] = True  # area 1: noise below min_area
    mask[2, 2] = True  # touches the first block only diagonally: its own (noise) component
    assert count_components(mask, min_area=4) == 2 and count_components(mask, min_area=1) == 4
    image = np.full((4, 4, 3), 255, np.uint8)
    assert dominant_colour(image, PALETTE) is None
    image[:2] = PALETTE["green"]
    image[3, 0] = PALETTE["blue"]
    assert dominant_colour(image, PALETTE) == "green"


def test_bad_inputs():
    with pytest.raises(ValueError, match="image"):
        dominant_colour(np.zeros((4, 4)), PALETTE)
    with pytest.raises(ValueError, match="mask"):
        count_components(np.zeros(4, bool))
    with pytest.raises(ValueError, match="same non-zero length"):
        score_samples(np.zeros((1, 4, 4, 3), np.uint8), [], PALETTE)
