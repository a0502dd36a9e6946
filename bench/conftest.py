"""Benchmark harness: interpreter without a GPU (tiny shapes only), synchronised timing, machine info in the JSON."""

from __future__ import annotations

import os
import subprocess

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def timed(benchmark):
    """``timed(fn, **extra_info)``: pytest-benchmark with a CUDA sync after every call (its timer is host-side)."""

    def run(fn, **extra_info):
        benchmark.extra_info.update(extra_info)
        benchmark.extra_info["interpreted"] = not HAS_CUDA

        def target():
            fn()
            _sync()

        return benchmark.pedantic(target, rounds=20 if HAS_CUDA else 3, warmup_rounds=3 if HAS_CUDA else 1)

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from t2i_distill import env

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    output_json["t2i_distill"] = {"env": env.collect(), "git_sha": sha}
