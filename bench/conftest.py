"""Benchmark harness: interpreter without a GPU (tiny shapes only), synchronised timing, machine info in the JSON.

Each ``bench/test_bench_<op>.py`` only names its op; what is timed, at which shapes, and the FLOP/byte count of one
call come from :mod:`t2i_distill.benchmarks.ops` (shared with the demo report and ``gpu_check``). On a GPU, FLUX
shapes and bf16; without one, tiny fp32 shapes under the interpreter (those timings say nothing about GPU speed and
are marked ``interpreted`` in the JSON).

``--benchmark-compile`` adds ``torch.compile`` baselines on GPUs (slow to build; off by default).
"""

from __future__ import annotations

import os
import subprocess

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from t2i_distill.benchmarks.ops import op_timing_cases  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
COMPILE = HAS_CUDA and os.environ.get("T2I_BENCH_COMPILE", "0") == "1"


def DEVICE_SHAPES(spec):  # noqa: N802 - reads like a constant at the call sites
    return spec.gpu_shapes if HAS_CUDA else spec.cpu_shapes


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def run_case(benchmark):
    """``run_case(spec, shape, mode, provider)``: time that case with pytest-benchmark, synchronising after every call
    (its timer is host-side), and record provider, mode, shape, TFLOP/s or GB/s and peak memory in ``extra_info``."""

    def run(spec, shape, mode, provider):
        cases = {(c.mode, c.provider): c for c in op_timing_cases(spec, shape, DEVICE, DTYPE, compile_provider=COMPILE)}
        case = cases[(mode, provider)]
        benchmark.group = f"{case.op} {mode} {list(shape)}"
        benchmark.extra_info.update(op=case.op, mode=mode, provider=provider, shape=list(shape), dtype=str(DTYPE),
                                    device=torch.cuda.get_device_name(0) if HAS_CUDA else "cpu (interpreted)",
                                    interpreted=not HAS_CUDA, flops=case.flops, bytes=case.bytes)

        def target():
            case.fn()
            sync()

        benchmark.pedantic(target, rounds=20 if HAS_CUDA else 3, warmup_rounds=3 if HAS_CUDA else 1)
        median_s = benchmark.stats.stats.median
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / median_s / 1e12
        if case.bytes:
            benchmark.extra_info["gbps"] = case.bytes / median_s / 1e9
        if HAS_CUDA:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            target()
            benchmark.extra_info["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from t2i_distill import env

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    output_json["t2i_distill"] = {"env": env.collect(), "git_sha": sha}
