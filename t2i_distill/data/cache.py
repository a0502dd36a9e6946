"""The embedding cache: a dataset encoded once into safetensors shards + ``manifest.json``, read without any encoder.

**Layout** (``C/``): ``cache_plan.json`` (the settings, written first; a rerun with other settings is refused),
``shard-00000.safetensors`` ... and, once every shard exists, ``manifest.json`` (:class:`CacheManifest`). Shard ``k``
covers source records ``[k·S, (k+1)·S)`` (S = ``shard_size``, source order) and stores the usable ones as stacked
tensors ``latent_mean``, ``latent_std`` (K, C, R/8, R/8), ``prompt_embeds`` (K, T, D), ``pooled_prompt_embeds``
(K, P) in the cache dtype, with ids, captions, source indices and the skipped ids in its safetensors metadata.

**Posterior mean + std, not a fixed sample.** The reference draws a fresh VAE posterior sample at every step
(``latent_dist.sample()``, reference-spec §2.1); a cache of one fixed sample would silently change that training
signal into the same latent every epoch. Storing the posterior's mean and std (unscaled, z space) lets every step
draw ``((mean + std·ε) − shift)·scale`` as the reference does, for 2× the latent bytes, which at FLUX shapes is
+5.9% of a record (the T5 embeddings dominate: at 512 px in bf16, 2 × 131,072 B of latents + 2,097,152 B of T5 +
1,536 B pooled = 2,360,832 B per record).

**Resumable and crash-safe.** A shard is written to a temporary name, flushed to disk and renamed; only the final
name counts as finished, so an interrupted write never leaves a shard that loads, and a rerun skips finished shards.

**Multi-process.** Under ``torchrun``/``accelerate launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), rank ``r`` of
``w`` encodes shards ``k ≡ r (mod w)``: no record twice, none missing; rank 0 writes the manifest after a barrier
(gloo). A rerun may use another number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import torch

from t2i_distill.data.cache_format import (  # noqa: F401  (re-exported: the cache's public names live here too)
    CACHE_DTYPES,
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    EMPTY_PROMPT_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    TENSOR_KEYS,
    CacheManifest,
    CacheReader,
    load_cache_manifest,
    load_empty_prompt,
    shard_name,
)
from t2i_distill.data.config import DataConfig
from t2i_distill.data.loader import Skip, load_live_item, rank_and_world

__all__ = ["CACHE_DTYPES", "CacheManifest", "CacheReader", "build_cache", "load_cache_manifest", "load_empty_prompt"]

logger = logging.getLogger(__name__)

_SOURCE_FIELDS = ("dataset_name", "dataset_config_name", "dataset_split", "train_data_dir", "image_column",
                  "caption_column", "max_train_samples")
_EXAMPLES = 20


def _write_empty_prompt(root: Path, text_encoders, max_sequence_length: int, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    empty = text_encoders.encode([" "], max_sequence_length=max_sequence_length)
    tensors = {"prompt_embeds": empty.prompt_embeds.to("cpu", dtype).contiguous(),
               "pooled_prompt_embeds": empty.pooled_prompt_embeds.to("cpu", dtype).contiguous()}
    _atomic_write(root / EMPTY_PROMPT_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"prompt": " "}))


def _plan(cfg: DataConfig, model: str, revision, variant, max_sequence_length: int, dtype: str,
          shard_size: int) -> dict:
    return {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "pretrained_model_name_or_path": model,
            "revision": revision, "variant": variant, "resolution": cfg.resolution,
            "max_sequence_length": max_sequence_length, "dtype": dtype, "shard_size": shard_size,
            "source": {k: getattr(cfg, k) for k in _SOURCE_FIELDS}}


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename onto ``path``: readers see the old state or the complete file. The temporary
    name carries host and pid, so a later run can tell a dead writer's leftover (:func:`clean_stale_temporaries`)."""
    tmp = path.with_name(f".{path.name}.{_host()}-pid{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def clean_stale_temporaries(root: Path) -> list[Path]:
    """Remove temporary files a killed writer on this host left in ``root`` (its pid no longer runs); a live
    writer's, or another host's, are kept."""
    removed = []
    for tmp in root.glob(".*.tmp"):
        # ".<name>.<host>-pid<pid>.tmp", or an older ".<name>.<pid>.tmp" (this host's by assumption)
        match = re.search(r"\.(?:(?P<host>[A-Za-z0-9_-]+)-pid)?(?P<pid>\d+)\.tmp$", tmp.name)
        if not match or match.group("host") not in (None, _host()):
            continue
        try:
            os.kill(int(match.group("pid")), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _write_or_check_plan(root: Path, plan: dict) -> None:
    file = root / PLAN_FILE
    if file.is_file():
        old = json.loads(file.read_text())
        wrong = [f"{k}: folder {old.get(k)!r}, this run {plan[k]!r}" for k in plan if old.get(k) != plan[k]]
        if wrong:
            raise ValueError(f"`output_dir` {str(root)!r} holds a cache made with other settings (" + "; ".join(wrong)
                             + "); choose a new `output_dir`")
        return
    _atomic_write(file, lambda tmp: tmp.write_text(json.dumps(plan, indent=2)))


def _my_shards(source, streaming: bool, shard_size: int, rank: int, world: int, done, total: list):
    """(k, first source index, [(index, RawRecord), ...]) for this rank's unfinished shards; ``total[0]`` is set to
    the number of source records once known. Records of other shards are neither fetched (indexed) nor decoded."""
    if not streaming:
        n = len(source)
        total.append(n)
        for k in range(rank, math.ceil(n / shard_size), world):
            if not done(k):
                first = k * shard_size
                yield k, first, [(i, source[i]) for i in range(first, min(first + shard_size, n))]
        return
    group: list = []
    k_current, n = None, 0
    for i, record in enumerate(source.iter_records(0, None)):
        n = i + 1
        k = i // shard_size
        if k != k_current:
            if group:
                yield k_current, k_current * shard_size, group
            group, k_current = [], k
        if k % world == rank and not done(k):
            group.append((i, record))
    if group:
        yield k_current, k_current * shard_size, group
    total.append(n)


class _Decode(torch.utils.data.Dataset):
    """(source index, decoded item or Skip) of a shard's records, for DataLoader workers."""

    def __init__(self, records, resolution: int):
        self.records, self.resolution = records, resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j: int):
        index, record = self.records[j]
        return index, load_live_item(record, self.resolution)


def _decoded(records, resolution: int, workers: int):
    if workers == 0:
        return (_Decode(records, resolution)[j] for j in range(len(records)))
    return iter(torch.utils.data.DataLoader(_Decode(records, resolution), batch_size=None, num_workers=workers,
                                            collate_fn=lambda x: x))


def _encode_shard(records, resolution, text_encoders, vae, max_sequence_length, dtype, batch_size, workers):
    good, skipped = [], {}
    for index, item in _decoded(records, resolution, workers):
        if isinstance(item, Skip):
            skipped.setdefault(item.reason, []).append(item.id)
        else:
            good.append((index, item))
    from t2i_distill.conditioning import encode_image_posterior

    chunks = {k: [] for k in TENSOR_KEYS}
    for b in range(0, len(good), batch_size):
        items = [it for _, it in good[b:b + batch_size]]
        mean, std = encode_image_posterior(vae, torch.stack([it["pixel_values"] for it in items]))
        text = text_encoders.encode([it["caption"] for it in items], max_sequence_length=max_sequence_length)
        for key, value in zip(TENSOR_KEYS, (mean, std, text.prompt_embeds, text.pooled_prompt_embeds)):
            chunks[key].append(value.to(device="cpu", dtype=dtype).contiguous())
    return good, skipped, chunks


def _shapes(vae, text_encoders, resolution: int, max_sequence_length: int) -> dict[str, tuple[int, ...]]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (vae.config.latent_channels, resolution // factor, resolution // factor)
    return {"latent_mean": latent, "latent_std": latent,
            "prompt_embeds": (max_sequence_length, text_encoders.text_encoder_2.config.d_model),
            "pooled_prompt_embeds": (text_encoders.text_encoder.config.hidden_size,)}


def _barrier(world: int) -> bool:
    """Wait for every rank (gloo, env:// rendezvous of torchrun/accelerate); True when this call set up the group."""
    if world == 1:
        return False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:  # ranks encode equal shares; a long timeout only matters when one dies, and then the launcher stops all
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    dist.barrier()
    return created


def _write_manifest(root: Path, plan: dict, num_source: int, shard_size: int) -> CacheManifest:
    from safetensors import safe_open

    shards, skipped, examples, shapes, vae_factors = [], {}, {}, None, None
    for k in range(math.ceil(num_source / shard_size)):
        file = root / shard_name(k)
        if not file.is_file():
            raise RuntimeError(f"cache {str(root)!r}: {file.name} is missing after every rank finished")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
            shapes = shapes or {key: f.get_slice(key).get_shape()[1:] for key in TENSOR_KEYS}
            vae_factors = vae_factors or (float(meta["vae_shift_factor"]), float(meta["vae_scaling_factor"]))
        for reason, ids in json.loads(meta["skipped"]).items():
            skipped[reason] = skipped.get(reason, 0) + len(ids)
            examples.setdefault(reason, []).extend(ids[: _EXAMPLES - len(examples.get(reason, []))])
        shards.append({"file": file.name, "first_source_index": int(meta["first_source_index"]),
                       "num_source_records": int(meta["num_source_records"]),
                       "num_records": int(meta["num_records"])})
    num_records = sum(s["num_records"] for s in shards)
    if num_records == 0:
        raise ValueError(f"cache {str(root)!r}: every one of the {num_source} source records failed ({skipped}); "
                         f"check `image_column`/`caption_column` and the files")
    manifest = CacheManifest(
        **{k: plan[k] for k in ("pretrained_model_name_or_path", "revision", "variant", "resolution",
                                "max_sequence_length", "dtype", "shard_size", "source")},
        latent_shape=list(shapes["latent_mean"]), prompt_embeds_shape=list(shapes["prompt_embeds"]),
        pooled_dim=int(shapes["pooled_prompt_embeds"][0]),
        vae_shift_factor=vae_factors[0], vae_scaling_factor=vae_factors[1], num_source_records=num_source,
        num_records=num_records, shards=shards, skipped=skipped, skipped_examples=examples)
    _atomic_write(root / MANIFEST_FILE, lambda tmp: tmp.write_text(manifest.to_json()))
    return manifest


def _load_models(model: str, dtype: torch.dtype, device, revision, variant, vae: bool = True):
    from diffusers import AutoencoderKL

    from t2i_distill.conditioning import TextEncoders

    text_encoders = TextEncoders.from_pretrained(model, dtype=dtype, device=device, revision=revision,
                                                 variant=variant)
    if not vae:
        return text_encoders, None
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype, revision=revision,
                                        variant=variant).to(device).eval().requires_grad_(False)
    return text_encoders, vae


def build_cache(cfg: DataConfig, output_dir: str | os.PathLike, pretrained_model_name_or_path: str, *,
                max_sequence_length: int = 256, dtype: str = "auto", batch_size: int = 8, shard_size: int = 256,
                device: str | torch.device | None = None, revision: str | None = None, variant: str | None = None,
                rank: int | None = None, world_size: int | None = None, text_encoders=None,
                vae=None) -> CacheManifest:
    """Encode ``cfg``'s dataset into ``output_dir`` (see the module docstring); returns the manifest on every rank.

    The encoders and the VAE are loaded from ``pretrained_model_name_or_path`` in ``dtype`` on ``device`` (default
    ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU) unless given; they run in ``batch_size`` images and store
    in ``dtype`` (``bf16``, ``fp16``, ``fp32``; ``auto``: bf16 on CUDA as the reference, fp32 on CPU, where bf16
    convolutions ran 12× slower than fp32 in our measurement). Only a rank with unfinished shards
    loads them. ``cfg.dataloader_num_workers`` processes decode and resize the images. ``rank``/``world_size``
    default to the launcher's environment variables. The returned manifest also carries ``encode_stats`` (this
    rank's encoded records and seconds; not saved).
    """
    if dtype != "auto" and dtype not in CACHE_DTYPES:
        raise ValueError(f"`dtype`: expected 'auto' or one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    for name, value in (("max_sequence_length", max_sequence_length), ("batch_size", batch_size),
                        ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}`: expected a positive int, got {value!r}")
    if cfg.cached_dataset is not None:
        raise ValueError("`cached_dataset`: expected None when building a cache (name the source dataset instead), "
                         f"got {cfg.cached_dataset!r}")
    rank, world = rank_and_world(rank, world_size)
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if dtype == "auto":
        dtype = "bf16" if torch.device(device).type == "cuda" else "fp32"
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in clean_stale_temporaries(root):
        logger.info("removed %s, left by an interrupted cache run", stale.name)
    plan = _plan(cfg, pretrained_model_name_or_path, revision, variant, max_sequence_length, dtype, shard_size)
    _write_or_check_plan(root, plan)
    if (root / MANIFEST_FILE).is_file():
        from t2i_distill.data.cache_format import broken_shards

        manifest = load_cache_manifest(root, check_files=False)
        broken = broken_shards(root, manifest)
        if not broken:
            logger.info("cache %s is complete; nothing to do", root)
            manifest.encode_stats = {"rank": rank, "encoded_records": 0, "seconds": 0.0}
            return manifest
        # A shard lost or damaged after the cache was finished: re-encode exactly those (the others are kept).
        logger.warning("cache %s: re-encoding %d damaged shard(s): %s", root, len(broken),
                       "; ".join(f"{path.name} ({why})" for path, why in broken))
        _barrier(world)  # every rank has read the manifest before rank 0 removes anything
        if rank == 0:
            for path, _ in broken:
                path.unlink(missing_ok=True)
            (root / MANIFEST_FILE).unlink()
        _barrier(world)

    from t2i_distill.data.sources import open_source

    source = open_source(cfg)
    torch_dtype, total, encoded, started = CACHE_DTYPES[dtype], [], 0, time.perf_counter()
    from tqdm.auto import tqdm

    try:
        expected = None if cfg.streaming else -(-len(source) // world)  # this rank's share, rounded up
    except TypeError:
        expected = None
    # One bar per run on rank 0 (its share; every rank encodes about as much): records/s and an ETA.
    progress = tqdm(total=expected, desc="cache", unit="img", disable=rank != 0, dynamic_ncols=True)
    for k, first, records in _my_shards(source, cfg.streaming, shard_size, rank, world,
                                        lambda k: (root / shard_name(k)).is_file(), total):
        if text_encoders is None or vae is None:
            text_encoders, vae = _load_models(pretrained_model_name_or_path, torch_dtype, device, revision, variant)
        good, skipped, chunks = _encode_shard(records, cfg.resolution, text_encoders, vae, max_sequence_length,
                                              torch_dtype, batch_size, cfg.dataloader_num_workers)
        shapes = _shapes(vae, text_encoders, cfg.resolution, max_sequence_length)
        tensors = {key: torch.cat(chunks[key]).contiguous() if chunks[key]
                   else torch.zeros((0, *shapes[key]), dtype=torch_dtype) for key in TENSOR_KEYS}
        meta = {"format": CACHE_FORMAT, "first_source_index": str(first), "num_source_records": str(len(records)),
                "num_records": str(len(good)), "ids": json.dumps([it["id"] for _, it in good]),
                "captions": json.dumps([it["caption"] for _, it in good]),
                "source_indices": json.dumps([i for i, _ in good]), "skipped": json.dumps(skipped),
                "vae_shift_factor": repr(float(getattr(vae.config, "shift_factor", None) or 0.0)),
                "vae_scaling_factor": repr(float(vae.config.scaling_factor))}
        from safetensors.torch import save_file

        _atomic_write(root / shard_name(k), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        encoded += len(good)
        for reason, ids in skipped.items():
            logger.warning("rank %d, %s: skipped %d record(s) (%s): %s%s", rank, shard_name(k), len(ids), reason,
                           ", ".join(ids[:5]), " ..." if len(ids) > 5 else "")
        logger.debug("rank %d: wrote %s (%d records, %d skipped)", rank, shard_name(k), len(good),
                     sum(map(len, skipped.values())))
        progress.update(len(records))
        progress.set_postfix(shard=shard_name(k), skipped=sum(map(len, skipped.values())))
    progress.close()
    elapsed = time.perf_counter() - started
    if total[0] == 0:
        raise ValueError(f"{source.description}: the source holds no records")
    created = _barrier(world)
    try:
        if rank == 0:
            if text_encoders is None:  # every shard of rank 0 was already finished by an earlier run
                text_encoders, _ = _load_models(pretrained_model_name_or_path, torch_dtype, device, revision,
                                                variant, vae=False)
            _write_empty_prompt(root, text_encoders, max_sequence_length, torch_dtype)
            manifest = _write_manifest(root, plan, total[0], shard_size)
        _barrier(world)
        manifest = load_cache_manifest(root)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    manifest.encode_stats = {"rank": rank, "encoded_records": encoded, "seconds": elapsed}
    return manifest
