"""The synthetic shapes dataset: deterministic, balanced, captions right, drawn as specified, imagefolder layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from t2i_distill.eval.shapes import (
    BACKGROUND,
    PALETTE,
    ShapeScene,
    draw_scene,
    mini_geneval_metadata,
    scene_for_index,
    write_shapes_dataset,
)


def test_captions():
    assert ShapeScene("circle", "red", 2).caption == "two red circles"
    assert ShapeScene("square", "blue", 1).caption == "one blue square"
    assert ShapeScene("triangle", "yellow", 4).caption == "four yellow triangles"


def test_any_48_consecutive_images_cover_every_scene_once():
    scenes = {scene_for_index(i) for i in range(48, 96)}
    assert len(scenes) == 48
    assert {s.count for s in scenes} == {1, 2, 3, 4} and {s.color for s in scenes} == set(PALETTE)


def test_drawing_has_the_scene_pixels_and_nothing_else():
    scene = ShapeScene("square", "green", 3)
    image, boxes = draw_scene(scene, 64, seed=5)
    pixels = np.asarray(image)
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert colours == {BACKGROUND, PALETTE["green"]}  # plain background, one flat colour, no anti-aliasing
    assert len(boxes) == 3
    green = (pixels == PALETTE["green"]).all(axis=2)
    assert green.sum() == sum(side * side for _, _, side in boxes)  # squares fill their boxes exactly
    for i, (x, y, s) in enumerate(boxes):  # boxes never touch: at least the gap apart
        for x2, y2, s2 in boxes[i + 1:]:
            assert x + s + 4 <= x2 or x2 + s2 + 4 <= x or y + s + 4 <= y2 or y2 + s2 + 4 <= y


def test_same_seed_same_image_and_different_seed_different_layout():
    scene = ShapeScene("circle", "red", 2)
    a, b, c = (np.asarray(draw_scene(scene, 64, seed)[0]) for seed in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_imagefolder_layout_and_independence_from_dataset_size(tmp_path):
    small = write_shapes_dataset(tmp_path / "small", num_images=3, resolution=64, seed=7)
    large = write_shapes_dataset(tmp_path / "large", num_images=5, resolution=64, seed=7)
    rows = [json.loads(line) for line in (small / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert rows[1] == {"file_name": "00001.png", "text": "two red circles", "shape": "circle", "color": "red",
                       "count": 2}
    for name in ("00000.png", "00002.png"):
        assert (small / name).read_bytes() == (large / name).read_bytes()
    with pytest.raises(FileExistsError, match="output_dir"):
        write_shapes_dataset(small, num_images=1)


def test_imagefolder_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = write_shapes_dataset(tmp_path / "ds", num_images=4, resolution=32, seed=0)
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert sorted(ds["text"]) == sorted(scene_for_index(i).caption for i in range(4))
    assert ds[0]["image"].size == (32, 32)


def test_mini_geneval_metadata_format():
    rows = mini_geneval_metadata(per_task=3)
    assert [r["tag"] for r in rows] == ["single_object"] * 3 + ["colors"] * 3 + ["counting"] * 3
    for row in rows:
        assert set(row) <= {"tag", "include", "exclude", "prompt"}
        (req,) = row["include"]
        words = row["prompt"].split()
        assert req["class"] in row["prompt"] and words[0] in ("one", "two", "three", "four")
        if row["tag"] == "colors":
            assert req["color"] == words[1]
        if row["tag"] == "counting":
            assert row["exclude"] == [{"class": req["class"], "count": req["count"] + 1}] and req["count"] >= 2
    assert json.loads(json.dumps(rows)) == rows


@pytest.mark.parametrize(("call", "match"), [
    (lambda: ShapeScene("star", "red", 1), "shape"),
    (lambda: ShapeScene("circle", "pink", 1), "color"),
    (lambda: ShapeScene("circle", "red", 5), "count"),
    (lambda: draw_scene(ShapeScene("circle", "red", 1), 16), "resolution"),
    (lambda: scene_for_index(-1), "index"),
    (lambda: mini_geneval_metadata(0), "per_task"),
])
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()
