"""``t2i-distill cache`` in one process: flags reach build_cache, decoding workers and streaming give the same cache."""

from __future__ import annotations

import pytest

from t2i_distill.data.cache import CacheReader, load_cache_manifest
from t2i_distill.data.cache_cli import main


@pytest.mark.parametrize("extra", [["--dataloader_num_workers", "2"], ["--streaming"]])
def test_cache_command_builds_the_same_records_with_workers_or_streaming(tmp_path, data_root, tiny_flux_dir, items,
                                                                         capsys, extra):
    out = tmp_path / "c"
    argv = ["cache", "--pretrained_model_name_or_path", str(tiny_flux_dir), "--dataset_name", str(data_root / "tar"),
            "--output_dir", str(out), "--resolution", "16", "--max_sequence_length", "8", "--dtype", "fp32",
            "--shard_size", "9", "--max_train_samples", "18", *extra]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    good = [f"shard-{n // 12:05d}.tar/{i.name}" for n, i in enumerate(items[:18]) if i.good]
    assert f"rank 0: encoded {len(good)} records" in printed and f"{len(good)} of 18 records in 2 shards" in printed
    m = load_cache_manifest(out)
    assert (m.max_sequence_length, m.source["max_train_samples"], m.dtype) == (8, 18, "fp32")
    reader = CacheReader(out)
    assert [reader.load_item(j)["id"] for j in range(len(reader))] == good
    assert main(argv) == 0  # a rerun of a complete cache does nothing
    assert "encoded 0 records" in capsys.readouterr().out
