"""``t2i-distill sample``: prompts from flags or a file → PNGs and a labelled grid.

Writes ``<output_dir>/<prompt:03d>_<k:02d>.png`` for each prompt and image, and ``<output_dir>/grid.png`` (one
column per prompt, captioned; one row per image index). Prompt ``i`` is seeded by
:func:`~t2i_distill.eval.geneval.prompt_seed` (seed, i), as in ``geneval``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_subparser", "read_prompts", "sample_prompts"]


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of ``--prompt`` flags and/or a text file (one per line; blank lines skipped)."""
    found = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"`--prompts_file` {str(path)!r} does not exist")
        found += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not found:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) and/or --prompts_file FILE")
    return found


def sample_prompts(pipe, prompts: list[str], output_dir: str | Path, *, images_per_prompt: int = 1, seed: int = 42,
                   grid_name: str = "grid.png", **call_options) -> dict:
    """Generate, save the PNGs and the grid; return ``{"files": [...], "grid": path, "seconds": generation time}``."""
    import time

    import torch

    from t2i_distill.eval.geneval import prompt_seed
    from t2i_distill.eval.grid import labelled_grid

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pipe._execution_device
    columns, files, seconds = [], [], 0.0
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(prompt_seed(seed, i))
        start = time.perf_counter()
        images = pipe(prompt, num_images_per_prompt=images_per_prompt, generator=generator, output_type="pil",
                      **call_options).images
        seconds += time.perf_counter() - start
        for k, image in enumerate(images):
            path = out / f"{i:03d}_{k:02d}.png"
            image.save(path)
            files.append(str(path))
        columns.append(images)
    rows = [[column[k] for column in columns] for k in range(images_per_prompt)]
    grid_path = out / grid_name
    labelled_grid(rows, column_labels=prompts).save(grid_path)
    return {"files": files, "grid": str(grid_path), "seconds": seconds}


def add_subparser(subparsers) -> None:
    from t2i_distill.flag_types import positive_int
    from t2i_distill.pipelines.options import add_model_arguments

    p = subparsers.add_parser("sample", help="generate images for prompts (flags or a file): PNGs + a labelled grid")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for more)")
    p.add_argument("--prompts_file", default=None, help="a text file with one prompt per line")
    p.add_argument("--output_dir", required=True, help="where the PNGs and grid.png go")
    p.add_argument("--num_images_per_prompt", type=positive_int, default=1,
                   help="images per prompt (default: %(default)s)")
    add_model_arguments(p)
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args: argparse.Namespace) -> int:
    from t2i_distill.pipelines.options import call_options, pipeline_from_args

    prompts = read_prompts(args.prompt, args.prompts_file)
    pipe, device = pipeline_from_args(args)
    result = sample_prompts(pipe, prompts, args.output_dir, images_per_prompt=args.num_images_per_prompt,
                            seed=args.seed, **call_options(args))
    n = len(result["files"])
    print(f"{args.method}: {n} images of {len(prompts)} prompts on {device} in {result['seconds']:.2f} s "
          f"({n / result['seconds']:.2f} images/s) -> {args.output_dir}; grid: {result['grid']}")
    return 0
