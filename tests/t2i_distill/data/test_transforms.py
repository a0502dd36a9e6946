"""The reference transform (reference-spec §1.6) against hand computations and torchvision's size/crop formulas."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_distill.data.transforms import decode_image, image_to_tensor, resize_center_crop


def _to_unit(v: float) -> float:
    return (v / 255 - 0.5) / 0.5


def test_hand_computed_antialiased_bilinear_resize_and_centre_crop():
    # 8 wide × 4 high → shorter side 2: a 2× downscale, so PIL's triangle filter spans 4 input pixels per output
    # pixel (support 1 × scale 2), weights (0.25, 0.75, 0.75, 0.25)/2 inside the image and (0.75, 0.75, 0.25)/1.75
    # at the border. Output 4 × 2, centre crop 2 × 2 keeps columns round((4 − 2)/2) = 1 and 2.
    cols = np.array([0, 40, 80, 120, 160, 200, 240, 255], dtype=np.uint8)
    rows = np.array([0, 0, 140, 0], dtype=np.uint8)
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[..., 0] = cols[None, :]
    pixels[..., 1] = rows[:, None]
    pixels[..., 2] = 255
    out = image_to_tensor(Image.fromarray(pixels), 2)
    # red, column 1: (.25·40 + .75·80 + .75·120 + .25·160)/2 = 100; column 2: (.25·120 + .75·160 + .75·200 +
    # .25·240)/2 = 180. green, row 0: (.75·0 + .75·0 + .25·140)/1.75 = 20; row 1: (.25·0 + .75·140 + .75·0)/1.75 = 60.
    expected = torch.tensor([[[100, 180], [100, 180]], [[20, 20], [60, 60]], [[255, 255], [255, 255]]],
                            dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    torch.testing.assert_close(out, expected.div(255).sub(0.5).div(0.5), rtol=0, atol=0)


@pytest.mark.parametrize(("w", "h", "resized", "box"), [
    (30, 20, (24, 16), (4, 0, 20, 16)),   # landscape: long side int(16·30/20) = 24, left round(8/2) = 4
    (20, 33, (16, 26), (0, 5, 16, 21)),   # portrait: int(16·33/20) = 26, top round(10/2) = 5
    (21, 16, (21, 16), (2, 0, 18, 16)),   # shorter side already 16: no resize; left round(5/2) = round(2.5) = 2
    (23, 16, (23, 16), (4, 0, 20, 16)),   # left round(7/2) = round(3.5) = 4 (half to even, as torchvision)
])
def test_sizes_and_crop_offsets_follow_torchvision(w, h, resized, box):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    expected = image.resize(resized, Image.BILINEAR) if resized != (w, h) else image
    out = resize_center_crop(image, 16)
    assert out.size == (16, 16)
    assert np.array_equal(np.asarray(out), np.asarray(expected.crop(box)))


def test_output_range_channels_and_mode_conversion():
    gray = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8), mode="L")
    out = image_to_tensor(gray, 16)
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # gray → RGB repeats the channel
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # alpha is dropped, as convert("RGB") does
    torch.testing.assert_close(image_to_tensor(rgba, 16)[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert _to_unit(255) == 1.0 and _to_unit(0) == -1.0


def test_decode_image_accepts_what_datasets_hold(tmp_path):
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    for value in (image, buf.getvalue(), {"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": str(path)},
                  str(path)):
        assert decode_image(value).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(TypeError, match="image: expected"):
        decode_image(3)
    with pytest.raises(OSError):
        decode_image(buf.getvalue()[:40])  # truncated: fails now, not later
