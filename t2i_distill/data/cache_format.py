"""The embedding cache's format and its reader: ``manifest.json`` (:class:`CacheManifest`), the empty-prompt file,
and :class:`CacheReader` (records by global index, no encoder loaded).

Split from :mod:`t2i_distill.data.cache` (which writes caches and reads sources through the loader) so that the
loader can read a cache without importing the writer: the data modules import one way, loader → cache_format ←
cache → loader. The layout itself is documented in :mod:`t2i_distill.data.cache`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

CACHE_FORMAT = "t2i-distill-cache"
CACHE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
#: MeanFlow's prompt-dropout condition, the embedding of " " (so a trainer on the cache needs no text encoder).
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
PLAN_FILE = "cache_plan.json"
TENSOR_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@dataclass
class CacheManifest:
    """What a cache holds and how it was made (``manifest.json``). ``check_matches`` guards trainers against a cache
    of another model, resolution or T5 length."""

    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    resolution: int
    max_sequence_length: int
    dtype: str
    latent_shape: list[int]
    prompt_embeds_shape: list[int]
    pooled_dim: int
    vae_shift_factor: float
    vae_scaling_factor: float
    source: dict
    shard_size: int
    num_source_records: int
    num_records: int
    shards: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    latent_storage: str = "posterior_mean_std"
    format: str = CACHE_FORMAT
    format_version: int = CACHE_FORMAT_VERSION
    #: Set by build_cache only (this rank's encoded records and seconds); never saved.
    encode_stats: dict | None = field(default=None, compare=False)

    #: The fields a trainer may require to match.
    MATCH_FIELDS = ("pretrained_model_name_or_path", "revision", "variant", "resolution", "max_sequence_length",
                    "dtype")

    def check_matches(self, **expected) -> None:
        """Raise one ``ValueError`` naming every field of ``expected`` (any of :attr:`MATCH_FIELDS`) that differs
        from the cache; a model given as a local path matches the same folder however it is spelled."""
        unknown = sorted(set(expected) - set(self.MATCH_FIELDS))
        if unknown:
            raise TypeError(f"check_matches: unknown field(s) {unknown}; expected some of {list(self.MATCH_FIELDS)}")
        wrong = []
        for name, want in expected.items():
            have = getattr(self, name)
            same = _same_model(have, want) if name == "pretrained_model_name_or_path" else have == want
            if not same:
                wrong.append(f"{name}: cache {have!r}, requested {want!r}")
        if wrong:
            raise ValueError("the cached dataset does not match this run (rebuild it with `t2i-distill cache`, or "
                             "fix the flags): " + "; ".join(wrong))

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("encode_stats")
        return json.dumps(data, indent=2)


#: What a cache's records depend on: the text encoders, their tokenizers and the VAE (never the transformer).
_ENCODING_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


def _same_model(a: str | None, b: str | None) -> bool:
    """Same folder, or folders whose encoding components resolve to the same files (``t2i-distill rescale``'s output
    links the stock folder's text encoders and VAE, so a cache made from the stock folder serves it too)."""
    if a is None or b is None:
        return a == b
    if Path(a).exists() and Path(b).exists():
        if Path(a).resolve() == Path(b).resolve():
            return True
        parts = [(Path(a) / c, Path(b) / c) for c in _ENCODING_COMPONENTS]
        return all(x.exists() == y.exists() and (not x.exists() or x.resolve() == y.resolve()) for x, y in parts) \
            and any(x.exists() for x, _ in parts)
    return a == b


def load_empty_prompt(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached embedding of the prompt " " (MeanFlow's dropout condition): ``(prompt_embeds (1, T, D),
    pooled_prompt_embeds (1, P))``; a ``ValueError`` for a cache written without it."""
    from safetensors.torch import load_file

    file = Path(path) / EMPTY_PROMPT_FILE
    if not file.is_file():
        raise ValueError(f"`cached_dataset` {str(path)!r} has no {EMPTY_PROMPT_FILE} (the embedding of ' ' that "
                         "MeanFlow's prompt dropout needs); rebuild it with this version of `t2i-distill cache`")
    tensors = load_file(str(file))
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]


def load_cache_manifest(path: str | os.PathLike, check_files: bool = True) -> CacheManifest:
    """Read ``<path>/manifest.json``; a clear ``ValueError`` for a folder that is no cache or an unfinished one."""
    root = Path(path)
    file = root / MANIFEST_FILE
    if not file.is_file():
        if (root / PLAN_FILE).is_file():
            raise ValueError(f"`cached_dataset` {str(root)!r} is unfinished (no {MANIFEST_FILE}); rerun the same "
                             f"`t2i-distill cache` command to finish it")
        raise ValueError(f"`cached_dataset` {str(root)!r} is not a cache written by `t2i-distill cache` (no "
                         f"{MANIFEST_FILE})")
    data = json.loads(file.read_text())
    if data.get("format") != CACHE_FORMAT or data.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"`cached_dataset` {str(root)!r}: expected format {CACHE_FORMAT} v{CACHE_FORMAT_VERSION}, "
                         f"got {data.get('format')!r} v{data.get('format_version')!r}")
    known = {f.name for f in fields(CacheManifest)} - {"encode_stats"}
    manifest = CacheManifest(**{k: v for k, v in data.items() if k in known})
    missing = [s["file"] for s in manifest.shards if not (root / s["file"]).is_file()]
    if missing and check_files:
        raise ValueError(f"`cached_dataset` {str(root)!r}: shard file(s) missing: {missing[:5]}; rerun "
                         "`t2i-distill cache` with the same flags: it re-encodes exactly those shards")
    return manifest


def broken_shards(root: Path, manifest) -> list[tuple[Path, str]]:
    """``(path, why)`` of every non-empty shard of ``manifest`` that is missing, has an unreadable header, is not the
    size its header implies (truncated), or holds another number of records than the manifest says."""
    import struct

    problems = []
    for shard in manifest.shards:
        if not shard["num_records"]:
            continue
        path = Path(root) / shard["file"]
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            ids = json.loads(header.get("__metadata__", {}).get("ids", "[]"))
        except FileNotFoundError:
            problems.append((path, "missing"))
            continue
        except (OSError, ValueError, struct.error, KeyError, TypeError) as error:
            problems.append((path, f"unreadable header ({type(error).__name__})"))
            continue
        if size != 8 + header_len + end:
            problems.append((path, f"{size} bytes, its header implies {8 + header_len + end} (truncated)"))
        elif len(ids) != shard["num_records"]:
            problems.append((path, f"{len(ids)} records, the manifest says {shard['num_records']}"))
    return problems


class CacheReader:
    """Random access to cached records: ``len(reader)``, ``reader.load_item(j)`` → ``{"latent_mean", "latent_std"
    (C, h, w), "prompt_embeds" (T, D), "pooled_prompt_embeds" (P,), "caption", "id"}`` (safetensors slices: one
    record is read, not the shard). Handles open lazily, so each DataLoader worker opens its own."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.manifest = load_cache_manifest(self.root)
        self.description = f"cache {str(self.root)!r}"
        # (first record, shard) of the non-empty shards, for a bisect from a record number to its shard.
        self._starts: list[int] = []
        self._shards: list[int] = []
        total = 0
        for s, shard in enumerate(self.manifest.shards):
            if shard["num_records"]:
                self._starts.append(total)
                self._shards.append(s)
                total += shard["num_records"]
        self._handles: dict[int, tuple] = {}
        self._check_shards()

    def _check_shards(self) -> None:
        """Every shard is readable and whole (:func:`broken_shards`): a truncated or partly written shard is named
        here, when the cache is opened, not steps into training."""
        from t2i_distill.errors import ConfigurationError

        problems = broken_shards(self.root, self.manifest)
        if problems:
            shown = "; ".join(f"{path}: {why}" for path, why in problems[:5])
            raise ConfigurationError(
                f"{self.description}: {len(problems)} shard(s) cannot be read: {shown}"
                f"{' ...' if len(problems) > 5 else ''}. Rerun `t2i-distill cache` with the same flags: it re-encodes "
                "exactly those shards")

    def __len__(self) -> int:
        return self.manifest.num_records

    def _shard(self, s: int):
        if s not in self._handles:
            from safetensors import safe_open

            handle = safe_open(str(self.root / self.manifest.shards[s]["file"]), framework="pt")
            meta = handle.metadata()
            self._handles[s] = (handle, json.loads(meta["ids"]), json.loads(meta["captions"]))
        return self._handles[s]

    def load_item(self, j: int) -> dict:
        if not 0 <= j < len(self):
            raise IndexError(f"record {j} out of range for a cache of {len(self)} records")
        import bisect

        position = bisect.bisect_right(self._starts, j) - 1
        s, local = self._shards[position], j - self._starts[position]
        handle, ids, captions = self._shard(s)
        item = {k: handle.get_slice(k)[local:local + 1][0] for k in TENSOR_KEYS}
        return {**item, "caption": captions[local], "id": ids[local]}


# -- writing ------------------------------------------------------------------------------------------------------
