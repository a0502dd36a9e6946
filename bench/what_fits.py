"""The README's "What fits" table: ``t2i-distill plan --fit`` for FLUX.1-lite-8B at 512 and 1024 px, 1 and 8 GPUs.

    python bench/what_fits.py --resolution 512 --out bench/results/what_fits-512.committed.json
    python bench/what_fits.py --resolution 1024 --out bench/results/what_fits-1024.committed.json
    python bench/what_fits.py --table bench/results/what_fits-*.committed.json   # the markdown table (--rows setting)

Per resolution and GPU count (1, 8): ``t2i-distill plan --fit 80``'s search (modes ``dual``, ``func``, ``fd``,
``reference``; LoRA off / rank 64; checkpointing off / on; the backends; the micro-batch) for the fastest fitting
setting, and the same search over ``reference`` alone for contrast; then the fixed settings of :data:`SETTINGS`.
Every figure is a ``plan`` on fake tensors: measured bytes per GPU; the speed is an estimate from FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from t2i_distill.planning.fit import fit, usable_bytes
from t2i_distill.planning.plan import GIB, PlanSetting, load_config, plan
from t2i_distill.planning.step import StepSetting

LORA_RANK = 64


#: The settings planned for the README (scm, FLUX.1-lite-8B, bf16, AdamW): (GPUs, backend, mode, checkpointing, LoRA
#: rank, micro-batch). The exhaustive search is ``t2i-distill plan --fit 80`` (minutes per cell on 2 cores).
SETTINGS = [
    (1, "single", "dual", False, 0, 1), (1, "single", "dual", False, LORA_RANK, 1),
    (1, "single", "dual", True, LORA_RANK, 4), (1, "single", "reference", False, LORA_RANK, 1),
    (1, "single", "reference", True, LORA_RANK, 1),
    (8, "fsdp2", "dual", False, 0, 1), (8, "fsdp2", "dual", True, 0, 4), (8, "deepspeed", "dual", True, 0, 4),
    (8, "fsdp2", "reference", False, 0, 1), (8, "fsdp2", "reference", True, 0, 1),
]


def cells(resolution: int, gib: float, log) -> list[dict]:
    name, config = load_config("flux1-lite-8b")
    rows, cache = [], {}
    for gpus in (1, 8):
        base = PlanSetting(step=StepSetting(method="scm", resolution=resolution, max_sequence_length=256),
                           num_processes=gpus, backend="single" if gpus == 1 else "ddp")
        for label, modes in (("fastest", ("dual", "func", "fd", "reference")), ("reference", ("reference",))):
            log(f"{resolution} px, {gpus} GPU(s), {label} (--fit {gib:g}):")
            start = time.perf_counter()
            result = fit(config, base, gib, modes=modes, lora_ranks=(0, LORA_RANK), model_name=name, log=log,
                         cache=cache)
            result["search_seconds"] = time.perf_counter() - start
            rows.append({"resolution": resolution, "gpus": gpus, "row": f"fit: {label}", "result": result})
    for gpus, backend, mode, checkpointing, lora, batch in SETTINGS:
        step = StepSetting(method="scm", jvp=mode, resolution=resolution, max_sequence_length=256,
                           gradient_checkpointing=checkpointing, lora_rank=lora, train_batch_size=batch)
        start = time.perf_counter()
        result = plan(config, PlanSetting(step=step, backend=backend, num_processes=gpus), name, cache)
        result["fits"] = result["peak_bytes"] <= usable_bytes(gib)
        result["plan_seconds"] = time.perf_counter() - start
        log(f"{resolution} px {gpus} GPU {backend} {mode} checkpointing {checkpointing} LoRA {lora} micro-batch "
            f"{batch}: {result['peak_bytes'] / GIB:.1f} GiB ({result['plan_seconds']:.0f} s)")
        rows.append({"resolution": resolution, "gpus": gpus, "row": "setting", "result": result})
    return rows


def table(paths: list[str], rows: str = "fit") -> str:
    """The markdown table of the ``fit`` rows (the fastest fitting setting, and reference's) or the fixed ``setting``
    rows."""
    lines = ["| px | GPUs | row | mode | backend | micro-batch | checkpointing | LoRA | peak GiB/GPU (phase) | "
             "samples/s, all GPUs, H100 est. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for cell in json.loads(Path(path).read_text())["cells"]:
            if not cell["row"].startswith(rows):
                continue
            r = cell["result"]
            label = cell["row"].removeprefix("fit: ") if rows == "fit" else ("fits" if r["fits"] else "too big")
            if rows == "fit" and not r["fits"]:
                lines.append(f"| {cell['resolution']} | {cell['gpus']} | {label} | nothing fits | | | | | | |")
                continue
            s = r["setting"]
            lines.append(f"| {cell['resolution']} | {cell['gpus']} | {label} | {s['jvp']} | {s['backend']} | "
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
    parser.add_argument("--rows", default="fit", choices=["fit", "setting"], help="which rows --table prints")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table, args.rows))
        return 0
    start = time.perf_counter()
    rows = cells(args.resolution, args.gib, lambda line: print(line, flush=True))
    payload = {"model": "flux1-lite-8b", "method": "scm", "gib": args.gib,
               "machine": "2-core x86_64 CPU (fake tensors)",
               "seconds": time.perf_counter() - start, "cells": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(table([args.out]) if args.out else json.dumps(payload, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
