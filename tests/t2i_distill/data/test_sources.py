"""Every source kind on generated data, the column options, and the hub dispatch (without a network)."""

from __future__ import annotations

import datasets
import pytest

from t2i_distill.data.config import DataConfig
from t2i_distill.data.sources import RawRecord, open_source, resolve_source
from t2i_distill.data.transforms import decode_image
from tests.t2i_distill.data.datagen import write_imagefolder, write_parquet, write_tar


def _records(cfg: DataConfig) -> list[RawRecord]:
    source = open_source(cfg)
    if cfg.streaming:
        return list(source.iter_records(0, None))
    return [source[i] for i in range(len(source))]


def _check_against_items(records: list[RawRecord], items, id_of) -> None:
    assert [r.id for r in records] == [id_of(i, item) for i, item in enumerate(items)]
    assert [r.caption for r in records] == [item.caption for item in items]
    for record, item in zip(records, items):
        if not item.corrupt:
            assert decode_image(record.image).size == decode_image(item.data).size


ID_OF = {
    "imagefolder": lambda i, item: item.file_name,
    "parquet": lambda i, item: f"row{i}:{item.file_name}",
    "tar": lambda i, item: f"shard-{i // 12:05d}.tar/{item.name}",
}
KIND = {"imagefolder": "datasets_dir", "parquet": "parquet", "tar": "tar"}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", ["imagefolder", "parquet", "tar"])
def test_every_local_source_kind_reads_every_record_in_order(data_root, items, hf_cache, name, streaming):
    cfg = DataConfig(dataset_name=str(data_root / name), streaming=streaming, cache_dir=hf_cache, resolution=16)
    assert resolve_source(cfg).kind == KIND[name]
    _check_against_items(_records(cfg), items, ID_OF[name])


def test_train_data_dir_globs_and_max_train_samples(data_root, items, hf_cache):
    cfg = DataConfig(train_data_dir=str(data_root / "imagefolder"), cache_dir=hf_cache, max_train_samples=5)
    assert resolve_source(cfg).kind == "imagefolder"
    _check_against_items(_records(cfg), items[:5], ID_OF["imagefolder"])
    one_shard = DataConfig(dataset_name=str(data_root / "tar" / "shard-00001.tar"))
    assert resolve_source(one_shard).files == [str(data_root / "tar" / "shard-00001.tar")]
    _check_against_items(_records(one_shard), items[12:], lambda i, item: f"shard-00001.tar/{item.name}")
    glob_cfg = DataConfig(dataset_name=str(data_root / "parquet" / "*.parquet"), cache_dir=hf_cache)
    assert resolve_source(glob_cfg).kind == "parquet"
    _check_against_items(_records(glob_cfg), items, ID_OF["parquet"])


def test_column_options_csv_metadata_and_json_tar_captions(tmp_path, items, hf_cache):
    write_imagefolder(tmp_path / "csv", items, caption_column="llava", fmt="csv")
    cfg = DataConfig(dataset_name=str(tmp_path / "csv"), caption_column="llava", cache_dir=hf_cache)
    records = _records(cfg)
    assert [r.caption for r in records if r.caption] == [i.caption for i in items if i.caption]
    write_parquet(tmp_path / "pq", items, image_column="jpg", caption_column="prompt", shards=1)
    cfg = DataConfig(dataset_name=str(tmp_path / "pq"), image_column="jpg", caption_column="prompt",
                     cache_dir=hf_cache)
    _check_against_items(_records(cfg), items, ID_OF["parquet"])
    write_tar(tmp_path / "tar", items, json_field="llava")
    cfg = DataConfig(dataset_name=str(tmp_path / "tar"), caption_column="llava")
    _check_against_items(_records(cfg), items, ID_OF["tar"])


def test_missing_columns_are_named_with_the_available_ones(data_root, hf_cache):
    cfg = DataConfig(dataset_name=str(data_root / "parquet"), caption_column="llava", cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"`caption_column`='llava' not among its columns \['image', 'text'\]"):
        open_source(cfg)


def test_a_hub_id_goes_to_load_dataset_and_nothing_else_does(monkeypatch, data_root, hf_cache, items):
    calls = []
    features = datasets.Features({"image": datasets.Image(), "llava": datasets.Value("string")})
    tiny = datasets.Dataset.from_dict({"image": [{"bytes": items[0].data, "path": None}], "llava": ["a cat"]},
                                      features=features)

    def load_dataset(path, name=None, **kwargs):  # records the call; the network does not exist here
        calls.append((path, name, kwargs))
        return tiny

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(dataset_name="brivangl/midjourney-v6-llava", dataset_config_name="default",
                     caption_column="llava", cache_dir=hf_cache)
    assert resolve_source(cfg).kind == "hub"
    assert [(r.id, r.caption) for r in _records(cfg)] == [("row0", "a cat")]
    assert calls == [("brivangl/midjourney-v6-llava", "default",
                      {"split": "train", "streaming": False, "cache_dir": hf_cache})]
    calls.clear()
    _records(DataConfig(dataset_name=str(data_root / "tar")))  # a local path never reaches load_dataset
    assert calls == []


@pytest.mark.parametrize("name", ["./no/such/folder", "/abs/missing", "missing.parquet", "a/b/c", "bad id!"])
def test_a_missing_local_path_is_an_error_not_a_hub_lookup(name):
    with pytest.raises(ValueError, match="neither an existing local path nor a hub id"):
        resolve_source(DataConfig(dataset_name=name))


def test_empty_glob_and_mixed_file_kinds_are_errors(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        resolve_source(DataConfig(dataset_name=str(tmp_path / "*.tar")))
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"one kind\), got \['.parquet', '.tar'\]"):
        resolve_source(DataConfig(dataset_name=str(tmp_path / "*")))


def test_buffer_shuffle_is_a_reproducible_permutation_per_epoch():
    from t2i_distill.data.sources import buffer_shuffle

    records = [RawRecord(str(i), None, "c") for i in range(50)]

    def order(seed, epoch):
        return [r.id for r in buffer_shuffle(iter(records), seed, epoch, buffer_size=8)]

    assert sorted(order(1, 0), key=int) == [r.id for r in records]
    assert order(1, 0) == order(1, 0) and order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert order(None, 0) == [r.id for r in records]
    assert max(int(i) - n for n, i in enumerate(order(1, 0))) < 8  # a record leaves at most 7 places early


def test_a_hub_stream_without_declared_columns_is_checked_on_its_first_row(monkeypatch, items):
    def rows():
        yield {"image": {"bytes": items[0].data, "path": None}, "llava": "a cat", "extra": 1}

    stream = datasets.IterableDataset.from_generator(rows)
    assert not stream.column_names  # nothing declared: the check must wait for a row
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream)
    cfg = DataConfig(dataset_name="owner/stream", caption_column="llava", streaming=True)
    assert [(r.id, r.caption) for r in _records(cfg)] == [("row0", "a cat")]
    bad = DataConfig(dataset_name="owner/stream", caption_column="text", streaming=True)
    with pytest.raises(ValueError, match=r"'text' not among its columns \['image', 'llava', 'extra'\]"):
        _records(bad)
