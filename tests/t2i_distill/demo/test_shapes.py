"""The private stand-in for the shapes dataset: captions, scene order, and what is drawn (checked pixel by pixel)."""

from __future__ import annotations

import numpy as np
import pytest

from t2i_distill.demo._shapes import BACKGROUND, PALETTE, ShapeScene, draw_scene, scene_for_index


def test_captions_and_scene_order():
    assert ShapeScene("circle", "red", 2).caption == "two red circles"
    assert ShapeScene("square", "blue", 1).caption == "one blue square"
    assert [scene_for_index(i) for i in (0, 1, 4, 47, 48)] == [
        ShapeScene("circle", "red", 1), ShapeScene("circle", "red", 2), ShapeScene("circle", "green", 1),
        ShapeScene("triangle", "yellow", 4), ShapeScene("circle", "red", 1)]


@pytest.mark.parametrize("shape,fill", [("square", (1.0, 1.0)), ("circle", (0.65, 0.85)), ("triangle", (0.45, 0.65))])
def test_drawn_pixels_are_the_boxes_filled_with_one_colour(shape, fill):
    image, boxes = draw_scene(ShapeScene(shape, "green", 3), 32, seed=5)
    pixels = np.asarray(image)
    assert len(boxes) == 3
    coloured = (pixels == PALETTE["green"]).all(-1)
    assert (coloured | (pixels == BACKGROUND).all(-1)).all()  # only two colours, hard edges
    inside = np.zeros(coloured.shape, bool)
    for x, y, side in boxes:
        inside[y:y + side, x:x + side] = True
        assert fill[0] <= coloured[y:y + side, x:x + side].mean() <= fill[1]  # π/4 and 1/2, pixelated
    assert not (coloured & ~inside).any()
    assert draw_scene(ShapeScene(shape, "green", 3), 32, seed=5)[1] == boxes  # seeded


def test_bad_scenes():
    with pytest.raises(ValueError, match="color"):
        ShapeScene("circle", "purple", 1)
    with pytest.raises(ValueError, match="count"):
        ShapeScene("circle", "red", 5)
    with pytest.raises(ValueError, match="resolution"):
        draw_scene(ShapeScene("circle", "red", 1), 16)
