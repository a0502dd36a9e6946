"""Run timing cases and parity checks into plain rows (dicts), and format them: shared by every report."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from t2i_distill.benchmarks.common import TimingCase
from t2i_distill.tables import markdown_table
from t2i_distill.timing import measure, peak_extra_gib
from t2i_kernels.testing import ParityReport

__all__ = ["parity_rows", "parity_table", "speedups", "timing_rows", "timing_table"]


def timing_rows(cases: Iterable[TimingCase], device: torch.device, repeats: int = 5,
                quick: bool = False) -> list[dict[str, object]]:
    """Time every case (a failing case becomes a row with its error, so one run yields every other figure)."""
    rows = []
    for case in cases:
        row: dict[str, object] = {"op": case.op, "shape": list(case.shape), "mode": case.mode,
                                  "provider": case.provider}
        try:
            row.update(measure(case.fn, device, repeats=repeats, quick=quick))
            row["peak_extra_gib"] = peak_extra_gib(case.fn, device)
            row["error"] = None
        except Exception as exc:  # e.g. a baseline that cannot run on this machine
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if row.get("p50_ms") and case.flops:
            row["tflops"] = case.flops / (row["p50_ms"] * 1e-3) / 1e12
        if row.get("p50_ms") and case.bytes:
            row["gbps"] = case.bytes / (row["p50_ms"] * 1e-3) / 1e9
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def parity_rows(reports: Iterable[ParityReport], shape) -> list[dict[str, object]]:
    return [{"op": r.op, "shape": list(shape), "quantity": r.label or r.quantity,
             "dtype": str(r.dtype).removeprefix("torch."), "kernel_error": r.kernel_error,
             "torch_error": r.torch_error, "bound": r.bound, "mismatches": r.mismatches, "passed": r.passed}
            for r in reports]


def speedups(rows: list[dict[str, object]], baseline: str = "reference") -> dict[tuple, float]:
    """(op, shape, mode, provider) -> baseline p50 / provider p50, for rows whose baseline was measured."""
    base = {(r["op"], str(r["shape"]), r["mode"]): r["p50_ms"] for r in rows
            if r["provider"] == baseline and r.get("p50_ms")}
    out = {}
    for r in rows:
        key = (r["op"], str(r["shape"]), r["mode"])
        if key in base and r.get("p50_ms"):
            out[key + (r["provider"],)] = base[key] / r["p50_ms"]
    return out


def timing_table(rows: list[dict[str, object]], interpreted: bool = False) -> str:
    ratio = speedups(rows)

    def speed(r):
        if interpreted and str(r["provider"]).startswith(("ours", "patched", "dual")):
            return "n/a (interpreted)"
        value = ratio.get((r["op"], str(r["shape"]), r["mode"], r["provider"]))
        return "-" if value is None else f"{value:.2f}x"

    return markdown_table(
        ["op", "shape", "mode", "provider", "p50 ms", "p20", "p80", "TFLOP/s", "GB/s", "peak extra GiB",
         "vs reference"],
        [[r["op"], r["shape"], r["mode"], r["provider"],
          f"{r['p50_ms']:.3f}" if r.get("p50_ms") is not None else f"error: {r['error']}",
          f"{r['p20_ms']:.3f}" if r.get("p20_ms") is not None else "-",
          f"{r['p80_ms']:.3f}" if r.get("p80_ms") is not None else "-",
          f"{r['tflops']:.1f}" if "tflops" in r else "-", f"{r['gbps']:.0f}" if "gbps" in r else "-",
          f"{r['peak_extra_gib']:.3f}" if r.get("peak_extra_gib") is not None else "-", speed(r)]
         for r in rows])


def parity_table(rows: list[dict[str, object]]) -> str:
    return markdown_table(
        ["op", "shape", "quantity", "dtype", "max|ours-truth|", "max|torch-truth|", "bound", "verdict"],
        [[r["op"], r["shape"], r["quantity"], r["dtype"], f"{r['kernel_error']:.2e}",
          "-" if r["torch_error"] is None else f"{r['torch_error']:.2e}", f"{r['bound']:.2e}",
          "PASS" if r["passed"] else "FAIL"] for r in rows])
