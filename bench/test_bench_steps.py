"""Student steps (sCM, MeanFlow): per-pass time of the reference, the patched model and the dual forward; and the
whole training step (teacher + JVP + student + backward + optimizer) per JVP mode, with its phase split.

A FLUX.1-lite-8B-width model on GPUs (default one double + one single block at 512 px; set T2I_BENCH_DOUBLE,
T2I_BENCH_SINGLE, T2I_BENCH_RESOLUTION, T2I_BENCH_BATCH for other depths, e.g. 8 + 38 for the whole student), the
tiny FLUX under the interpreter. Passes and providers: ``t2i_distill.benchmarks.steps``.
"""

from __future__ import annotations

import os

import pytest

from bench.conftest import DEVICE, DTYPE, HAS_CUDA, sync
from t2i_distill.benchmarks.steps import STEP_PAIRS, StepConfig, step_timing_cases, training_step_cases


def _config(method: str) -> StepConfig:
    if not HAS_CUDA:
        return StepConfig(method=method, resolution=64, text_tokens=5)
    env = os.environ.get
    return StepConfig(method=method, width="lite8b", double=int(env("T2I_BENCH_DOUBLE", "1")),
                      single=int(env("T2I_BENCH_SINGLE", "1")), resolution=int(env("T2I_BENCH_RESOLUTION", "512")),
                      batch=int(env("T2I_BENCH_BATCH", "1")))


@pytest.mark.parametrize("mode, provider", STEP_PAIRS)
@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_student_step(benchmark, method, mode, provider):
    cfg = _config(method)
    case = {(c.mode, c.provider): c for c in step_timing_cases(cfg, DEVICE, DTYPE, providers=(provider,))}[
        (mode, provider)]
    benchmark.group = f"{cfg.label} {mode}"
    benchmark.extra_info.update(op=cfg.label, mode=mode, provider=provider, interpreted=not HAS_CUDA,
                                config=cfg.__dict__)

    def target():
        case.fn()
        sync()

    benchmark.pedantic(target, rounds=10 if HAS_CUDA else 2, warmup_rounds=2 if HAS_CUDA else 1)


@pytest.mark.parametrize("jvp_mode", ["reference", "func", "dual"])
@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_training_step(benchmark, method, jvp_mode):
    """The whole training step (teacher + JVP + student + backward + AdamW) with the real loss in ``jvp_mode``; the
    per-phase split of the same step (ms, and peak GiB on CUDA) goes into ``extra_info["phases"]``."""
    from t2i_distill.benchmarks.steps import training_step_rows

    cfg = _config(method)
    (case,) = training_step_cases(cfg, DEVICE, DTYPE, modes=(jvp_mode,))
    benchmark.group = f"{cfg.label} train-step"
    phases = {r["mode"]: {"p50_ms": r.get("p50_ms"), "peak_extra_gib": r.get("peak_extra_gib"), "error": r["error"]}
              for r in training_step_rows(cfg, DEVICE, DTYPE, modes=(jvp_mode,), repeats=3 if HAS_CUDA else 1)}
    benchmark.extra_info.update(op=cfg.label, mode="train-step", provider=jvp_mode, interpreted=not HAS_CUDA,
                                config=cfg.__dict__, phases=phases)

    def target():
        case.fn()
        sync()

    benchmark.pedantic(target, rounds=5 if HAS_CUDA else 1, warmup_rounds=1)
