"""The reference's image transform (reference-spec §1.6), with PIL + torch instead of torchvision.

The reference applies ``Resize(R)`` (shorter side to R, bilinear, antialias), ``CenterCrop(R)``, ``ToTensor()``,
``Normalize(0.5, 0.5)`` to a ``PIL.Image`` after ``convert("RGB")``. On a PIL input torchvision's ``Resize`` *is*
``PIL.Image.resize(size, BILINEAR)`` (PIL's default ``reducing_gap=None`` is a full antialiased resample whose
triangle filter widens with the downscale factor; torchvision's ``antialias`` flag only matters for tensor inputs,
whose ``_upsample_bilinear2d_aa`` agrees with PIL to ±1/255). The output size and the crop offsets below repeat
torchvision's formulas (``int(R·long/short)``; ``int(round((size − R)/2))``, Python's half-to-even round), so the
result equals the reference bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import torch

__all__ = ["decode_image", "image_to_tensor", "resize_center_crop"]


def decode_image(value):
    """A ``PIL.Image`` from what datasets hold: a PIL image, ``bytes``, ``{"bytes", "path"}`` or a file path.

    Raises whatever PIL raises on a corrupt file (the loader catches it and skips the record); the file is fully
    decoded here (``load()``), so a truncated image fails now rather than later in the transform.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        data = value.get("bytes")
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise TypeError(f"image: expected a PIL image, bytes, a {{'bytes', 'path'}} dict or a path, got "
                        f"{type(value).__name__}")
    image.load()
    return image


def resize_center_crop(image, resolution: int):
    """RGB, shorter side → ``resolution`` (bilinear, antialiased), centre crop ``resolution``²: a PIL image."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resolution, int(resolution * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image, resolution: int) -> torch.Tensor:
    """The reference transform: a PIL image → float32 (3, R, R) in [-1, 1] (``(u/255 − 0.5)/0.5`` per channel)."""
    pixels = np.asarray(resize_center_crop(image, resolution), dtype=np.uint8)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)  # ToTensor's order of operations
    return x.sub(0.5).div(0.5)  # Normalize(mean=0.5, std=0.5)
