"""(image, caption) sources: one record interface over a hub id, imagefolder, parquet/arrow files and ``.tar`` shards.

:func:`resolve_source` decides *what* a ``DataConfig`` names without reading any data (a local path always wins; a
string that is no local path and looks like ``owner/name`` is a hub id, the only case that calls the hub);
:func:`open_source` opens it as an :class:`IndexedSource` (``len`` + ``[i]``; what the shuffling, resumable loader
and the cache writer index) or, with ``streaming=True``, a :class:`StreamSource` (records in source order, read once
per epoch). Records carry the image *undecoded* (``datasets``' ``Image(decode=False)``: bytes/path) so that a corrupt
file becomes a counted skip in the loader instead of an exception inside ``datasets``.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from t2i_distill.data.config import DataConfig

__all__ = ["IMAGE_EXTENSIONS", "IndexedSource", "RawRecord", "SourceSpec", "StreamSource", "buffer_shuffle",
           "open_source", "resolve_source"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GLOB_CHARS = set("*?[")


@dataclass
class RawRecord:
    """One undecoded record: ``id`` (unique within the source), ``image`` (bytes / {bytes, path} / path / PIL /
    None) and ``caption`` (whatever the column held; validated by the loader)."""

    id: str
    image: object
    caption: object


@dataclass
class SourceSpec:
    """What a config names: ``kind`` ∈ {hub, datasets_dir, imagefolder, save_to_disk, parquet, arrow, tar}."""

    kind: str
    target: str
    files: list[str] = field(default_factory=list)


def resolve_source(cfg: DataConfig) -> SourceSpec:
    """Classify ``cfg.dataset_name`` / ``cfg.train_data_dir`` without reading data (see the module docstring)."""
    if cfg.dataset_name is None:
        root = Path(cfg.train_data_dir)
        if not root.is_dir():
            raise ValueError(f"`train_data_dir`: expected an existing folder of images, got {cfg.train_data_dir!r}")
        return SourceSpec("imagefolder", str(root))
    name = cfg.dataset_name
    path = Path(name)
    if path.is_dir():
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return SourceSpec("save_to_disk", str(path))
        for kind, ext in (("tar", ".tar"), ("parquet", ".parquet"), ("arrow", ".arrow")):
            files = sorted(str(p) for p in path.rglob(f"*{ext}"))
            if files:
                return SourceSpec(kind, str(path), files)
        return SourceSpec("datasets_dir", str(path))  # datasets infers the builder (imagefolder, csv, json, ...)
    if path.is_file() or _GLOB_CHARS & set(name):
        files = sorted(glob.glob(name, recursive=True)) if _GLOB_CHARS & set(name) else [name]
        if not files:
            raise ValueError(f"`dataset_name`: the glob {name!r} matches no file")
        exts = {Path(f).suffix.lower() for f in files}
        for kind in ("tar", "parquet", "arrow"):
            if exts == {"." + kind}:
                return SourceSpec(kind, name, files)
        raise ValueError(f"`dataset_name`: expected .tar, .parquet or .arrow files (one kind), got {sorted(exts)} "
                         f"from {name!r}")
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix.lower() in {
        ".tar", ".parquet", ".arrow", ".jsonl", ".json", ".csv"}
    if looks_local or not _HUB_ID.match(name):
        raise ValueError(f"`dataset_name`: {name!r} is neither an existing local path nor a hub id (owner/name)")
    return SourceSpec("hub", name)


class IndexedSource:
    """Random access to records: ``len(source)``, ``source[i] -> RawRecord`` (``i`` in source order)."""

    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawRecord:
        raise NotImplementedError


class StreamSource:
    """Sequential records: ``iter_records(epoch, seed)`` yields the source once, through a 1000-record shuffle buffer
    seeded by ``(seed, epoch)`` (``seed=None``: source order)."""

    description: str

    def iter_records(self, epoch: int, seed: int | None) -> Iterator[RawRecord]:
        raise NotImplementedError


# -- datasets-backed ----------------------------------------------------------------------------------------------
def _load_datasets(spec: SourceSpec, cfg: DataConfig):
    import datasets

    common = {"split": cfg.dataset_split, "streaming": cfg.streaming, "cache_dir": cfg.cache_dir}
    if spec.kind == "hub":
        return datasets.load_dataset(spec.target, cfg.dataset_config_name, **common)
    if spec.kind == "save_to_disk":
        ds = datasets.load_from_disk(spec.target)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.dataset_split]
        return ds.to_iterable_dataset() if cfg.streaming else ds
    if spec.kind == "imagefolder":
        check_imagefolder_metadata(spec.target)  # named file and line, instead of pyarrow's "JSON parse error"
        return datasets.load_dataset("imagefolder", data_dir=spec.target, **common)
    if spec.kind == "datasets_dir":
        return datasets.load_dataset(spec.target, cfg.dataset_config_name, **common)
    return datasets.load_dataset(spec.kind, data_files={cfg.dataset_split: spec.files}, **common)


def check_imagefolder_metadata(root: str) -> None:
    """Refuse an imagefolder whose ``metadata.jsonl`` has a line that is not a JSON object (or whose
    ``metadata.csv`` does not parse), naming the file and the line, before ``datasets`` reads it."""
    import csv
    import json

    from t2i_distill.errors import ConfigurationError

    for path in sorted(Path(root).rglob("metadata.jsonl")):
        bad = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    if not isinstance(json.loads(line), dict):
                        raise ValueError("not a JSON object")
                except ValueError as error:
                    bad.append(f"line {number} ({str(error).split(':')[0]}: {line.strip()[:60]!r})")
        if bad:
            raise ConfigurationError(f"{path}: {len(bad)} line(s) are not JSON objects: {'; '.join(bad[:5])}"
                                     f"{' ...' if len(bad) > 5 else ''}; fix or remove them")
    for path in sorted(Path(root).rglob("metadata.csv")):
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            rows = list(csv.reader(handle))
        width = len(rows[0]) if rows else 0
        bad = [f"line {n}" for n, row in enumerate(rows[1:], start=2) if row and len(row) != width]
        if bad:
            raise ConfigurationError(f"{path}: {len(bad)} row(s) do not have the header's {width} columns: "
                                     f"{', '.join(bad[:5])}; fix or remove them")


def _prepare_columns(ds, cfg: DataConfig, description: str):
    """Check both columns exist (a ValueError listing the columns otherwise) and switch image decoding off."""
    import datasets

    columns = list(ds.column_names or (ds.features or {}).keys())
    if not columns:  # a stream whose columns are unknown until read: check the first row instead
        ds = _checked_stream(ds, cfg, description)
        return ds
    _check_columns(columns, cfg, description)
    keep = [cfg.image_column, cfg.caption_column]
    ds = ds.select_columns(keep)
    if ds.features is not None and isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds


def _check_columns(columns: list[str], cfg: DataConfig, description: str) -> None:
    missing = [f"`{flag}`={col!r}" for flag, col in (("image_column", cfg.image_column),
                                                     ("caption_column", cfg.caption_column)) if col not in columns]
    if missing:
        raise ValueError(f"{description}: {' and '.join(missing)} not among its columns {columns}")


class _checked_stream:
    """An iterable dataset without declared columns: the first row's keys are checked like declared ones."""

    def __init__(self, ds, cfg: DataConfig, description: str):
        self.ds, self.cfg, self.description = ds, cfg, description

    def __iter__(self):
        for n, row in enumerate(self.ds):
            if n == 0:
                _check_columns(list(row), self.cfg, self.description)
            yield row


def _record_id(index: int, image: object, root: str | None) -> str:
    """Imagefolder: the path relative to its folder (unique, readable); otherwise ``row<i>`` (+ the file name)."""
    path = image.get("path") if isinstance(image, dict) else None
    if root is not None and path:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return f"row{index}" + (f":{Path(path).name}" if path else "")


class DatasetsSource(IndexedSource):
    """A ``datasets.Dataset`` (hub, imagefolder, parquet, arrow, ``save_to_disk``) as an indexed source."""

    def __init__(self, ds, cfg: DataConfig, description: str, root: str | None):
        self.ds = _prepare_columns(ds, cfg, description)
        if cfg.max_train_samples is not None:
            self.ds = self.ds.select(range(min(cfg.max_train_samples, len(self.ds))))
        self.image_column, self.caption_column = cfg.image_column, cfg.caption_column
        self.description, self.root = description, root

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> RawRecord:
        row = self.ds[int(index)]
        image = row[self.image_column]
        return RawRecord(_record_id(index, image, self.root), image, row[self.caption_column])


def buffer_shuffle(records: Iterator[RawRecord], seed: int | None, epoch: int,
                   buffer_size: int = 1000) -> Iterator[RawRecord]:
    """A reproducible shuffle of a stream through a ``buffer_size`` buffer (random from ``(seed, epoch)``); the
    records keep their ids, which come from the *unshuffled* order, so an image has one id in every epoch."""
    if seed is None:
        yield from records
        return
    import random

    rng, buffer = random.Random(f"{seed}:{epoch}"), []
    for record in records:
        buffer.append(record)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class DatasetsStream(StreamSource):
    """A ``datasets.IterableDataset`` as a stream, read in source order (row ids ``row<i>`` are stable) and shuffled
    per epoch by :func:`buffer_shuffle`."""

    def __init__(self, ds, cfg: DataConfig, description: str, root: str | None, shuffle_buffer: int = 1000):
        self.ds = _prepare_columns(ds, cfg, description)
        self.cfg, self.description, self.root, self.shuffle_buffer = cfg, description, root, shuffle_buffer

    def _in_order(self) -> Iterator[RawRecord]:
        limit = self.cfg.max_train_samples
        for i, row in enumerate(self.ds):
            if limit is not None and i >= limit:
                return
            image = row[self.cfg.image_column]
            yield RawRecord(_record_id(i, image, self.root), image, row[self.cfg.caption_column])

    def iter_records(self, epoch: int, seed: int | None) -> Iterator[RawRecord]:
        return buffer_shuffle(self._in_order(), seed, epoch, self.shuffle_buffer)


# -- webdataset-style tar shards ----------------------------------------------------------------------------------
@dataclass
class _TarSample:
    shard: str
    key: str
    image: tuple[int, int] | None = None  # (offset, size) of the member's data
    caption: tuple[int, int] | None = None
    caption_kind: str = ""


def _index_tar(path: str, caption_ext: str) -> list[_TarSample]:
    """Group a tar's members by key (the name up to its first dot after the last '/'), in archive order."""
    samples: dict[str, _TarSample] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            sample = samples.setdefault(key, _TarSample(path, key))
            ext = "." + ext.lower()
            if ext in IMAGE_EXTENSIONS:
                sample.image = (member.offset_data, member.size)
            elif ext == caption_ext:
                sample.caption, sample.caption_kind = (member.offset_data, member.size), ext
    return list(samples.values())


class TarSource(IndexedSource, StreamSource):
    """Webdataset-style shards: ``<key>.<image ext>`` + ``<key>.txt`` (``caption_column`` text/txt) or
    ``<key>.json`` (its ``caption_column`` field). Ids are ``<shard file name>/<key>``. Indexed by one pass over
    the member headers; reads seek to each member, so it never extracts anything."""

    def __init__(self, files: list[str], cfg: DataConfig):
        self.caption_field = None if cfg.caption_column in ("text", "txt") else cfg.caption_column
        caption_ext = ".txt" if self.caption_field is None else ".json"
        self.samples = [s for f in files for s in _index_tar(f, caption_ext)]
        if cfg.max_train_samples is not None:
            self.samples = self.samples[: cfg.max_train_samples]
        self.files = list(files)
        self.description = f"tar shards {files[0]!r}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _read(path: str, span: tuple[int, int] | None) -> bytes | None:
        if span is None:
            return None
        with open(path, "rb") as f:
            f.seek(span[0])
            return f.read(span[1])

    def __getitem__(self, index: int) -> RawRecord:
        s = self.samples[int(index)]
        raw = self._read(s.shard, s.caption)
        caption: object = None
        if raw is not None:
            if self.caption_field is None:
                caption = raw.decode("utf-8", errors="replace")
            else:
                try:
                    caption = json.load(io.BytesIO(raw)).get(self.caption_field)
                except (ValueError, AttributeError):
                    caption = None
        return RawRecord(f"{Path(s.shard).name}/{s.key}", self._read(s.shard, s.image), caption)

    def iter_records(self, epoch: int, seed: int | None) -> Iterator[RawRecord]:
        return buffer_shuffle((self[i] for i in range(len(self))), seed, epoch)


def open_source(cfg: DataConfig) -> IndexedSource | StreamSource:
    """Open what ``cfg`` names (:func:`resolve_source`): indexed, or a stream when ``cfg.streaming``."""
    spec = resolve_source(cfg)
    if spec.kind == "tar":
        return TarSource(spec.files, cfg)
    description = {"hub": "hub dataset", "imagefolder": "imagefolder"}.get(spec.kind, spec.kind) + f" {spec.target!r}"
    root = spec.target if spec.kind in ("imagefolder", "datasets_dir") else None
    ds = _load_datasets(spec, cfg)
    return (DatasetsStream if cfg.streaming else DatasetsSource)(ds, cfg, description, root)
