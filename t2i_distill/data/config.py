"""The data options of the trainers and of ``t2i-distill cache`` (diffusers' flag names), validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DataConfig:
    """Where the (image, caption) pairs come from and how they are read.

    * ``dataset_name``: a hub id (``datasets.load_dataset(name)``, the only path that may touch the network) **or** a
      local path: an imagefolder directory (images + ``metadata.jsonl``/``.csv`` with a ``file_name`` column), a
      directory or glob of ``.parquet`` / ``.arrow`` files, a directory or glob of webdataset-style ``.tar`` shards
      (members ``<key>.<image ext>`` + ``<key>.txt`` or ``<key>.json``), or a ``Dataset.save_to_disk`` folder.
    * ``train_data_dir``: a local imagefolder (diffusers' flag); used when ``dataset_name`` is None.
    * ``image_column`` / ``caption_column``: the columns to read (the reference's data uses ``llava`` captions).
      For ``.tar`` shards the image is the member with an image extension and the caption is ``<key>.txt`` when
      ``caption_column`` is ``text``/``txt``, else the field ``caption_column`` of ``<key>.json``.
    * ``max_train_samples``: keep the first N records of the source (source order, before any shuffling).
    * ``resolution``: square side R in pixels (a multiple of 16, the FLUX latent×patch stride).
    * ``streaming``: read the source sequentially instead of indexing it (for sets larger than the disk cache).
    * ``cached_dataset``: a folder written by ``t2i-distill cache``; when set, the other source options are unused.
    * ``cache_dir``: where ``datasets`` keeps its arrow cache (None: its default).
    """

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    train_data_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    resolution: int = 512
    streaming: bool = False
    cached_dataset: str | None = None
    dataloader_num_workers: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("dataset_name", "dataset_config_name", "train_data_dir", "cached_dataset", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"`{name}`: expected a str or None, got {type(value).__name__} {value!r}")
        for name in ("dataset_split", "image_column", "caption_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}`: expected a non-empty str, got {value!r}")
        if not _is_int(self.resolution) or self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"`resolution`: expected a positive multiple of 16 (pixels), got {self.resolution!r}")
        if self.max_train_samples is not None and (not _is_int(self.max_train_samples) or self.max_train_samples < 1):
            raise ValueError(f"`max_train_samples`: expected a positive int or None, got {self.max_train_samples!r}")
        if not _is_int(self.dataloader_num_workers) or self.dataloader_num_workers < 0:
            raise ValueError(f"`dataloader_num_workers`: expected an int >= 0, got {self.dataloader_num_workers!r}")
        if not isinstance(self.streaming, bool):
            raise TypeError(f"`streaming`: expected a bool, got {type(self.streaming).__name__}")
        if self.cached_dataset is None and self.dataset_name is None and self.train_data_dir is None:
            raise ValueError("no data source: set `dataset_name` (hub id or local path), `train_data_dir` (a local "
                             "imagefolder) or `cached_dataset` (a folder written by `t2i-distill cache`)")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
