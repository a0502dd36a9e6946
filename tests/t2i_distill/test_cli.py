"""The `t2i-distill` command line: `env` and the `demo` report."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert "kernels      compiled" in out
    else:
        assert "gpu          none" in out
        assert "kernels      interpreted" in out


def test_demo_writes_a_passing_report(tmp_path, capsys):
    out_path = tmp_path / "report.json"
    assert cli.main(["demo", "--out", str(out_path), "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_path.read_text())
    assert report["passed"] is True
    checked = {(p["op"], p["quantity"]) for p in report["parity"]}
    for op, quantities in {
        "gated_residual": ("out", "dx", "dgate", "dy", "tangent (torch.func.jvp)", "tangent (forward_ad)"),
        "attention": ("out (attention_jvp)", "tangent (attention_jvp)", "tangent (torch.func.jvp)",
                      "tangent (forward_ad)", "dq", "dk", "dv"),
    }.items():
        assert {(op, q) for q in quantities} <= checked
    assert report["reference_model"]["jvp_over_forward"] > 1.0  # the reference JVP is slower than its forward
    timed = {(r["op"], r["mode"], r["provider"]) for r in report["timings"]}
    assert {("attention", "fwd+jvp", "reference"), ("attention", "fwd+jvp", "ours"),
            ("gated_residual", "fwd+bwd", "ours")} <= timed
    if not HAS_CUDA:
        assert "not GPU speed" in printed and "not GPU speed" in report["timings_note"]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is only switched on without a GPU")
def test_demo_turns_on_the_interpreter_itself():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "t2i_distill.cli", "demo", "--out", "-", "--repeats", "1"],
                          capture_output=True, text=True, env=environment, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "running the Triton kernels in the CPU interpreter" in done.stdout
    assert "parity: all PASS" in done.stdout
