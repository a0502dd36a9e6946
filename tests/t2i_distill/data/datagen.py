"""Data the data tests build themselves: small PNG/JPEG images with captions, written as an imagefolder, parquet and
webdataset-style tar shards, with a few corrupt images and empty/missing captions mixed in."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = ("red", "green", "blue", "circle", "square", "cat", "dog", "two", "three", "photo")


@dataclass
class Item:
    name: str  # file name stem
    ext: str  # ".png" or ".jpg"
    data: bytes  # encoded image (garbage when corrupt)
    caption: str | None
    corrupt: bool = False

    @property
    def file_name(self) -> str:
        return self.name + self.ext

    @property
    def good(self) -> bool:
        return not self.corrupt and bool(self.caption and self.caption.strip())


def make_items(n: int = 24, seed: int = 0, corrupt: tuple[int, ...] = (3, 11), empty: tuple[int, ...] = (5,),
               missing: tuple[int, ...] = (8,)) -> list[Item]:
    """``n`` images of varied sizes/aspect ratios (PNG even, JPEG odd); ``corrupt`` indices hold truncated bytes,
    ``empty`` an empty (whitespace) caption, ``missing`` no caption."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        ext = ".png" if i % 2 == 0 else ".jpg"
        Image.fromarray(pixels).save(buf, format="PNG" if ext == ".png" else "JPEG", quality=95)
        data = buf.getvalue()
        if i in corrupt:
            data = data[: len(data) // 3]  # truncated: the header parses, decoding fails
        caption = " ".join(rng.choice(WORDS, size=3)) + f" {i}"
        if i in empty:
            caption = "  "
        if i in missing:
            caption = None
        items.append(Item(f"img{i:03d}", ext, data, caption, corrupt=i in corrupt))
    return items


def write_imagefolder(root: Path, items: list[Item], caption_column: str = "text", fmt: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for item in items:
        (root / item.file_name).write_bytes(item.data)
    if fmt == "jsonl":
        with open(root / "metadata.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps({"file_name": item.file_name, caption_column: item.caption}) + "\n")
    else:
        import pandas as pd

        pd.DataFrame({"file_name": [i.file_name for i in items],
                      caption_column: [i.caption for i in items]}).to_csv(root / "metadata.csv", index=False)
    return root


def write_parquet(path: Path, items: list[Item], image_column: str = "image", caption_column: str = "text",
                  shards: int = 2) -> list[Path]:
    """``shards`` parquet files with an image column as datasets writes it ({bytes, path}) and a caption column."""
    import datasets

    features = datasets.Features({image_column: datasets.Image(), caption_column: datasets.Value("string")})
    path.mkdir(parents=True, exist_ok=True)
    out = []
    per = -(-len(items) // shards)
    for s in range(shards):
        chunk = items[s * per:(s + 1) * per]
        ds = datasets.Dataset.from_dict({image_column: [{"bytes": i.data, "path": i.file_name} for i in chunk],
                                         caption_column: [i.caption for i in chunk]}, features=features)
        out.append(path / f"train-{s:05d}.parquet")
        ds.to_parquet(str(out[-1]))
    return out


def write_tar(path: Path, items: list[Item], shards: int = 2, json_field: str | None = None) -> list[Path]:
    """Webdataset-style shards: ``<name>.<ext>`` + ``<name>.txt`` (or ``<name>.json`` with ``json_field``)."""
    path.mkdir(parents=True, exist_ok=True)
    out = []
    per = -(-len(items) // shards)
    for s in range(shards):
        out.append(path / f"shard-{s:05d}.tar")
        with tarfile.open(out[-1], "w") as tar:
            for item in items[s * per:(s + 1) * per]:
                members = [(item.file_name, item.data)]
                if item.caption is not None:
                    if json_field is None:
                        members.append((item.name + ".txt", item.caption.encode()))
                    else:
                        members.append((item.name + ".json", json.dumps({json_field: item.caption}).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out
