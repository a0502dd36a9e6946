"""bench/gpu_check.py runs end to end (CPU smoke mode here; the real run needs a GPU) and writes its JSON."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full check is run by hand, not by pytest")
def test_cpu_smoke_writes_parity_and_timings(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["gpu"].startswith("none")
    from t2i_distill.benchmarks.ops import OPS

    checked = {(r["op"], r["quantity"]) for r in result["parity"]}
    for name, spec in OPS.items():  # every kernel: output, tangent through the three front ends, every gradient
        assert {(name, "out"), (name, "tangent (torch.func.jvp)"), (name, "tangent (forward_ad)")} <= checked
    assert {("attention", q) for q in ("dq", "dk", "dv", "tangent (attention_jvp)")} <= checked
    timed = {(r["op"], r["mode"], r["provider"]) for r in result["timings"]}
    assert {(name, mode, provider) for name in OPS for mode in ("fwd", "fwd+jvp", "fwd+bwd")
            for provider in ("reference", "ours")} <= timed
    assert all(r["error"] is None for r in result["timings"] + result["steps"]), result["timings"]
    assert {(r["mode"], r["provider"]) for r in result["steps"]} >= {("step", "reference"), ("step", "dual"),
                                                                      ("jvp", "patched")}
    assert result["headline"], "the short table printed last"
    assert "interpreted timings say nothing about GPU speed" in capsys.readouterr().out


def test_without_gpu_the_full_check_refuses_politely(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main([]) == 2
    assert "--cpu_smoke" in capsys.readouterr().err


def test_plot_writes_a_png_from_the_json(tmp_path):
    from bench import plot

    out = tmp_path / "check.json"
    if torch.cuda.is_available():
        pytest.skip("the CPU smoke run is GPU-free only")
    assert gpu_check.main(["--cpu-smoke", "--skip-steps", "--out", str(out)]) == 0
    png = tmp_path / "check.png"
    assert plot.main([str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_headline_derives_issue_12s_attention_figures_from_the_rows():
    shape = [1, 32, 8192, 64]

    def row(mode, provider, ms, **extra):
        return {"op": "attention", "shape": shape, "mode": mode, "provider": provider, "p50_ms": ms, **extra}

    timings = [row("fwd+jvp", "ours", 2.0, tflops=550.0), row("fwd+jvp", "ours (torch.func.jvp)", 2.5),
               row("fwd+jvp", "math sdpa (torch.func.jvp)", 80.0), row("fwd", "ours", 1.0),
               row("fwd+bwd", "ours", 4.0), row("fwd", "sdpa", 0.5), row("fwd+bwd", "sdpa", 2.9)]
    parity = [{"op": "attention", "shape": shape, "quantity": "tangent ‖err‖/‖fp32‖", "kernel_error": 1.6e-3,
               "bound": 1.7e-3}]
    table = {figure: (value, target) for figure, value, target in gpu_check._headline(timings, [], None, parity)}
    assert table[f"attention_jvp {shape}"] == ("550 TFLOP/s, 40x math SDPA under torch.func.jvp",
                                                "≥ 550 TFLOP/s, ≥ 30x")
    assert table[f"attention torch.func.jvp / fused {shape}"] == ("80% of the fused kernel's speed", "≥ 85%")
    assert table[f"attention backward vs SDPA's {shape}"] == ("0.80x SDPA's speed", "≥ 0.8x")  # 2.4 ms vs 3.0 ms
    assert table[f"attention tangent error {shape}"] == ("0.0016", "≤ 0.0017")


def test_autotune_choices_lists_the_config_each_tuned_kernel_picked(monkeypatch):
    import types

    import triton

    from t2i_kernels.gated_residual import _gated_residual_fwd_kernel as some_kernel

    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4)], key=["N"])(some_kernel)
    tuned.cache = {(128, "torch.float32"): tuned.configs[0]}
    idle = triton.autotune(configs=[triton.Config({"BLOCK": 32})], key=["N"])(some_kernel)  # never launched
    fake = types.ModuleType("t2i_kernels._fake_tuned")
    fake.tuned, fake.idle = tuned, idle
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    choices = gpu_check.autotune_choices()
    assert choices["t2i_kernels._fake_tuned.tuned"] == {"(128, 'torch.float32')": str(tuned.configs[0])}
    assert "t2i_kernels._fake_tuned.idle" not in choices


def test_gluon_child_rows_are_kept_and_a_hang_is_killed(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys, time\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "json.dump({'parity': [{'op': 'attention', 'passed': True}], 'timings': [], 'notes': ['n']}, open(out, 'w'))\n"
        "if '--hang' in sys.argv:\n"
        "    time.sleep(60)\n")
    parity, timings, notes = gpu_check.gluon_rows(False, 30, [sys.executable, str(script)])
    assert parity == [{"op": "attention", "passed": True}] and timings == [] and notes == ["n"]
    parity, _, notes = gpu_check.gluon_rows(False, 2, [sys.executable, str(script), "--hang"])
    assert parity and "killed after 2 s" in notes[0]  # what it wrote before hanging is kept


@pytest.mark.parametrize("smoke", [[], ["--smoke"]], ids=["full", "smoke"])
def test_gluon_check_without_a_gpu_says_so(tmp_path, smoke):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the child measures for real")
    from bench import gluon_check

    out = tmp_path / "g.json"
    assert gluon_check.main(["--out", str(out), *smoke]) == 0
    result = json.loads(out.read_text())
    assert result["parity"] == [] and "no CUDA device" in result["notes"][0]
