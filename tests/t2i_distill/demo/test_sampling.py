"""The sample grid: every image lands in its cell, gaps are grey, and the PNG is the nearest-upscaled grid."""

from __future__ import annotations

import numpy as np
from PIL import Image

from t2i_distill.demo.sampling import save_grid


def test_save_grid_places_each_image(tmp_path):
    images = np.stack([np.full((4, 4, 3), 10 * (k + 1), np.uint8) for k in range(5)])
    save_grid(images, tmp_path / "g.png", columns=3, upscale=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * (2 * 5 + 1), 2 * (3 * 5 + 1), 3)
    small = grid[::2, ::2]
    for k in range(5):
        y, x = divmod(k, 3)
        assert (small[1 + 5 * y:5 + 5 * y, 1 + 5 * x:5 + 5 * x] == 10 * (k + 1)).all()
    assert (small[0] == 128).all() and (small[1 + 5:5 + 5, 1 + 10:5 + 10] == 128).all()  # gap row, empty 6th cell
