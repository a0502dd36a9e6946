"""``TrainData``: deterministic, rank-sharded, resumable batches, live (pixels + captions) or from a cache.

**Order.** Each rank reads an infinite stream of *positions*: epoch 0 of its share, then epoch 1, ... For an indexed
source of N records, epoch ``e`` is ``torch.randperm(N, generator=seed + e)`` and rank ``r`` of ``w`` takes every
``w``-th entry from ``r`` (``perm[r::w]``): shares are disjoint and together cover every record once per epoch. A
streaming source is read in its (buffer-shuffled) order and rank ``r`` keeps the records whose stream index is
``≡ r (mod w)``. A batch is the next ``batch_size`` *usable* records of the stream, so it may span an epoch boundary;
nothing is dropped.

**Skips.** A record whose image does not decode, or whose caption is missing/empty (not a str, or only whitespace),
is skipped and counted (``skipped``: reason → count, ``skipped_examples``: reason → first few ids; each new id is
logged at WARNING, and each epoch's counts at INFO). A rank whose whole epoch share fails raises ``ValueError``.

**Resume.** ``state_dict()`` is (epoch, offset in the rank's epoch share) just after the last record of the last
batch returned, plus the counters; ``load_state_dict`` before iterating continues with the next unseen record: no
repeats, no skips. Records prefetched by workers but not yet returned are not counted. A streaming source resumes by
re-reading (not decoding) the epoch up to the offset.

**Workers.** ``dataloader_num_workers > 0`` decodes in a ``torch.utils.data.DataLoader``: worker ``k`` of ``n``
handles positions ``≡ k (mod n)`` and the loader returns them in position order, so the stream and therefore every
batch are the same for any number of workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from t2i_distill.data.config import DataConfig
from t2i_distill.data.transforms import decode_image, image_to_tensor

__all__ = ["TrainData", "SKIP_BAD_IMAGE", "SKIP_EMPTY_CAPTION", "SKIP_MISSING_CAPTION", "SKIP_MISSING_IMAGE",
           "load_live_item", "rank_and_world"]

logger = logging.getLogger(__name__)

SKIP_BAD_IMAGE = "image failed to decode"
SKIP_MISSING_IMAGE = "missing image"
SKIP_MISSING_CAPTION = "missing caption"
SKIP_EMPTY_CAPTION = "empty caption"
_EXAMPLES_PER_REASON = 5
STATE_VERSION = 1


@dataclass
class Skip:
    """A record the loader could not use: why, and which."""

    reason: str
    id: str


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun/accelerate's ``RANK``/``WORLD_SIZE`` environment variables, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"`{name}`: expected an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"`rank`/`world_size`: expected 0 <= rank < world_size, got rank {rank}, world {world_size}")
    return rank, world_size


def load_live_item(record, resolution: int) -> dict | Skip:
    """A raw record → ``{"pixel_values": (3, R, R) float32 in [-1, 1], "caption", "id"}`` or a :class:`Skip`."""
    caption = record.caption
    if not isinstance(caption, str):
        return Skip(SKIP_MISSING_CAPTION, record.id)
    if not caption.strip():
        return Skip(SKIP_EMPTY_CAPTION, record.id)
    if record.image is None:
        return Skip(SKIP_MISSING_IMAGE, record.id)
    try:
        pixels = image_to_tensor(decode_image(record.image), resolution)
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError... all mean "unusable"
        return Skip(SKIP_BAD_IMAGE, record.id)
    return {"pixel_values": pixels, "caption": caption, "id": record.id}


class _Stream(torch.utils.data.IterableDataset):
    """(epoch, offset after the item, item) for a rank's positions from (epoch, offset) on; worker k of n only
    loads positions ≡ k (mod n), and the DataLoader's round-robin returns them in order."""

    def __init__(self, data: "TrainData", epoch: int, offset: int):
        self.data, self.epoch, self.offset = data, epoch, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        q = 0
        for epoch, offset, load in self.data._positions(self.epoch, self.offset):
            if q % workers == worker:
                yield epoch, offset, load()
            q += 1


class TrainData:
    """Infinite batches for one rank (see the module docstring for order, skips, resume and workers).

    Live batches: ``{"pixel_values": (B, 3, R, R) float32 in [-1, 1], "captions": list[str], "ids": list[str]}``.
    Cached batches (``cfg.cached_dataset``): ``{"latents": (B, C, R/8, R/8), "latent_mean", "latent_std" (same
    shape), "prompt_embeds": (B, T, D), "pooled_prompt_embeds": (B, P), "captions", "ids", "vae_shift_factor",
    "vae_scaling_factor"}`` in the cache's dtype; ``latents = ((mean + std·ε) − shift)·scale`` is a fresh posterior
    sample per batch, ε drawn from a generator seeded by (seed, rank, stream position), so a resumed run redraws the
    same ε. No text encoder or VAE is loaded in cached mode (nor is diffusers/transformers imported).
    """

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        if not isinstance(cfg, DataConfig):
            raise TypeError(f"`cfg`: expected a DataConfig, got {type(cfg).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size`: expected a positive int, got {batch_size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"`seed`: expected an int >= 0, got {seed!r}")
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.manifest = None
        if cfg.cached_dataset is not None:
            from t2i_distill.data.cache_format import CacheReader

            self.source = CacheReader(cfg.cached_dataset)
            self.manifest = self.source.manifest
            self.cached = True
        else:
            from t2i_distill.data.sources import open_source

            self.source = open_source(cfg)
            self.cached = False
        self.indexed = hasattr(self.source, "__getitem__") and not cfg.streaming or self.cached
        if self.indexed:
            self.num_records = len(self.source)
            self.share = len(range(self.rank, self.num_records, self.world_size))
            if self.share == 0:
                raise ValueError(f"{self.source.description}: {self.num_records} records cannot be shared by "
                                 f"{self.world_size} ranks (rank {self.rank} would get none)")
        else:
            self.num_records = self.share = None
        self.epoch, self.offset, self.position, self.epoch_good, self.batches = 0, 0, 0, 0, 0
        self.skipped: dict[str, int] = {}
        self.skipped_examples: dict[str, list[str]] = {}
        self._epoch_skipped: dict[str, int] = {}
        self._perm: tuple[int, torch.Tensor] | None = None

    # -- order ------------------------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.num_records, generator=gen)[self.rank::self.world_size])
        return self._perm[1]

    def _load(self, record_or_index):
        if self.cached:
            return self.source.load_item(int(record_or_index))
        record = self.source[int(record_or_index)] if self.indexed else record_or_index
        return load_live_item(record, self.cfg.resolution)

    def _positions(self, epoch: int, offset: int) -> Iterator[tuple[int, int, callable]]:
        """(epoch, offset, loader) of the item after each position, forever, from (epoch, offset)."""
        while True:
            if self.indexed:
                perm = self._permutation(epoch)
                for o in range(offset, self.share):
                    index = perm[o]
                    nxt = (epoch, o + 1) if o + 1 < self.share else (epoch + 1, 0)
                    yield *nxt, (lambda index=index: self._load(index))
            else:
                # One record of lookahead, so that the epoch's last record already carries (epoch + 1, 0), as in
                # the indexed case: a state saved after it resumes at the next epoch.
                mine = (r for i, r in enumerate(self.source.iter_records(epoch, self.seed))
                        if i % self.world_size == self.rank)
                previous = None
                for o, record in enumerate(mine):
                    if previous is not None and o > offset:
                        yield epoch, o, (lambda record=previous: self._load(record))
                    previous = record
                if previous is None:
                    raise ValueError(f"{self.source.description}: rank {self.rank} of {self.world_size} got no "
                                     f"record in epoch {epoch}")
                if offset < o + 1:
                    yield epoch + 1, 0, (lambda record=previous: self._load(record))
            epoch, offset = epoch + 1, 0

    def _items(self):
        stream = _Stream(self, self.epoch, self.offset)
        workers = self.cfg.dataloader_num_workers
        if workers == 0:
            return iter(stream)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                collate_fn=lambda x: x, persistent_workers=False))

    # -- iteration --------------------------------------------------------------------------------------------
    def _record_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
        self._epoch_skipped[skip.reason] = self._epoch_skipped.get(skip.reason, 0) + 1
        examples = self.skipped_examples.setdefault(skip.reason, [])
        if len(examples) < _EXAMPLES_PER_REASON and skip.id not in examples:
            examples.append(skip.id)
            logger.warning("skipping %s: %s", skip.id, skip.reason)

    def _end_epoch(self, epoch: int) -> None:
        if self.epoch_good == 0:
            raise ValueError(f"{self.source.description}: every record of rank {self.rank}'s share failed in "
                             f"epoch {epoch} ({self._epoch_skipped or 'no records'}); check `image_column`="
                             f"{self.cfg.image_column!r}, `caption_column`={self.cfg.caption_column!r} and the files")
        if self._epoch_skipped:
            logger.info("epoch %d (rank %d): skipped %s", epoch, self.rank, self._epoch_skipped)
        self.epoch_good, self._epoch_skipped = 0, {}

    def __iter__(self) -> Iterator[dict]:
        pending: list[dict] = []
        for epoch, offset, item in self._items():
            previous_epoch = self.epoch
            self.epoch, self.offset = epoch, offset
            if item is not None:
                self.position += 1
                if isinstance(item, Skip):
                    self._record_skip(item)
                else:
                    self.epoch_good += 1
                    pending.append(item)
            if epoch != previous_epoch:
                self._end_epoch(previous_epoch)
            if len(pending) == self.batch_size:
                self.batches += 1
                yield self._collate(pending)
                pending = []

    def _collate(self, items: list[dict]) -> dict:
        ids, captions = [i["id"] for i in items], [i["caption"] for i in items]
        if not self.cached:
            return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "captions": captions,
                    "ids": ids}
        from t2i_distill.conditioning import sample_posterior_latents

        batch = {k: torch.stack([i[k] for i in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
        seed = int(np.random.SeedSequence([self.seed, self.rank, self.position]).generate_state(1)[0])
        batch["vae_shift_factor"] = self.manifest.vae_shift_factor
        batch["vae_scaling_factor"] = self.manifest.vae_scaling_factor
        batch["latents"] = sample_posterior_latents(batch["latent_mean"], batch["latent_std"],
                                                    self.manifest.vae_shift_factor, self.manifest.vae_scaling_factor,
                                                    generator=torch.Generator().manual_seed(seed))
        return {**batch, "captions": captions, "ids": ids}

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch starts, and the counters (plain Python values; JSON- and torch.save-able)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "offset": self.offset, "position": self.position,
                "epoch_good": self.epoch_good, "batches": self.batches, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_records": self.num_records,
                "skipped": dict(self.skipped), "skipped_examples": {k: list(v) for k, v in
                                                                    self.skipped_examples.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (call before iterating); refuses a state of another seed, rank layout or source
        size, since its positions would then name other records."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"`state`: expected a TrainData state_dict (version {STATE_VERSION}), got "
                             f"{str(state)[:200]}")
        mine = self.state_dict()
        wrong = [f"{k}: state {state.get(k)!r}, this loader {mine[k]!r}"
                 for k in ("seed", "rank", "world_size", "num_records") if state.get(k) != mine[k]]
        if wrong:
            raise ValueError("`state` was saved by a different data setup: " + "; ".join(wrong))
        self.epoch, self.offset, self.position = state["epoch"], state["offset"], state["position"]
        self.epoch_good, self.batches = state["epoch_good"], state["batches"]
        self.skipped = dict(state["skipped"])
        self.skipped_examples = {k: list(v) for k, v in state["skipped_examples"].items()}
        self._epoch_skipped = {}
