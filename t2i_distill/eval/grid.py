"""A labelled image grid (PIL): rows of samples with a caption above each column and a label left of each row.

Used by ``t2i-distill sample`` (one row per image index, columns = prompts) and by the demo (rows = teacher, sCM,
MeanFlow; columns = prompts).
"""

from __future__ import annotations

import textwrap

__all__ = ["labelled_grid"]

_PAD = 4
_LINE = 12  # pixels per text line of PIL's default bitmap font


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def labelled_grid(rows, column_labels: list[str] | None = None, row_labels: list[str] | None = None,
                  background=(255, 255, 255)):
    """``rows``: a list of rows, each a list of equally sized PIL images (a ragged last row is padded blank).

    Column labels are wrapped to the cell width; row labels sit in a left margin. Returns one RGB PIL image.
    """
    from PIL import Image, ImageDraw

    if not rows or not all(isinstance(r, (list, tuple)) and r for r in rows):
        raise ValueError("`rows`: expected a non-empty list of non-empty lists of PIL images")
    width, height = rows[0][0].size
    if any(im.size != (width, height) for r in rows for im in r):
        raise ValueError(f"`rows`: every image must be {width}×{height} like the first one")
    columns = max(len(r) for r in rows)
    if column_labels is not None and len(column_labels) != columns:
        raise ValueError(f"`column_labels`: expected {columns} labels (one per column), got {len(column_labels)}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"`row_labels`: expected {len(rows)} labels (one per row), got {len(row_labels)}")
    chars = max(width // 6, 4)  # the default font is ~6 px per character
    wrapped = [textwrap.wrap(label, chars) or [""] for label in (column_labels or [])]
    header = (max(len(w) for w in wrapped) * _LINE + _PAD) if wrapped else 0
    margin = (max(len(label) for label in row_labels) * 6 + 2 * _PAD) if row_labels else 0
    grid = Image.new("RGB", (margin + columns * (width + _PAD) + _PAD, header + len(rows) * (height + _PAD) + _PAD),
                     background)
    draw = ImageDraw.Draw(grid)
    font = _font()
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((margin + _PAD + c * (width + _PAD), _PAD // 2 + k * _LINE), line, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = header + _PAD + r * (height + _PAD)
        if row_labels:
            draw.text((_PAD, y + height // 2 - _LINE // 2), row_labels[r], fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (margin + _PAD + c * (width + _PAD), y))
    return grid
