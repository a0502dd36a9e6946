"""``t2i-distill cache``: encode a dataset once (see :mod:`t2i_distill.data.cache`).

Wire with ``cache_cli.add_subparser(subparsers)``; ``python -m t2i_distill.data.cache_cli ...`` runs it directly,
which is what ``torchrun --nproc_per_node N -m t2i_distill.data.cache_cli ...`` launches on N processes.
"""

from __future__ import annotations

import argparse
import logging

from t2i_distill.flag_types import nonnegative_int, positive_int


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data flags shared by ``cache`` and the trainers (diffusers' names and defaults)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="hub id, or a local imagefolder / parquet / arrow / .tar path or glob")
    g.add_argument("--dataset_config_name", default=None, help="the hub dataset's configuration")
    g.add_argument("--dataset_split", default="train", help="split to read (default: %(default)s)")
    g.add_argument("--train_data_dir", default=None, help="a local imagefolder (used without --dataset_name)")
    g.add_argument("--image_column", default="image", help="(default: %(default)s)")
    g.add_argument("--caption_column", default="text", help="(default: %(default)s; the reference's data: llava)")
    g.add_argument("--max_train_samples", type=positive_int, default=None, help="keep the first N records")
    g.add_argument("--resolution", type=positive_int, default=512, help="square side in pixels (default: %(default)s)")
    g.add_argument("--streaming", action="store_true", help="read the source sequentially (large sets)")
    g.add_argument("--dataloader_num_workers", type=nonnegative_int, default=0, help="decoding processes (default: 0)")
    g.add_argument("--cache_dir", default=None, help="the datasets library's cache folder")


def data_config_from_args(args: argparse.Namespace, cached_dataset: str | None = None):
    from t2i_distill.data.config import DataConfig

    return DataConfig(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                      dataset_split=args.dataset_split, train_data_dir=args.train_data_dir,
                      image_column=args.image_column, caption_column=args.caption_column,
                      max_train_samples=args.max_train_samples, resolution=args.resolution, streaming=args.streaming,
                      cached_dataset=cached_dataset, dataloader_num_workers=args.dataloader_num_workers,
                      cache_dir=args.cache_dir)


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("cache", help="encode a dataset once: VAE posterior, T5 and CLIP embeddings, manifest")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="FLUX folder or hub id (its encoders)")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--output_dir", required=True, help="cache folder (a rerun resumes it)")
    p.add_argument("--max_sequence_length", type=positive_int, default=256, help="T5 tokens (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="encoder and storage dtype (default: auto = bf16 on CUDA, as the reference; fp32 on CPU)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per encoder call (default: %(default)s)")
    p.add_argument("--shard_size", type=positive_int, default=256,
                   help="source records per shard (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when available, else cpu")
    add_data_arguments(p)
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args: argparse.Namespace) -> int:
    from t2i_distill.data.cache import build_cache

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = build_cache(data_config_from_args(args), args.output_dir, args.pretrained_model_name_or_path,
                           max_sequence_length=args.max_sequence_length, dtype=args.dtype,
                           batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                           revision=args.revision, variant=args.variant)
    stats = manifest.encode_stats
    rate = stats["encoded_records"] / stats["seconds"] if stats["seconds"] > 0 else float("nan")
    print(f"rank {stats['rank']}: encoded {stats['encoded_records']} records in {stats['seconds']:.1f} s "
          f"({rate:.1f} records/s)")
    if stats["rank"] == 0:
        print(f"cache {args.output_dir}: {manifest.num_records} of {manifest.num_source_records} records in "
              f"{len(manifest.shards)} shards; skipped {manifest.skipped or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2i-distill")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
