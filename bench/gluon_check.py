"""The Gluon sm_90 attention's part of the GPU check, run in a child process of ``bench/gpu_check.py``.

    python bench/gluon_check.py --out gluon.json [--quick]     # what gpu_check.py launches, with a timeout

Why a child process: :mod:`t2i_kernels.attention_gluon` has never run on a GPU, and a wrong mbarrier phase hangs a
kernel rather than failing it. The parent kills a child that outlives its timeout and keeps every other figure.

What it measures, for the default and the warp-specialised variant: parity of ``o`` and ``to`` against truth (the
fp32 reference on GPUs, as :mod:`t2i_distill.benchmarks` does for every kernel) under the tolerance table, at ragged
shapes and at the attention op's GPU (FLUX) shapes; then the fwd+jvp time of each variant, in the same rows and
FLOP convention as the other attention providers (rCM's 12·B·H·N²·D). The JSON holds ``parity``, ``timings`` and
``notes``; rows are written as they are produced, so a timeout still leaves what finished. ``--smoke`` runs one
small shape per variant: the parent runs it first with a short timeout, so a hang costs a minute, not the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

#: Ragged lengths (not multiples of the 128-row or 16/64-key tiles) at both supported head dims, before FLUX shapes.
RAGGED_SHAPES = [(1, 3, 100, 37, 128), (2, 2, 257, 300, 64)]
VARIANTS = {"ours (gluon)": False, "ours (gluon, warp-specialised)": True}


def _inputs(b, h, n_q, n_k, d, device, dtype, seed=0):
    """q, tq (B, Nq, H, D) memory and k, v, tk, tv (B, Nk, H, D), viewed as (B, H, N, D): FLUX's own layout."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def make(n):
        return torch.randn(b, n, h, d, device=device, dtype=dtype, generator=gen).transpose(1, 2)

    return make(n_q), make(n_k), make(n_k), make(n_q), make(n_k), make(n_k)


def parity(shape, device, dtype, warp_specialize: bool, label: str) -> list[dict[str, object]]:
    from t2i_distill.benchmarks.common import truth_dtype_for
    from t2i_distill.benchmarks.runner import parity_rows
    from t2i_kernels import reference as ref
    from t2i_kernels.attention_gluon import attention_jvp_gluon
    from t2i_kernels.testing import parity_report

    b, h, n_q, n_k, d = shape if len(shape) == 5 else (*shape[:3], shape[2], shape[3])
    q, k, v, tq, tk, tv = _inputs(b, h, n_q, n_k, d, device, dtype)
    o, to, _ = attention_jvp_gluon(q, k, v, tq, tk, tv, warp_specialize=warp_specialize)
    torch.cuda.synchronize(device)
    same_o, same_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    truth_dtype = truth_dtype_for(device)
    truth_o, truth_t = ref.attention_jvp(*(t.to(truth_dtype) for t in (q, k, v, tq, tk, tv)))
    reports = [parity_report("attention", quantity, ours, same, truth, label=f"{quantity} ({label})")
               for quantity, ours, same, truth in (("out", o, same_o, truth_o), ("tangent", to, same_t, truth_t))]
    return parity_rows(reports, shape)


def timing(shape, device, dtype, warp_specialize: bool, label: str, quick: bool) -> list[dict[str, object]]:
    from t2i_distill.benchmarks.common import TimingCase
    from t2i_distill.benchmarks.runner import timing_rows
    from t2i_kernels.attention_gluon import attention_jvp_gluon

    b, h, n, d = shape
    q, k, v, tq, tk, tv = _inputs(b, h, n, n, d, device, dtype)
    case = TimingCase("attention", "fwd+jvp", label, tuple(shape),
                      lambda: attention_jvp_gluon(q, k, v, tq, tk, tv, warp_specialize=warp_specialize),
                      flops=12.0 * b * h * n * n * d)
    return timing_rows([case], device, quick=quick)


def run(out: Path, quick: bool, smoke: bool = False) -> int:
    from t2i_distill.benchmarks.ops import OPS

    result: dict[str, list] = {"parity": [], "timings": [], "notes": []}

    def save():
        out.write_text(json.dumps(result, indent=2, default=str))

    if not torch.cuda.is_available():
        result["notes"].append("no CUDA device: the Gluon kernel runs only on sm_90 GPUs")
        save()
        return 0
    device, dtype = torch.device("cuda"), torch.bfloat16
    gpu_shapes = [] if smoke else [tuple(s) for s in OPS["attention"].gpu_shapes]
    ragged = RAGGED_SHAPES[:1] if smoke else RAGGED_SHAPES
    for label, ws in VARIANTS.items():
        for shape in ragged + gpu_shapes:
            try:
                result["parity"] += parity(shape, device, dtype, ws, label)
            except Exception as exc:  # e.g. GluonUnavailableError on a non-sm_90 GPU: say so, keep going
                result["notes"].append(f"{label} parity {list(shape)}: {type(exc).__name__}: {exc}"[:400])
            save()
            torch.cuda.empty_cache()
    for label, ws in VARIANTS.items():
        for shape in gpu_shapes:
            result["timings"] += timing(shape, device, dtype, ws, label, quick)
            save()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--smoke", action="store_true", help="one small ragged shape per variant, no timing (a "
                        "first call that shows within seconds whether the kernel hangs)")
    args = parser.parse_args(argv)
    return run(Path(args.out), args.quick, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
