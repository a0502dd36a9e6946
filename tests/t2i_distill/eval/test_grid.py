"""The labelled grid: every image pasted where the layout says, labels drawn in the margins, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from t2i_distill.eval.grid import labelled_grid


def _tile(colour):
    return Image.new("RGB", (20, 16), colour)


def test_images_land_in_their_cells_and_labels_are_drawn():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (200, 100, 0), (0, 100, 200)]]
    rows = [[_tile(c) for c in row] for row in colours]
    grid = labelled_grid(rows, column_labels=["a", "b", "c"], row_labels=["teacher", "sCM"])
    pixels = np.asarray(grid)
    margin, header, pad = 7 * 6 + 8, 12 + 4, 4  # longest row label 7 chars; one header line
    assert grid.size == (margin + 3 * 24 + pad, header + 2 * 20 + pad)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            x, y = margin + pad + c * 24, header + pad + r * 20
            assert (pixels[y:y + 16, x:x + 20] == colour).all(), (r, c)
    assert (pixels[:header, margin:] != 255).any()  # column captions
    assert (pixels[header:, :margin] != 255).any()  # row labels


def test_ragged_rows_and_no_labels():
    grid = labelled_grid([[_tile((0, 0, 0))] * 2, [_tile((0, 0, 0))]])
    assert grid.size == (2 * 24 + 4, 2 * 20 + 4)


@pytest.mark.parametrize(("rows", "kwargs", "match"), [
    ([], {}, "rows"),
    ([[_tile((0, 0, 0)), Image.new("RGB", (8, 8))]], {}, "20×16"),
    ([[_tile((0, 0, 0))]], {"column_labels": ["a", "b"]}, "column_labels"),
    ([[_tile((0, 0, 0))]], {"row_labels": ["a", "b"]}, "row_labels"),
])
def test_bad_input(rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        labelled_grid(rows, **kwargs)
