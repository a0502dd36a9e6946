"""The `t2i-distill` command line: `env` and the `parity` report."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i_distill import cli
from tests.conftest import HAS_CUDA

REPO = Path(__file__).resolve().parents[2]


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("t2i-distill") == "t2i_distill.cli:main"


def test_env_prints_versions_gpu_and_kernel_mode(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    import torch
    import triton

    assert f"torch        {torch.__version__}" in out
    assert f"triton       {triton.__version__}" in out
    if HAS_CUDA:
        assert "t2i_kernels  compiled" in out
    else:
        assert "gpu          none" in out
        assert "t2i_kernels  interpreted" in out


def test_parity_turns_on_the_interpreter_and_writes_a_passing_report(tmp_path):
    # One run for both claims (the report takes minutes under the interpreter): launched without TRITON_INTERPRET,
    # the command must switch the interpreter on itself before anything imports Triton, and its report must pass.
    out_path = tmp_path / "report.json"
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "t2i_distill.cli", "parity", "--out", str(out_path), "--repeats", "1"],
                          capture_output=True, text=True, env=environment, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = done.stdout
    assert "running the Triton kernels in the CPU interpreter" in printed
    assert "parity: all PASS" in printed
    report = json.loads(out_path.read_text())
    assert report["passed"] is True
    from t2i_distill.benchmarks.ops import OPS

    checked = {(p["op"], p["quantity"]) for p in report["parity"]}
    for op, spec in OPS.items():  # every kernel, every front end, every gradient
        grads = {("d" + spec.arg_names[i]) for i in spec.make(spec.cpu_shapes[0], torch.device("cpu"),
                                                              torch.float32, torch.Generator()).grad_idx}
        quantities = {"out", f"tangent ({op}_jvp)", "tangent (torch.func.jvp)", "tangent (forward_ad)"} | grads
        assert {(op, q) for q in quantities} <= checked, sorted(quantities - {q for o, q in checked if o == op})
    timed = {(r["op"], r["mode"], r["provider"]) for r in report["kernel_timings"]}
    assert {(op, m, p) for op in OPS for m in ("fwd", "fwd+jvp", "fwd+bwd") for p in ("reference", "ours")} <= timed
    steps = {(r["op"].split()[0], r["mode"], r["provider"]) for r in report["steps"]}
    assert {(method, "step", provider) for method in ("scm", "meanflow")
            for provider in ("reference", "patched", "dual")} <= steps
    # The reference JVP's cost is reported (a measured ratio: its value is the benchmark's, not a test's, business).
    ratios = report["reference_jvp_over_forward"]
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios.values())
    if not HAS_CUDA:
        assert "not GPU speed" in printed and "not GPU speed" in report["timings_note"]


@pytest.mark.skipif(HAS_CUDA, reason="the no-GPU report")
def test_env_without_a_gpu_reports_what_the_commands_do_not_unavailable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "t2i_distill.cli", "env"], capture_output=True, text=True, env=env,
                         timeout=300).stdout
    assert "t2i_kernels  interpreted: no GPU" in out and "unavailable" not in out
