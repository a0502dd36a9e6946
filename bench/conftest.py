"""Benchmark harness: interpreter without a GPU (tiny shapes only), synchronised timing, machine info in the JSON.

Each ``bench/test_bench_<op>.py`` only names shapes and (mode, provider) pairs; what is timed, and the FLOP/byte
count of one call, come from :mod:`t2i_distill.kernel_checks`, shared with the demo report and ``gpu_check``.
"""

from __future__ import annotations

import os
import subprocess

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

#: The (mode, provider) pairs each op's timing cases provide (checked against the cases when a benchmark runs).
MODES_AND_PROVIDERS = {
    "gated_residual": [(m, p) for m in ("fwd", "fwd+jvp", "fwd+bwd") for p in ("reference", "ours")],
    "attention": [("fwd", "sdpa"), ("fwd", "ours"), ("fwd+bwd", "sdpa"), ("fwd+bwd", "ours"),
                  ("fwd+jvp", "reference"), ("fwd+jvp", "ours"), ("fwd+jvp", "ours (torch.func.jvp)")],
}


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def run_case(benchmark):
    """``run_case(cases_fn, shape, mode, provider)``: time that case with pytest-benchmark, synchronising after every
    call (its timer is host-side), and record provider, mode, shape and TFLOP/s or GB/s in ``extra_info``."""

    def run(cases_fn, shape, mode, provider):
        cases = {(c.mode, c.provider): c for c in cases_fn(shape, DEVICE, DTYPE)}
        case = cases[(mode, provider)]
        benchmark.group = f"{case.op} {mode} {list(shape)}"
        benchmark.extra_info.update(op=case.op, mode=mode, provider=provider, shape=list(shape), dtype=str(DTYPE),
                                    interpreted=not HAS_CUDA, flops=case.flops, bytes=case.bytes)

        def target():
            case.fn()
            _sync()

        benchmark.pedantic(target, rounds=20 if HAS_CUDA else 3, warmup_rounds=3 if HAS_CUDA else 1)
        median_s = benchmark.stats.stats.median
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / median_s / 1e12
        if case.bytes:
            benchmark.extra_info["gbps"] = case.bytes / median_s / 1e9

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from t2i_distill import env

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    output_json["t2i_distill"] = {"env": env.collect(), "git_sha": sha}
