"""TrainData: pixels, determinism, disjoint rank shares, per-epoch reshuffles, skips, resume, workers, streaming."""

from __future__ import annotations

import logging
from itertools import islice

import pytest
import torch

from t2i_distill.data import DataConfig, TrainData
from t2i_distill.data.loader import SKIP_BAD_IMAGE, SKIP_EMPTY_CAPTION, SKIP_MISSING_CAPTION
from t2i_distill.data.transforms import decode_image, image_to_tensor
from tests.t2i_distill.data.datagen import make_items, write_tar

R = 16


def _cfg(data_root, name="tar", **kw) -> DataConfig:
    return DataConfig(dataset_name=str(data_root / name), resolution=R, **kw)


def _ids(data: TrainData, batches: int) -> list[str]:
    return [i for b in islice(iter(data), batches) for i in b["ids"]]


def _one_epoch_ids(data: TrainData) -> list[str]:
    """The ids a rank yields in epoch 0 (batch size 1, stop at the first epoch change)."""
    out = []
    for batch in data:
        out += batch["ids"]
        if data.epoch == 1:
            return out


@pytest.mark.parametrize("name", ["imagefolder", "parquet", "tar"])
def test_batches_hold_the_reference_transform_of_the_named_images(data_root, items, hf_cache, name):
    by_id = {"imagefolder": {i.file_name: i for i in items},
             "parquet": {f"row{n}:{i.file_name}": i for n, i in enumerate(items)},
             "tar": {f"shard-{n // 12:05d}.tar/{i.name}": i for n, i in enumerate(items)}}[name]
    data = TrainData(_cfg(data_root, name, cache_dir=hf_cache), batch_size=4, seed=3)
    batch = next(iter(data))
    assert batch["pixel_values"].shape == (4, 3, R, R) and batch["pixel_values"].dtype == torch.float32
    for pixels, caption, id_ in zip(batch["pixel_values"], batch["captions"], batch["ids"]):
        assert by_id[id_].good and caption == by_id[id_].caption
        torch.testing.assert_close(pixels, image_to_tensor(decode_image(by_id[id_].data), R), rtol=0, atol=0)


def test_order_is_deterministic_given_the_seed_and_reshuffled_per_epoch(data_root, items):
    a = _ids(TrainData(_cfg(data_root), batch_size=4, seed=7), 10)
    assert a == _ids(TrainData(_cfg(data_root), batch_size=4, seed=7), 10)
    assert a != _ids(TrainData(_cfg(data_root), batch_size=4, seed=8), 10)
    good = sorted(f"shard-{n // 12:05d}.tar/{i.name}" for n, i in enumerate(items) if i.good)
    epoch0, epoch1 = a[:len(good)], a[len(good):2 * len(good)]
    assert sorted(epoch0) == good and sorted(epoch1) == good and epoch0 != epoch1  # each epoch: everyone once


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_are_disjoint_and_cover_every_record(data_root, items, world):
    shares = [_one_epoch_ids(TrainData(_cfg(data_root), batch_size=1, seed=5, rank=r, world_size=world))
              for r in range(world)]
    everything = [i for s in shares for i in s]
    assert len(everything) == len(set(everything)) == sum(i.good for i in items)


def test_skips_are_counted_by_reason_and_logged_by_id(data_root, caplog):
    data = TrainData(_cfg(data_root), batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="t2i_distill.data.loader"):
        _one_epoch_ids(TrainData(_cfg(data_root), batch_size=1, seed=0))
        for _ in islice(iter(data), 5):  # 20 good records = exactly epoch 0
            pass
    assert data.skipped == {SKIP_BAD_IMAGE: 2, SKIP_EMPTY_CAPTION: 1, SKIP_MISSING_CAPTION: 1}
    assert sorted(data.skipped_examples[SKIP_BAD_IMAGE]) == ["shard-00000.tar/img003", "shard-00000.tar/img011"]
    assert data.skipped_examples[SKIP_EMPTY_CAPTION] == ["shard-00000.tar/img005"]
    assert "skipping shard-00000.tar/img008: missing caption" in caplog.text


def test_a_source_where_everything_fails_raises(tmp_path):
    write_tar(tmp_path / "bad", make_items(6, corrupt=tuple(range(6)), empty=(), missing=()), shards=1)
    data = TrainData(DataConfig(dataset_name=str(tmp_path / "bad"), resolution=R), batch_size=2)
    with pytest.raises(ValueError, match=r"every record of rank 0's share failed.*image failed to decode': 6"):
        next(iter(data))
    with pytest.raises(ValueError, match="cannot be shared by 8 ranks"):
        TrainData(DataConfig(dataset_name=str(tmp_path / "bad"), resolution=R), batch_size=2, rank=7, world_size=8)


@pytest.mark.parametrize(("name", "streaming"), [("tar", False), ("tar", True), ("parquet", True)])
def test_resume_continues_with_the_next_unseen_batch(data_root, hf_cache, name, streaming):
    cfg = _cfg(data_root, name, streaming=streaming, cache_dir=hf_cache)
    full = TrainData(cfg, batch_size=3, seed=11, rank=1, world_size=2)
    it = iter(full)
    first = [next(it) for _ in range(5)]  # crosses the epoch boundary (10 good records per rank)
    state = full.state_dict()
    rest = [next(it)["ids"] for _ in range(4)]
    resumed = TrainData(cfg, batch_size=3, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [b["ids"] for b in islice(iter(resumed), 4)] == rest
    assert resumed.skipped == full.skipped and len(first) == 5
    with pytest.raises(ValueError, match="seed: state 11, this loader 12"):
        TrainData(cfg, batch_size=3, seed=12, rank=1, world_size=2).load_state_dict(state)


def test_workers_give_the_same_stream_and_resume_point(data_root):
    plain = TrainData(_cfg(data_root), batch_size=3, seed=2)
    workers = TrainData(_cfg(data_root, dataloader_num_workers=2), batch_size=3, seed=2)
    it_plain, it_workers = iter(plain), iter(workers)
    for _ in range(4):
        a, b = next(it_plain), next(it_workers)
        assert a["ids"] == b["ids"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert plain.state_dict() == workers.state_dict()  # prefetched records are not counted


def test_streaming_shares_are_disjoint_and_reshuffled_per_epoch(data_root, hf_cache, items):
    cfg = _cfg(data_root, "parquet", streaming=True, cache_dir=hf_cache)
    shares = [_one_epoch_ids(TrainData(cfg, batch_size=1, seed=5, rank=r, world_size=2)) for r in range(2)]
    everything = [i for s in shares for i in s]
    assert len(everything) == len(set(everything)) == sum(i.good for i in items)
    good = sum(i.good for i in items)
    a = _ids(TrainData(cfg, batch_size=good, seed=5), 2)  # two epochs of one rank
    assert sorted(a[:good]) == sorted(a[good:]) and a[:good] != a[good:]


def test_rank_and_world_come_from_the_launcher_environment(data_root, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    data = TrainData(_cfg(data_root), batch_size=2)
    assert (data.rank, data.world_size, data.share) == (1, 3, 8)
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size, got rank 3, world 3"):
        TrainData(_cfg(data_root), batch_size=2, rank=3)
    with pytest.raises(ValueError, match="`batch_size`: expected a positive int, got 0"):
        TrainData(_cfg(data_root), batch_size=0)
