"""Images/s of the three samplers at 1, 2, 4 steps on a FLUX folder (default: the tiny offline one), and the
per-image transformer FLOPs of each at FLUX.1-lite-8B 1024 px (computed, :mod:`t2i_distill.pipelines.flops`).

    python bench/pipelines_throughput.py [--folder DIR] [--resolution 64] [--images 4] [--repeats 3] [--out f.json]

The timed call is the whole pipeline (text encoding, the sampler's steps, VAE decode) for one prompt and ``--images``
images, after one warm-up call; the median of ``--repeats`` calls is reported. Without ``--folder`` the tiny random
pipeline is written to a temporary folder first (its images are noise: this measures speed, not quality).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from t2i_distill.pipelines import load_pipeline
from t2i_distill.pipelines.flops import pipeline_flops_per_image

STEPS = (1, 2, 4)


def images_per_second(pipe, steps: int, resolution: int, images: int, repeats: int,
                      tokens: int) -> tuple[float, float]:
    """Median images per wall-second and per CPU-second (all threads) of ``repeats`` seeded calls, after a warm-up.

    CPU time is the figure to compare on a shared machine: other processes stretch the wall time, not the CPU time.
    """
    def call():
        pipe("two red circles", num_inference_steps=steps, height=resolution, width=resolution,
             num_images_per_prompt=images, max_sequence_length=tokens, generator=torch.Generator().manual_seed(0),
             output_type="np")

    call()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return images / statistics.median(wall), images / statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=None, help="FLUX folder (default: a fresh tiny one)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_sequence_length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, OpenMP threads spin-waiting for a "
                             "core make both wall and CPU time erratic)")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

            folder = str(write_tiny_flux_pipeline(Path(tmp) / "tiny", seed=0))
        rows = []
        from t2i_distill.models import load_student

        for method in ("teacher", "scm", "meanflow"):
            # Throughput only: an untrained student of the folder, built here and passed in (a student sampler
            # refuses to fall back to base weights on its own).
            kind = {"scm": "trigflow", "meanflow": "meanflow"}.get(method)
            student = None if kind is None else load_student(folder, kind=kind)[0]
            pipe = load_pipeline(method, folder, transformer=student)
            for steps in STEPS:
                rate, cpu_rate = images_per_second(pipe, steps, args.resolution, args.images, args.repeats,
                                                   args.max_sequence_length)
                rows.append({"method": method, "steps": steps, "images_per_s": rate, "images_per_cpu_s": cpu_rate,
                             "lite8b_1024px_tflop_per_image": pipeline_flops_per_image(method, steps) / 1e12})
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.resolution}px, {args.images} images per call, median of {args.repeats}")
    print("| sampler | steps | images/s (wall) | images per CPU-s | transformer TFLOP/image at lite-8B 1024 px |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['steps']} | {r['images_per_s']:.2f} | {r['images_per_cpu_s']:.2f} | "
              f"{r['lite8b_1024px_tflop_per_image']:.1f} |")
    print(f"| teacher | 28 | - | - | {pipeline_flops_per_image('teacher', 28) / 1e12:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "resolution": args.resolution}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
