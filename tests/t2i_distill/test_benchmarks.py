"""The benchmark definitions: case lists match their declared pairs, parity can fail, the student-step providers
compute the same tangent, failing cases become rows, and pytest-benchmark JSON names every provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i_distill.benchmarks.common import TimingCase
from t2i_distill.benchmarks.ops import OPS, op_case_pairs, op_parity, op_timing_cases
from t2i_distill.benchmarks.runner import timing_rows
from t2i_distill.benchmarks.steps import STEP_PAIRS, StepConfig, step_timing_cases, training_step

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(OPS))
def test_declared_pairs_are_the_cases_built(name):
    spec = OPS[name]
    built = [(c.mode, c.provider) for c in op_timing_cases(spec, spec.cpu_shapes[0], CPU, torch.float32,
                                                           compile_provider=False)]
    assert built == op_case_pairs(spec, compile_provider=False)


def test_parity_reports_a_wrong_kernel():
    spec = OPS["gelu_tanh"]
    broken = type(spec)(**{**spec.__dict__, "ours": lambda x: spec.ours(x) * (1 + 1e-3)})
    failed = {r.label or r.quantity for r in op_parity(broken, spec.cpu_shapes[0], CPU, torch.float32)
              if not r.passed}
    assert "out" in failed and "dx" in failed


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_student_step_providers_compute_the_same_tangent(method):
    cfg = StepConfig(method=method, resolution=64, text_tokens=5)
    cases = {(c.mode, c.provider): c for c in step_timing_cases(cfg, CPU, torch.float32)}
    assert set(cases) == set(STEP_PAIRS)
    _, reference = cases[("jvp", "reference")].fn()
    _, patched = cases[("jvp", "patched")].fn()
    _, dual = cases[("jvp", "dual")].fn()
    scale = reference.abs().max()
    for tangent in (patched, dual):
        torch.testing.assert_close(tangent, reference, atol=1e-4 * scale, rtol=1e-4)
    for mode in ("step", "fwd+bwd"):  # the training passes run (their gradients are tested elsewhere)
        cases[(mode, "reference")].fn()
        cases[(mode, "patched")].fn()
    cases[("step", "dual")].fn()


def test_a_failing_case_becomes_a_row_with_its_error():
    def boom():
        raise RuntimeError("no such backend here")

    rows = timing_rows([TimingCase("x", "fwd", "broken", (1,), boom),
                        TimingCase("x", "fwd", "fine", (1,), lambda: None, bytes=1000)], CPU, repeats=2)
    assert rows[0]["error"].startswith("RuntimeError: no such backend") and "p50_ms" not in rows[0]
    assert rows[1]["error"] is None and rows[1]["gbps"] > 0


def test_pytest_benchmark_json_names_every_benchmark_with_its_provider(tmp_path):
    out = tmp_path / "bench.json"
    # Under pytest-xdist the worker's PYTEST_XDIST_* variables would make the inner run's pytest-benchmark think it
    # is a worker too, and it then disables timing: the inner run is a plain pytest.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
                           "-k", "gated_residual or attention", "--benchmark-json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    named = {(b["extra_info"]["op"], b["extra_info"]["mode"], b["extra_info"]["provider"])
             for b in result["benchmarks"]}
    expected = {(op, m, p) for op in ("gated_residual", "attention")
                for m, p in op_case_pairs(OPS[op], compile_provider=False)}
    assert expected <= named
    assert result["t2i_distill"]["git_sha"] and result["t2i_distill"]["env"]["kernel_mode"] == "interpreted"


def test_training_step_modes_compute_the_same_loss_and_all_train():
    """One real step per JVP mode from the same initial weights: equal losses, and the optimizer moved the student."""
    for method in ("scm", "meanflow"):
        cfg = StepConfig(method=method, resolution=32, text_tokens=3)
        losses = {mode: training_step(cfg, CPU, torch.float32, mode)() for mode in ("reference", "func", "dual")}
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
        for mode in ("func", "dual"):
            assert abs(losses[mode] - losses["reference"]) <= 1e-4 * max(1.0, abs(losses["reference"])), losses
        step = training_step(cfg, CPU, torch.float32, "reference")
        first, second = step(), step()
        assert first != second  # AdamW changed the weights between the two identical steps


def test_training_step_rows_report_every_phase_of_the_step():
    from t2i_distill.benchmarks.steps import PEAK_MEMORY_NOTE, training_phases, training_step_rows

    cfg = StepConfig(method="meanflow", resolution=32, text_tokens=3)
    rows = training_step_rows(cfg, CPU, torch.float32, modes=("reference",), repeats=2)
    phases = [r["mode"] for r in rows]
    assert phases == [*training_phases("meanflow", "reference"), "total"]
    assert all(r["error"] is None and r["p50_ms"] > 0 for r in rows)
    assert all(r["peak_extra_gib"] is None for r in rows) and "not measured on the CPU" in PEAK_MEMORY_NOTE
    total = rows[-1]["p50_ms"]
    assert sum(r["p50_ms"] for r in rows[:-1]) == pytest.approx(total, rel=0.5)  # medians of parts vs of sums
    with pytest.raises(ValueError, match="jvp_mode"):
        training_step(cfg, CPU, torch.float32, "forward")


def test_cli_steps_training_step_option(tmp_path, capsys):
    from t2i_distill import cli

    out = tmp_path / "steps.json"
    assert cli.main(["steps", "--training_step", "reference", "--method", "scm", "--resolution", "32",
                     "--text_tokens", "3", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "backward" in printed and "optimizer" in printed and "peak memory" in printed
    rows = json.loads(out.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"reference"} and rows[-1]["mode"] == "total"
