"""bench/gpu_check.py runs end to end (CPU smoke mode here; the real run needs a GPU) and writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full check is run by hand, not by pytest")
def test_cpu_smoke_writes_parity_and_timings(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["gpu"].startswith("none")
    assert {r["quantity"] for r in result["parity"]} >= {"tangent (attention_jvp)", "tangent (torch.func.jvp)",
                                                          "dq", "dk", "dv"}
    providers = {(r["mode"], r["provider"]) for r in result["timings"]}
    assert ("fwd+jvp", "reference") in providers and ("fwd+jvp", "ours") in providers
    assert all(r["error"] is None for r in result["timings"]), result["timings"]
    assert "interpreted timings say nothing about GPU speed" in capsys.readouterr().out


def test_without_gpu_the_full_check_refuses_politely(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main([]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err
