"""The demo report: parity verdicts and reference-vs-ours timings on the embedded tiny FLUX, in one run.

What it measures:

1. **The reference model**: the tiny FLUX's forward, and ``torch.func.jvp`` over it with math attention (the only
   SDPA backend with forward AD), which is what T2I-Distill runs for every sCM/MeanFlow step.
2. **Kernel parity** at the model's activation shape (B, joint tokens, hidden): every Triton kernel's output,
   tangent (explicit API, ``torch.func.jvp``, ``forward_ad``) and gradients against float64 truth, with the
   project's parity rule (``kernels.testing``).
3. **Kernel timings** against the eager PyTorch reference, per mode (``fwd``, ``fwd+jvp``, ``fwd+bwd``).

On a machine without a GPU the kernels run in Triton's interpreter: the parity verdicts are real, the timings of
"ours" are not GPU speed and say nothing about it (the report says so next to the numbers).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels import reference as ref
from kernels.testing import ParityReport, parity_report
from t2i_distill import env
from t2i_distill.tiny import TINY_FLUX_CONFIG, TinyFluxShape, build_tiny_flux, tiny_flux_inputs

INTERPRETED_NOTE = (
    "kernels ran in Triton's CPU interpreter: 'ours' timings are interpreter overhead, not GPU speed, "
    "and must not be compared with anything"
)


# ---- timing -----------------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median and 20th/80th percentiles of ``fn``'s wall time in ms (CUDA synchronised around every call)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return {"median_ms": statistics.median(samples), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "repeats": repeats}


# ---- the reference model ----------------------------------------------------------------------------------------
def reference_model_timings(device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, object]:
    """Forward and ``torch.func.jvp`` (math attention, no_grad, as the reference) of the tiny FLUX."""
    model = build_tiny_flux(dtype=dtype, device=device)
    inputs = tiny_flux_inputs(model)
    x, t = inputs.pop("hidden_states"), inputs.pop("timestep")
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, **inputs, return_dict=False)[0]

    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()

    def run_forward() -> None:
        with torch.no_grad(), autocast:
            forward(x, t)

    def run_jvp() -> None:
        with torch.no_grad(), autocast, sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(forward, (x, t), (tx, tt))

    fwd, jvp = time_ms(run_forward, device, repeats), time_ms(run_jvp, device, repeats)
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_FLUX_CONFIG.items()},
        "shape": TinyFluxShape().__dict__,
        "forward": fwd,
        "reference_jvp": jvp,
        "jvp_over_forward": jvp["median_ms"] / fwd["median_ms"],
    }


# ---- kernel parity ----------------------------------------------------------------------------------------------
def _f64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().double() for t in tensors]


def _grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad.to(leaves[0].dtype))
    return [t.grad for t in leaves]


def gated_residual_parity(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> list[ParityReport]:
    """Output, tangent through the three forward-mode front ends, and dx/dgate/dy against float64 truth."""
    b, n, d = shape
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    x, tx, y, ty, gate, tgate = mk(b, n, d), mk(b, n, d), mk(b, n, d), mk(b, n, d), mk(b, d), mk(b, d)
    truth_out, truth_t = ref.gated_residual_jvp(*_f64(x, tx, gate, tgate, y, ty))
    torch_out, torch_t = ref.gated_residual_jvp(x, tx, gate, tgate, y, ty)
    op = "gated_residual"

    out, tout = kernels.gated_residual_jvp(x, tx, gate, tgate, y, ty)
    _, func_t = torch.func.jvp(kernels.gated_residual, (x, gate, y), (tx, tgate, ty))
    with fwAD.dual_level():
        dual = kernels.gated_residual(fwAD.make_dual(x, tx), fwAD.make_dual(gate, tgate), fwAD.make_dual(y, ty))
        fwad_t = fwAD.unpack_dual(dual).tangent
    reports = [
        parity_report(op, "out", kernels.gated_residual(x, gate, y), torch_out, truth_out),
        parity_report(op, "tangent", tout, torch_t, truth_t),
        parity_report(op, "tangent", func_t, torch_t, truth_t),
        parity_report(op, "tangent", fwad_t, torch_t, truth_t),
    ]
    for r, how in zip(reports[1:], ("gated_residual_jvp", "torch.func.jvp", "forward_ad")):
        r.quantity = f"tangent ({how})"
    grad = mk(b, n, d)
    truth = _grads(ref.gated_residual, _f64(x, gate, y), grad)
    same = _grads(ref.gated_residual, [x, gate, y], grad)
    ours = _grads(kernels.gated_residual, [x, gate, y], grad)
    for name, o, s, t in zip(("dx", "dgate", "dy"), ours, same, truth):
        reports.append(parity_report(op, name, o, s, t))
    return reports


# ---- kernel timings ---------------------------------------------------------------------------------------------
def gated_residual_timings(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                           repeats: int) -> list[dict[str, object]]:
    b, n, d = shape
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    x, tx, y, ty, gate, tgate = mk(b, n, d), mk(b, n, d), mk(b, n, d), mk(b, n, d), mk(b, d), mk(b, d)
    grad = mk(b, n, d)

    def fwd_bwd(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        leaves = [t.detach().clone().requires_grad_() for t in (x, gate, y)]
        return lambda: fn(*leaves).backward(grad)

    cases = {
        ("fwd", "reference"): lambda: ref.gated_residual(x, gate, y),
        ("fwd", "ours"): lambda: kernels.gated_residual(x, gate, y),
        ("fwd+jvp", "reference"): lambda: torch.func.jvp(ref.gated_residual, (x, gate, y), (tx, tgate, ty)),
        ("fwd+jvp", "ours"): lambda: kernels.gated_residual_jvp(x, tx, gate, tgate, y, ty),
        ("fwd+bwd", "reference"): fwd_bwd(ref.gated_residual),
        ("fwd+bwd", "ours"): fwd_bwd(kernels.gated_residual),
    }
    rows = []
    for (mode, provider), fn in cases.items():
        rows.append({"op": "gated_residual", "mode": mode, "provider": provider, "shape": list(shape),
                     "dtype": str(dtype).removeprefix("torch."), **time_ms(fn, device, repeats)})
    return rows


# ---- the whole report -------------------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def run_report(device: torch.device, out_path: Path | None, repeats: int = 5) -> dict[str, object]:
    """Run everything, print the tables, write the JSON to ``out_path``; the dict has ``passed``."""
    info = env.collect()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print("== environment\n" + env.format_env(info))

    model = reference_model_timings(device, dtype, repeats)
    tokens = TinyFluxShape()
    hidden = TINY_FLUX_CONFIG["num_attention_heads"] * TINY_FLUX_CONFIG["attention_head_dim"]
    shape = (tokens.batch, tokens.joint_tokens, hidden)
    print(f"\n== reference tiny FLUX ({device}, {str(dtype).removeprefix('torch.')}; 1 double + 1 single block, "
          f"B={shape[0]}, L={shape[1]}, hidden={shape[2]})")
    print(_table(["pass", "median ms", "p20", "p80"], [
        [name, f"{m['median_ms']:.2f}", f"{m['p20_ms']:.2f}", f"{m['p80_ms']:.2f}"]
        for name, m in (("forward (no grad)", model["forward"]),
                        ("torch.func.jvp, math attention", model["reference_jvp"]))
    ]))
    print(f"reference JVP costs {model['jvp_over_forward']:.1f}x a forward on this machine")

    reports = gated_residual_parity(shape, dtype, device)
    print(f"\n== kernel parity at the model's activation shape {shape} vs float64 truth "
          "(rule: |ours-truth| <= k*|torch-truth| + atol, kernels.testing)")
    print(_table(["op", "quantity", "max|ours-truth|", "max|torch-truth|", "bound", "verdict"], [
        [r.op, r.quantity, f"{r.kernel_error:.2e}", f"{r.torch_error:.2e}", f"{r.bound:.2e}",
         "PASS" if r.passed else "FAIL"] for r in reports
    ]))

    timings = gated_residual_timings(shape, dtype, device, repeats)
    interpreted = info["kernel_mode"] == "interpreted"
    print("\n== kernel timings (eager PyTorch reference vs ours)")
    ref_ms = {(r["op"], r["mode"]): r["median_ms"] for r in timings if r["provider"] == "reference"}
    print(_table(["op", "mode", "provider", "median ms", "p20", "p80", "speed-up vs reference"], [
        [r["op"], r["mode"], r["provider"], f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}", f"{r['p80_ms']:.3f}",
         "n/a (interpreted)" if interpreted and r["provider"] == "ours"
         else f"{ref_ms[(r['op'], r['mode'])] / r['median_ms']:.2f}x"]
        for r in timings
    ]))
    if interpreted:
        print(f"NOTE: {INTERPRETED_NOTE}.")

    passed = all(r.passed for r in reports)
    result = {
        "env": info,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "reference_model": model,
        "parity": [{"op": r.op, "quantity": r.quantity, "dtype": str(r.dtype).removeprefix("torch."),
                    "kernel_error": r.kernel_error, "torch_error": r.torch_error, "bound": r.bound,
                    "mismatches": r.mismatches, "passed": r.passed} for r in reports],
        "timings": timings,
        "timings_note": INTERPRETED_NOTE if interpreted else "compiled kernels on the GPU named in env",
        "passed": passed,
    }
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nJSON written to {out_path}")
    print(f"\nparity: {'all PASS' if passed else 'FAILURES above'}")
    return result
