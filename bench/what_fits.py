"""The README's "What fits" table: ``t2i-distill plan --fit`` for FLUX.1-lite-8B at 512 and 1024 px, 1 and 8 GPUs.

    python bench/what_fits.py --resolution 512 --out bench/results/what_fits-512.committed.json
    python bench/what_fits.py --resolution 1024 --out bench/results/what_fits-1024.committed.json
    python bench/what_fits.py --table bench/results/what_fits-*.committed.json   # the markdown table

Per cell: the fastest fitting setting over the fast JVP modes (``dual``, ``fd``), LoRA off / rank 64, checkpointing
off / on, the backends and the micro-batch (80 GiB, 8 % margin), and for contrast the ``reference`` mode's own
fastest fitting setting. Every figure is a ``plan`` on fake tensors (measured bytes; the speed is an estimate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from t2i_distill.planning.fit import fit
from t2i_distill.planning.plan import GIB, PlanSetting, load_config
from t2i_distill.planning.step import StepSetting

LORA_RANK = 64


def cells(resolution: int, gib: float, log) -> list[dict]:
    name, config = load_config("flux1-lite-8b")
    rows = []
    for gpus in (1, 8):
        base = PlanSetting(step=StepSetting(method="scm", resolution=resolution, max_sequence_length=256),
                           num_processes=gpus, backend="single" if gpus == 1 else "ddp")
        for label, modes in (("fastest", ("dual", "fd")), ("reference", ("reference",))):
            log(f"{resolution} px, {gpus} GPU(s), {label}:")
            start = time.perf_counter()
            result = fit(config, replace(base), gib, modes=modes, lora_ranks=(0, LORA_RANK), model_name=name, log=log)
            result["search_seconds"] = time.perf_counter() - start
            rows.append({"resolution": resolution, "gpus": gpus, "row": label, "result": result})
    return rows


def table(paths: list[str]) -> str:
    lines = ["| px | GPUs | row | mode | backend | micro-batch | checkpointing | LoRA | peak GiB/GPU (phase) | "
             "samples/s, H100 est. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for cell in json.loads(Path(path).read_text())["cells"]:
            r = cell["result"]
            if not r.get("fits"):
                lines.append(f"| {cell['resolution']} | {cell['gpus']} | {cell['row']} | nothing fits | | | | | | |")
                continue
            s = r["setting"]
            lines.append(f"| {cell['resolution']} | {cell['gpus']} | {cell['row']} | {s['jvp']} | {s['backend']} | "
                         f"{s['train_batch_size']} | {'on' if s['gradient_checkpointing'] else 'off'} | "
                         f"{s['lora_rank'] or 'off'} | {r['peak_bytes'] / GIB:.1f} ({r['peak_phase']}) | "
                         f"{r['estimate']['per_gpu']['H100']['samples_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--gib", type=float, default=80.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", nargs="+", default=None, help="print the markdown table of these JSON files")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    start = time.perf_counter()
    rows = cells(args.resolution, args.gib, lambda line: print(line, flush=True))
    payload = {"model": "flux1-lite-8b", "method": "scm", "gib": args.gib, "machine": "2-core x86_64 CPU (fake tensors)",
               "seconds": time.perf_counter() - start, "cells": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(table([args.out]) if args.out else json.dumps(payload, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
