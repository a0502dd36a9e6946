"""One prepared GPU check: bf16 parity at FLUX shapes, then the headline timings against the reference, in one run.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--quick]
    python bench/gpu_check.py --cpu-smoke        # the same code path at tiny fp32 shapes under the interpreter

Designed for a lent H100/H200 with a short budget (≤ 8 minutes): it installs nothing, prints a short table last and
writes a JSON (GPU name, versions, git SHA, date) with every figure. Parity failures are reported, not raised, so one
run yields all numbers; the exit code is 1 if any parity check failed.

What is compared, and the FLOP/byte formulas, come from :mod:`t2i_distill.kernel_checks` (rCM's FLOP convention
for attention, so figures compare with docs/anchors.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # --cpu-smoke: the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kernels.testing import ATTENTION_BF16_TANGENT_REL_ERROR  # noqa: E402
from t2i_distill.kernel_checks import CHECKS, attention_rel_tangent_error  # noqa: E402
from t2i_distill.tables import markdown_table  # noqa: E402
from t2i_distill.timing import measure, peak_extra_gib  # noqa: E402

#: FLUX shapes per op: 512 px (1024 image + 256/512 text tokens) and 1024 px, at batch 1-2.
GPU_SHAPES = {
    "attention": [(2, 24, 1280, 128), (2, 24, 1536, 128), (1, 24, 4352, 128), (1, 24, 4608, 128)],
    "gated_residual": [(2, 1536, 3072), (1, 4608, 3072)],
}
SMOKE_SHAPES = {"attention": [(1, 2, 70, 32)], "gated_residual": [(2, 37, 48)]}


def parity_rows(op: str, shape, device, dtype) -> list[dict[str, object]]:
    parity, _ = CHECKS[op]
    rows = [{"op": op, "shape": list(shape), "quantity": r.label or r.quantity, "kernel_max_err": r.kernel_error,
             "torch_max_err": r.torch_error, "rule_bound": r.bound, "passed": r.passed}
            for r in parity(shape, device, dtype)]
    if op == "attention" and dtype == torch.bfloat16:
        rel = attention_rel_tangent_error(shape, device, dtype)
        rows.append({"op": op, "shape": list(shape), "quantity": "tangent ‖err‖/‖ref‖ (attention_jvp)",
                     "kernel_max_err": rel, "torch_max_err": None, "rule_bound": ATTENTION_BF16_TANGENT_REL_ERROR,
                     "passed": rel <= ATTENTION_BF16_TANGENT_REL_ERROR})
    return rows


def timing_rows(op: str, shape, device, dtype, quick: bool) -> list[dict[str, object]]:
    _, timing_cases = CHECKS[op]
    rows = []
    for case in timing_cases(shape, device, dtype):
        try:
            timing = measure(case.fn, device, quick=quick)
            extra, error = peak_extra_gib(case.fn, device), None
        except Exception as exc:  # a baseline that cannot run here (e.g. no flash SDPA) is reported, not fatal
            timing, extra, error = {}, None, f"{type(exc).__name__}: {exc}"[:200]
        row = {"op": op, "shape": list(shape), "mode": case.mode, "provider": case.provider, **timing,
               "peak_extra_gib": extra, "error": error}
        if timing and case.flops:
            row["tflops"] = case.flops / (timing["p50_ms"] * 1e-3) / 1e12
        if timing and case.bytes:
            row["gbps"] = case.bytes / (timing["p50_ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------------------------------
def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/gpu_check-<gpu>-<date>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shapes under the interpreter")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke to exercise the code path at tiny shapes", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = GPU_SHAPES if cuda else SMOKE_SHAPES
    gpu = torch.cuda.get_device_name(0) if cuda else "none (cpu smoke, interpreted)"
    import triton

    started = time.time()
    parity, timings = [], []
    for op, op_shapes in shapes.items():
        for shape in op_shapes:
            parity += parity_rows(op, shape, device, dtype)
            if cuda:
                torch.cuda.empty_cache()
    for op, op_shapes in shapes.items():
        for shape in op_shapes:
            timings += timing_rows(op, shape, device, dtype, args.quick)
            if cuda:
                torch.cuda.empty_cache()

    result = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "git_sha": _git_sha(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": str(dtype),
        "wall_s": time.time() - started, "parity": parity, "timings": timings,
        "passed": all(r["passed"] for r in parity),
    }
    out = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / f"gpu_check-{gpu.split(' (')[0].replace(' ', '_')}-"
        f"{time.strftime('%Y%m%d-%H%M')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(markdown_table(["op", "shape", "quantity", "max err ours", "max err torch", "bound", "verdict"], [
        [r["op"], r["shape"], r["quantity"], f"{r['kernel_max_err']:.2e}",
         "-" if r["torch_max_err"] is None else f"{r['torch_max_err']:.2e}", f"{r['rule_bound']:.2e}",
         "PASS" if r["passed"] else "FAIL"]
        for r in parity
    ]))
    print()
    print(markdown_table(["op", "shape", "mode", "provider", "p50 ms", "TFLOP/s", "GB/s", "peak extra GiB"], [
        [r["op"], r["shape"], r["mode"], r["provider"], f"{r['p50_ms']:.3f}" if "p50_ms" in r else r["error"],
         f"{r['tflops']:.0f}" if "tflops" in r else "-", f"{r['gbps']:.0f}" if "gbps" in r else "-",
         f"{r['peak_extra_gib']:.3f}" if r.get("peak_extra_gib") is not None else "-"]
        for r in timings
    ]))
    print(f"\n{gpu}, torch {torch.__version__}, triton {triton.__version__}; {result['wall_s']:.0f} s; JSON: {out}")
    if not cuda:
        print("CPU smoke run: interpreted timings say nothing about GPU speed.")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
