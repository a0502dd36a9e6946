"""The embedding cache: round trip against live encoding, interrupted resume, settings/manifest mismatches, cached
training without encoders, and two processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from t2i_distill.conditioning import encode_image_posterior
from t2i_distill.data import DataConfig, TrainData, build_cache, encode_batch, load_cache_manifest
from t2i_distill.data.cache import CacheReader
from t2i_distill.data.loader import SKIP_BAD_IMAGE, SKIP_EMPTY_CAPTION, SKIP_MISSING_CAPTION
from t2i_distill.data.transforms import decode_image, image_to_tensor

R, T = 16, 24  # pixels; T5 tokens
REPO = Path(__file__).resolve().parents[3]


def _src(data_root, name="imagefolder", **kw) -> DataConfig:
    return DataConfig(dataset_name=str(data_root / name), resolution=R, **kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_root, hf_cache, tiny_flux_dir, tiny_models) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    te, vae = tiny_models
    build_cache(_src(data_root, cache_dir=hf_cache), out, str(tiny_flux_dir), max_sequence_length=T, dtype="fp32",
                batch_size=4, shard_size=7, text_encoders=te, vae=vae)
    return out


def test_manifest_records_the_setup_counts_and_skips(cache, tiny_flux_dir, items):
    m = load_cache_manifest(cache)
    assert (m.pretrained_model_name_or_path, m.resolution, m.max_sequence_length, m.dtype) == (
        str(tiny_flux_dir), R, T, "fp32")
    assert m.latent_storage == "posterior_mean_std"
    assert (m.latent_shape, m.prompt_embeds_shape, m.pooled_dim) == ([16, R // 8, R // 8], [T, 32], 32)
    assert (m.vae_shift_factor, m.vae_scaling_factor) == (0.1159, 0.3611)
    assert (m.num_source_records, m.num_records) == (24, sum(i.good for i in items))
    assert [s["num_source_records"] for s in m.shards] == [7, 7, 7, 3]
    assert m.skipped == {SKIP_BAD_IMAGE: 2, SKIP_EMPTY_CAPTION: 1, SKIP_MISSING_CAPTION: 1}
    assert sorted(m.skipped_examples[SKIP_BAD_IMAGE]) == ["img003.jpg", "img011.jpg"]
    reader = CacheReader(cache)
    assert [reader.load_item(j)["id"] for j in range(len(reader))] == [i.file_name for i in items if i.good]


def test_cached_batch_equals_the_live_batch_for_the_same_posterior_sample(cache, items, tiny_models):
    te, vae = tiny_models
    by_id = {i.file_name: i for i in items}
    cached = next(iter(TrainData(DataConfig(cached_dataset=str(cache)), batch_size=5, seed=4)))
    live = {"pixel_values": torch.stack([image_to_tensor(decode_image(by_id[i].data), R) for i in cached["ids"]]),
            "captions": [by_id[i].caption for i in cached["ids"]], "ids": cached["ids"]}
    assert cached["captions"] == live["captions"]
    mean, std = encode_image_posterior(vae, live["pixel_values"])
    torch.testing.assert_close(cached["latent_mean"], mean)
    torch.testing.assert_close(cached["latent_std"], std)
    from_live = encode_batch(live, te, vae, max_sequence_length=T, generator=torch.Generator().manual_seed(9))
    from_cache = encode_batch(cached, max_sequence_length=T, generator=torch.Generator().manual_seed(9))
    for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
        assert from_cache[key].shape == from_live[key].shape
        torch.testing.assert_close(from_cache[key], from_live[key])
    assert not torch.equal(from_cache["latents"], cached["latents"])  # the generator redrew ε


def test_cached_latents_are_fresh_each_batch_and_reproduced_on_resume(cache):
    data = TrainData(DataConfig(cached_dataset=str(cache)), batch_size=4, seed=1)
    it = iter(data)
    next(it)
    state = data.state_dict()
    second = next(it)
    resumed = TrainData(DataConfig(cached_dataset=str(cache)), batch_size=4, seed=1)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert again["ids"] == second["ids"] and torch.equal(again["latents"], second["latents"])
    later = [b for _, b in zip(range(5), it)][-1]  # the same record in a later epoch gets another ε
    shared = set(later["ids"]) & set(second["ids"])
    for id_ in shared:
        assert not torch.equal(later["latents"][later["ids"].index(id_)], second["latents"][second["ids"].index(id_)])


def test_interrupted_build_resumes_and_skips_finished_shards(tmp_path, data_root, tiny_flux_dir, tiny_models,
                                                             monkeypatch, cache):
    te, vae = tiny_models
    out, cfg = tmp_path / "c", _src(data_root, "tar")
    real_save, saves = safetensors.torch.save_file, []

    def save_then_die(tensors, filename, metadata=None):  # the third shard dies half-way through its write
        saves.append(filename)
        if len(saves) == 3:
            Path(filename).write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    kw = dict(max_sequence_length=T, dtype="fp32", batch_size=4, shard_size=5, text_encoders=te, vae=vae)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, out, str(tiny_flux_dir), **kw)
    assert sorted(p.name for p in out.iterdir()) == ["cache_plan.json", "shard-00000.safetensors",
                                                     "shard-00001.safetensors"]
    with pytest.raises(ValueError, match="is unfinished"):
        load_cache_manifest(out)
    (out / ".shard-00002.safetensors.999.tmp").write_bytes(b"left by a killed process")
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    encoded = []
    monkeypatch.setattr(te, "encode", lambda prompts, **k: encoded.extend(prompts) or type(te).encode(te, prompts,
                                                                                                         **k))
    m = build_cache(cfg, out, str(tiny_flux_dir), **kw)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01]*")} == finished
    captions = [p for p in encoded if p != " "]  # " ": MeanFlow's empty prompt, encoded once when the cache completes
    assert len(captions) == m.num_records - sum(s["num_records"] for s in m.shards[:2])  # only shards 2..4 encoded
    assert encoded.count(" ") == 1
    assert [s["file"] for s in m.shards] == [f"shard-{k:05d}.safetensors" for k in range(5)]
    reference = CacheReader(cache)  # the same records, encoded by another build: the same tensors
    by_id = {reference.load_item(j)["id"].split(".")[0]: reference.load_item(j) for j in range(len(reference))}
    reader = CacheReader(out)
    for j in range(len(reader)):
        item = reader.load_item(j)
        ref = by_id[item["id"].split("/")[1]]
        for key in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"):
            torch.testing.assert_close(item[key], ref[key])


def test_mismatches_are_refused_naming_every_field(cache, tiny_flux_dir, data_root, tiny_models):
    m = load_cache_manifest(cache)
    m.check_matches(pretrained_model_name_or_path=str(tiny_flux_dir) + "/.", resolution=R, max_sequence_length=T)
    with pytest.raises(ValueError) as err:
        m.check_matches(pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev", resolution=512,
                        max_sequence_length=256)
    for text in ("pretrained_model_name_or_path: cache", "resolution: cache 16, requested 512",
                 "max_sequence_length: cache 24, requested 256"):
        assert text in str(err.value)
    with pytest.raises(TypeError, match="unknown field"):
        m.check_matches(resolutoin=R)
    te, vae = tiny_models
    with pytest.raises(ValueError, match="other settings.*max_sequence_length: folder 24, this run 32"):
        build_cache(_src(data_root), cache, str(tiny_flux_dir), max_sequence_length=32, dtype="fp32",
                    shard_size=7, text_encoders=te, vae=vae)
    with pytest.raises(ValueError, match="not a cache"):
        load_cache_manifest(data_root)


def test_cached_training_imports_no_encoder_library(cache):
    code = ("import sys; from t2i_distill.data import DataConfig, TrainData; "
            f"b = next(iter(TrainData(DataConfig(cached_dataset={str(cache)!r}), batch_size=2))); "
            "assert b['latents'].shape == (2, 16, 2, 2), b['latents'].shape; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_two_processes_under_torchrun_share_the_work_without_gaps_or_duplicates(tmp_path, data_root, tiny_flux_dir,
                                                                                 items):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "t2i_distill.data.cache_cli", "cache", "--pretrained_model_name_or_path", str(tiny_flux_dir),
           "--dataset_name", str(data_root / "tar"), "--output_dir", str(out), "--resolution", str(R),
           "--max_sequence_length", str(T), "--dtype", "fp32", "--shard_size", "5", "--batch_size", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    # Shards k ≡ rank (mod 2): rank 0 encodes shards 0, 2, 4 (5 + 5 + 2 records), rank 1 shards 1, 3 (5 + 3).
    assert "rank 0: encoded 12 records" in log and "rank 1: encoded 8 records" in log
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [f"shard-{k:05d}.safetensors" for k in range(5)]
    assert "cache: " in log and "img/s" in log  # the progress bar (records/s, ETA), not a line per shard
    m = load_cache_manifest(out)
    reader = CacheReader(out)
    ids = [reader.load_item(j)["id"] for j in range(len(reader))]
    expected = [f"shard-{n // 12:05d}.tar/{i.name}" for n, i in enumerate(items) if i.good]
    assert ids == expected and m.num_source_records == len(items)
    assert json.loads((out / "cache_plan.json").read_text())["shard_size"] == 5


def test_the_cache_holds_the_empty_prompt_for_meanflow(tmp_path, tiny_models, cache):
    from t2i_distill.data import load_empty_prompt

    te, _ = tiny_models
    embeds, pooled = load_empty_prompt(cache)
    expected = te.encode([" "], max_sequence_length=embeds.shape[1])
    assert embeds.shape[0] == 1 and pooled.shape[0] == 1
    torch.testing.assert_close(embeds, expected.prompt_embeds.to(embeds.dtype))
    torch.testing.assert_close(pooled, expected.pooled_prompt_embeds.to(pooled.dtype))
    with pytest.raises(ValueError, match="empty_prompt"):
        load_empty_prompt(tmp_path)
