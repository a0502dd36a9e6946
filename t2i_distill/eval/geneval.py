"""GenEval generation: GenEval's own output layout, sharded across processes, seeded per prompt, resumable.

Layout (what GenEval's ``evaluate_images.py`` reads, and the reference's ``test_*.py`` write)::

    <output_dir>/<index:05d>/metadata.jsonl     the prompt's metadata line, verbatim (written last)
    <output_dir>/<index:05d>/samples/<k:04d>.png   k = 0 … images_per_prompt − 1

* **Sharding** (fixes B12): with ``RANK``/``WORLD_SIZE`` in the environment (``torchrun``, ``accelerate launch``),
  rank r generates the prompts with ``index % world_size == r``; no process group is needed, ranks never touch the
  same folder.
* **Seeds**: prompt ``index`` is generated with its own generator seeded by :func:`prompt_seed` (seed, index), so an
  image depends on (seed, index, settings) only, never on the number of processes or on which prompts came before
  (the reference shares one generator across all prompts, and treats seed 0 as "no seed").
* **Resumable**: a prompt folder is complete when its metadata and all its images exist; images are written under
  temporary names and renamed, and the metadata file is renamed into place last, so an interrupted run leaves no
  folder that looks complete. Complete folders are skipped; incomplete ones are regenerated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

__all__ = [
    "distributed_rank",
    "is_prompt_complete",
    "prompt_seed",
    "read_metadata",
    "run_geneval",
    "shard",
    "write_prompt_folder",
]


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object with a ``prompt`` per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`metadata` file {str(path)!r} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"`metadata` {str(path)!r} line {number}: not JSON ({error})") from error
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"`metadata` {str(path)!r} line {number}: expected an object with a 'prompt' string, "
                             f"got {line[:200]!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"`metadata` {str(path)!r} holds no prompts")
    return rows


def prompt_seed(seed: int, index: int) -> int:
    """The 63-bit seed of prompt ``index`` under base ``seed`` (numpy ``SeedSequence`` of the pair: distinct pairs
    give unrelated streams, unlike ``seed + index``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed`: expected an int ≥ 0, got {seed!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"`index`: expected an int ≥ 0, got {index!r}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def distributed_rank(environ=os.environ) -> tuple[int, int]:
    """``(rank, world_size)`` from ``RANK``/``WORLD_SIZE`` (torchrun and accelerate set both); (0, 1) without."""
    try:
        rank, world = int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise ValueError(f"RANK/WORLD_SIZE must be integers, got {environ.get('RANK')!r}/"
                         f"{environ.get('WORLD_SIZE')!r}") from error
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK/WORLD_SIZE: expected 0 ≤ RANK < WORLD_SIZE, got {rank}/{world}")
    return rank, world


def shard(num_prompts: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices of ``rank``: ``index % world_size == rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"`rank`/`world_size`: expected 0 ≤ rank < world_size, got {rank}/{world_size}")
    return list(range(rank, num_prompts, world_size))


def _sample_path(folder: Path, k: int) -> Path:
    return folder / "samples" / f"{k:04d}.png"


def is_prompt_complete(folder: str | os.PathLike, images_per_prompt: int) -> bool:
    """True when ``folder`` has its ``metadata.jsonl`` and samples ``0000.png`` … ``<n−1>.png``."""
    folder = Path(folder)
    return (folder / "metadata.jsonl").is_file() and all(_sample_path(folder, k).is_file()
                                                         for k in range(images_per_prompt))


def write_prompt_folder(folder: str | os.PathLike, metadata: dict, images) -> None:
    """Write one prompt's images and metadata line atomically enough to resume: temp names + rename, metadata last."""
    folder = Path(folder)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    stale = folder / "metadata.jsonl"
    if stale.exists():
        stale.unlink()  # an incomplete folder being regenerated must not look complete halfway through
    for k, image in enumerate(images):
        final = _sample_path(folder, k)
        tmp = final.with_name(f".{final.stem}.tmp.png")
        image.save(tmp)
        os.replace(tmp, final)
    tmp = folder / ".metadata.jsonl.tmp"
    tmp.write_text(json.dumps(metadata) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "metadata.jsonl")


SETTINGS_FILE = ".t2i-distill-geneval.json"  # hidden: GenEval's scorer reads only the <index:05d> folders


def check_settings(output_dir: str | os.PathLike, settings: dict) -> None:
    """Record the generation ``settings`` in ``output_dir`` on the first run; refuse to add images to a folder made
    with other settings (naming each one), since finished prompts are skipped and would silently mix."""
    from t2i_distill.errors import ConfigurationError

    path = Path(output_dir) / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        differ = [f"{key}: folder {recorded.get(key)!r}, now {value!r}" for key, value in settings.items()
                  if recorded.get(key) != value]
        if differ:
            raise ConfigurationError(
                f"--output_dir {str(output_dir)!r} holds GenEval images made with other settings ({'; '.join(differ)})"
                "; resuming would mix them. Use another --output_dir, or the folder's settings")
        return
    if any(Path(output_dir).glob("[0-9][0-9][0-9][0-9][0-9]")):
        raise ConfigurationError(f"--output_dir {str(output_dir)!r} holds GenEval folders without a settings "
                                 f"record ({SETTINGS_FILE}); they cannot be checked against this run: use another "
                                 "--output_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a launch may get here first: each writes its own temporary file (identical content), the
    # renames race harmlessly, and the result is then checked like a resumed folder's.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def run_geneval(pipe, metadata: list[dict], output_dir: str | os.PathLike, *, images_per_prompt: int = 4,
                seed: int = 42, rank: int | None = None, world_size: int | None = None, log=print,
                settings: dict | None = None, **call_options) -> dict:
    """Generate this rank's prompts into GenEval's layout; return ``{"generated", "skipped", "seconds",
    "rank", "world_size"}`` (index lists and the wall time of the generation itself).

    ``call_options`` go to the pipeline call (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``,
    ``max_sequence_length``, sampler options). ``rank``/``world_size`` default to the environment's. The folder
    records the settings (``settings`` plus the call options, seed and image count) and refuses other ones
    (:func:`check_settings`).
    """
    import torch

    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"`images_per_prompt`: expected an int ≥ 1, got {images_per_prompt!r}")
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {**(settings or {}), "seed": seed, "images_per_prompt": images_per_prompt, "prompts": len(metadata),
                **{k: v for k, v in call_options.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    check_settings(out, recorded)
    device = pipe._execution_device
    generated, skipped, seconds = [], [], 0.0
    mine = shard(len(metadata), rank, world_size)
    # The command line's default `log=print` shows a bar (prompts/s, ETA) on rank 0 instead of a line per prompt.
    from tqdm.auto import tqdm

    bar = tqdm(mine, desc=f"geneval (rank 0 of {world_size})", unit="prompt",
               disable=log is not print or rank != 0, dynamic_ncols=True)
    for index in bar:
        folder = out / f"{index:05d}"
        if is_prompt_complete(folder, images_per_prompt):
            skipped.append(index)
            continue
        generator = torch.Generator(device=device).manual_seed(prompt_seed(seed, index))
        start = time.perf_counter()
        images = pipe(metadata[index]["prompt"], num_images_per_prompt=images_per_prompt, generator=generator,
                      output_type="pil", **call_options).images
        seconds += time.perf_counter() - start
        write_prompt_folder(folder, metadata[index], images)
        generated.append(index)
        if log and log is not print:
            log(f"[rank {rank}/{world_size}] {index:05d} {metadata[index]['prompt']!r}: {images_per_prompt} images")
    bar.close()
    return {"generated": generated, "skipped": skipped, "seconds": seconds, "rank": rank, "world_size": world_size}


# -- command line -----------------------------------------------------------------------------------------------
def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("geneval", help="generate GenEval's prompts into GenEval's layout (sharded over "
                                              "torchrun/accelerate ranks, resumable)")
    _add_arguments(p)
    p.set_defaults(func=_cmd_geneval)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from t2i_distill.flag_types import positive_int
    from t2i_distill.pipelines.options import add_model_arguments

    p.add_argument("--metadata", default="evaluation/evaluation_metadata.jsonl",
                   help="GenEval's evaluation_metadata.jsonl (553 prompts; from github.com/djghosh13/geneval "
                        "prompts/) or the mini-GenEval file `t2i-distill shapes --geneval_metadata` writes (default: "
                        "%(default)s, the path the reference's scripts read, relative to the working directory)")
    p.add_argument("--output_dir", required=True, help="where <index:05d>/ folders go")
    p.add_argument("--images_per_prompt", "--n_samples", dest="images_per_prompt", type=positive_int, default=4,
                   help="images per prompt (default: %(default)s, as GenEval)")
    add_model_arguments(p)


def _cmd_geneval(args) -> int:
    from t2i_distill.pipelines.options import call_options, pipeline_from_args

    metadata = read_metadata(args.metadata)
    pipe, _ = pipeline_from_args(args)
    settings = {"method": args.method, "pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
                "student_checkpoint": None if args.student_checkpoint is None else str(args.student_checkpoint),
                "dtype": str(pipe.transformer.dtype)}
    summary = run_geneval(pipe, metadata, args.output_dir, images_per_prompt=args.images_per_prompt, seed=args.seed,
                          settings=settings, **call_options(args))
    images = len(summary["generated"]) * args.images_per_prompt
    rate = f", {images / summary['seconds']:.2f} images/s" if summary["seconds"] else ""
    print(f"[rank {summary['rank']}/{summary['world_size']}] generated {len(summary['generated'])} prompts, "
          f"skipped {len(summary['skipped'])} complete ones{rate} -> {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m t2i_distill.eval.geneval ...`` (for ``torchrun``/``accelerate launch``, which need a module)."""
    parser = argparse.ArgumentParser(prog="python -m t2i_distill.eval.geneval", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return _cmd_geneval(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
