"""The demo report: parity verdicts and reference-vs-ours timings on the embedded tiny FLUX, in one run.

What it measures:

1. **The reference model**: the tiny FLUX's forward, and ``torch.func.jvp`` over it with math attention (the only
   SDPA backend with forward AD), which is what T2I-Distill runs for every sCM/MeanFlow step.
2. **Kernel parity** at the model's own activation shapes (hidden states (B, L, hidden), attention (B, H, L, head
   dim)): every Triton kernel's output, tangent (explicit API, ``torch.func.jvp``, ``forward_ad``) and gradients
   against float64 truth, with the project's parity rule (``kernels.testing``).
3. **Kernel timings** against the eager PyTorch reference, per mode (``fwd``, ``fwd+jvp``, ``fwd+bwd``).

The checks themselves live in :mod:`t2i_distill.kernel_checks` (shared with ``bench/``). On a machine without a GPU
the kernels run in Triton's interpreter: the parity verdicts are real, the timings of "ours" are not GPU speed and
say nothing about it (the report says so next to the numbers).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i_distill import env
from t2i_distill.kernel_checks import CHECKS
from t2i_distill.tables import markdown_table
from t2i_distill.timing import measure
from t2i_distill.tiny import TINY_FLUX_CONFIG, TinyFluxShape, build_tiny_flux, tiny_flux_inputs

INTERPRETED_NOTE = (
    "kernels ran in Triton's CPU interpreter: 'ours' timings are interpreter overhead, not GPU speed, "
    "and must not be compared with anything"
)


def tiny_flux_op_shapes(tokens: TinyFluxShape = TinyFluxShape()) -> dict[str, tuple[int, ...]]:
    """The shape each kernel sees inside the tiny FLUX's blocks."""
    heads, head_dim = TINY_FLUX_CONFIG["num_attention_heads"], TINY_FLUX_CONFIG["attention_head_dim"]
    return {
        "gated_residual": (tokens.batch, tokens.joint_tokens, heads * head_dim),
        "attention": (tokens.batch, heads, tokens.joint_tokens, head_dim),
    }


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

    fwd, jvp = measure(run_forward, device, repeats), measure(run_jvp, device, repeats)
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_FLUX_CONFIG.items()},
        "shape": TinyFluxShape().__dict__,
        "forward": fwd,
        "reference_jvp": jvp,
        "jvp_over_forward": jvp["p50_ms"] / fwd["p50_ms"],
    }


def run_report(device: torch.device, out_path: Path | None, repeats: int = 5) -> dict[str, object]:
    """Run everything, print the tables, write the JSON to ``out_path``; the dict has ``passed``."""
    info = env.collect()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    print("== environment\n" + env.format_env(info))

    model = reference_model_timings(device, dtype, repeats)
    shapes = tiny_flux_op_shapes()
    b, length, hidden = shapes["gated_residual"]
    print(f"\n== reference tiny FLUX ({device}, {dtype_name}; 1 double + 1 single block, B={b}, L={length}, "
          f"hidden={hidden})")
    print(markdown_table(["pass", "p50 ms", "p20", "p80"], [
        [name, f"{m['p50_ms']:.2f}", f"{m['p20_ms']:.2f}", f"{m['p80_ms']:.2f}"]
        for name, m in (("forward (no grad)", model["forward"]),
                        ("torch.func.jvp, math attention", model["reference_jvp"]))
    ]))
    print(f"reference JVP costs {model['jvp_over_forward']:.1f}x a forward on this machine")

    reports, timings = [], []
    for op, (parity, timing_cases) in CHECKS.items():
        reports += parity(shapes[op], device, dtype)
        for case in timing_cases(shapes[op], device, dtype):
            timings.append({"op": case.op, "mode": case.mode, "provider": case.provider, "shape": list(case.shape),
                            "dtype": dtype_name, **measure(case.fn, device, repeats)})

    print("\n== kernel parity at the tiny FLUX's activation shapes vs float64 truth "
          "(rule: |ours-truth| <= k*|torch-truth| + atol + rtol*max|truth|, kernels.testing)")
    print(markdown_table(["op", "quantity", "max|ours-truth|", "max|torch-truth|", "bound", "verdict"], [
        [r.op, r.label or r.quantity, f"{r.kernel_error:.2e}", f"{r.torch_error:.2e}", f"{r.bound:.2e}",
         "PASS" if r.passed else "FAIL"] for r in reports
    ]))

    interpreted = info["kernel_mode"] == "interpreted"
    baseline = {(r["op"], r["mode"]): r["p50_ms"] for r in timings if r["provider"] == "reference"}
    print("\n== kernel timings (the reference: eager PyTorch, math attention under torch.func.jvp for attention)")
    print(markdown_table(["op", "shape", "mode", "provider", "p50 ms", "p20", "p80", "speed-up vs reference"], [
        [r["op"], r["shape"], r["mode"], r["provider"], f"{r['p50_ms']:.3f}", f"{r['p20_ms']:.3f}",
         f"{r['p80_ms']:.3f}",
         "n/a (interpreted)" if interpreted and r["provider"].startswith("ours")
         else (f"{baseline[(r['op'], r['mode'])] / r['p50_ms']:.2f}x" if (r["op"], r["mode"]) in baseline else "-")]
        for r in timings
    ]))
    if interpreted:
        print(f"NOTE: {INTERPRETED_NOTE}.")

    passed = all(r.passed for r in reports)
    result = {
        "env": info,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "dtype": dtype_name,
        "reference_model": model,
        "parity": [{"op": r.op, "quantity": r.label or r.quantity, "dtype": str(r.dtype).removeprefix("torch."),
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
