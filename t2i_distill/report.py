"""The parity report (``t2i-distill parity``): the benchmark suite at tiny shapes, parity verdicts and timings, one run.

1. **Kernel parity**: every Triton kernel's output, tangent (explicit API, ``torch.func.jvp``, ``forward_ad``) and
   gradients against float64 truth with the project's rule (``t2i_kernels.testing``), at ragged tiny shapes.
2. **Kernel timings**: ours vs the eager PyTorch reference (``torch.func.jvp`` of it for ``fwd+jvp``; math SDPA for
   attention) per mode.
3. **Student steps** on an embedded tiny FLUX (random weights, no downloads): the sCM and MeanFlow student passes
   for the reference (``torch.func.jvp`` with math attention, as T2I-Distill), the patched model and the explicit
   dual forward.

What is compared lives in :mod:`t2i_distill.benchmarks` (shared with ``bench/``). Without a GPU the kernels run in
Triton's interpreter: the parity verdicts are real; the timings of "ours"/"patched"/"dual" are interpreter overhead,
not GPU speed, and the report says so next to them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from t2i_distill import env
from t2i_distill.benchmarks.ops import OPS, op_parity, op_timing_cases
from t2i_distill.benchmarks.runner import parity_rows, parity_table, speedups, timing_rows, timing_table
from t2i_distill.benchmarks.steps import StepConfig, step_timing_cases

INTERPRETED_NOTE = (
    "kernels ran in Triton's CPU interpreter: timings of ours/patched/dual are interpreter overhead, not GPU speed, "
    "and must not be compared with anything"
)

#: The tiny student steps of the demo (tiny FLUX: hidden 64 = 2 heads × 32; 7 text + 64 image tokens).
DEMO_STEPS = [StepConfig(method="scm", resolution=128, text_tokens=7, batch=2),
              StepConfig(method="meanflow", resolution=128, text_tokens=7, batch=2)]


def run_report(device: torch.device, out_path: Path | None, repeats: int = 5) -> dict[str, object]:
    """Run the suite, print the tables, write the JSON to ``out_path``; the returned dict has ``passed``."""
    started = time.time()
    info = env.collect()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    interpreted = info["kernel_mode"] == "interpreted"
    print("== environment\n" + env.format_env(info))

    parity, kernel_timings = [], []
    for spec in OPS.values():
        shape = spec.cpu_shapes[0]
        parity += parity_rows(op_parity(spec, shape, device, dtype), shape)
        kernel_timings += timing_rows(op_timing_cases(spec, shape, device, dtype, compile_provider=False), device,
                                      repeats)
    print("\n== kernel parity vs float64 truth (rule: |ours-truth| <= k*|torch-truth| + atol + rtol*max|truth|)")
    print(parity_table(parity))
    print("\n== kernel timings")
    print(timing_table(kernel_timings, interpreted))

    step_rows = []
    for cfg in DEMO_STEPS:
        step_rows += timing_rows(step_timing_cases(cfg, device, dtype), device, repeats)
    print("\n== student steps on the tiny FLUX (reference = torch.func.jvp with math attention, as T2I-Distill)")
    print(timing_table(step_rows, interpreted))
    jvp_over_fwd = {
        r["op"]: r["p50_ms"] / next(f["p50_ms"] for f in step_rows
                                    if f["op"] == r["op"] and f["provider"] == "reference" and f["mode"] == "fwd")
        for r in step_rows if r["provider"] == "reference" and r["mode"] == "jvp" and r.get("p50_ms")
    }
    for label, ratio in jvp_over_fwd.items():
        print(f"reference JVP pass = {ratio:.1f}x its forward ({label}, this machine)")
    if interpreted:
        print(f"NOTE: {INTERPRETED_NOTE}.")

    passed = all(r["passed"] for r in parity)
    result = {
        "env": info,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "parity": parity,
        "kernel_timings": kernel_timings,
        "steps": step_rows,
        "step_configs": [cfg.__dict__ for cfg in DEMO_STEPS],
        "reference_jvp_over_forward": jvp_over_fwd,
        "speedups": {" | ".join(map(str, k)): v for k, v in speedups(kernel_timings + step_rows).items()},
        "timings_note": INTERPRETED_NOTE if interpreted else "compiled kernels on the GPU named in env",
        "wall_s": time.time() - started,
        "passed": passed,
    }
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nJSON written to {out_path}")
    print(f"\nparity: {'all PASS' if passed else 'FAILURES above'} ({result['wall_s']:.0f} s)")
    return result
