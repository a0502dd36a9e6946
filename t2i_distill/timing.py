"""Wall-clock measurement shared by the demo report and the GPU check (pytest-benchmark has its own fixture)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5, quick: bool = False) -> dict[str, float]:
    """``{"p50_ms", "p20_ms", "p80_ms"}`` of one call of ``fn``.

    On CUDA: ``triton.testing.do_bench`` (synchronised, L2 flushed between calls, its own repetition count). On the
    CPU: ``repeats`` timed calls after one warm-up call.
    """
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80}
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()

    def pick(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    return {"p50_ms": statistics.median(samples), "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def peak_extra_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call beyond what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30
