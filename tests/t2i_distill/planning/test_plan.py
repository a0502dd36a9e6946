"""``t2i-distill plan``: the fake-tensor step equals a real CPU step, byte for byte per category and phase; the
reference mode's attention scores are the analytic B·H·L²·4 bytes; the CLI prints, writes JSON, fits and refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from t2i_distill.planning.plan import PlanSetting, apply_backend, load_config, plan
from t2i_distill.planning.step import StepSetting, run_step

TINY = "t2i_distill/demo/teacher"
_, CONFIG = load_config(TINY)


def tiny_setting(**overrides) -> StepSetting:
    base = dict(method="scm", jvp="dual", resolution=128, train_batch_size=2, max_sequence_length=16,
                mixed_precision="no", cuda=False)
    return StepSetting(**{**base, **overrides})


def breakdown(result) -> dict:
    return {name: (record.peak_bytes, record.peak_breakdown, record.largest_allocation, record.flops)
            for name, record in result.ledger.phases.items()}


@pytest.mark.parametrize("method,jvp,checkpointing", [
    ("scm", "dual", False), ("scm", "func", False), ("scm", "reference", False), ("scm", "fd", False),
    ("scm", "dual", True), ("meanflow", "dual", False), ("meanflow", "reference", False),
])
def test_the_fake_step_equals_a_real_cpu_step_per_category_and_phase(method, jvp, checkpointing):
    setting = tiny_setting(method=method, jvp=jvp, gradient_checkpointing=checkpointing)
    fake, real = run_step(CONFIG, setting), run_step(CONFIG, setting, fake=False)
    # PyTorch ops only (reference, fd): equal up to a few 0-dim scalars (≤ 64 bytes). The Triton kernels make the
    # same allocations in the same order (sizes, FLOPs and largest buffers equal), but under the CPU interpreter some
    # live a little longer than on fake tensors (up to ~4 % of a phase's peak on this model; the cause is not pinned
    # down, see the issue note), so their peaks agree within 5 %.
    slack = (lambda peak: 64) if jvp in ("reference", "fd") else (lambda peak: 0.05 * peak)
    for name, (peak, cats, largest, flops) in breakdown(real).items():
        f_peak, f_cats, f_largest, f_flops = breakdown(fake)[name]
        assert (f_largest, f_flops) == (largest, flops), name
        assert abs(f_peak - peak) <= slack(peak), (name, f_peak, peak)
        for category in ("parameters", "teacher", "gradients", "optimizer"):
            assert f_cats.get(category) == cats.get(category), (name, category)
    assert fake.ledger.peak_phase == real.ledger.peak_phase
    assert abs(fake.ledger.peak_bytes - real.ledger.peak_bytes) <= slack(real.ledger.peak_bytes)


def test_reference_attention_scores_are_b_h_l2_fp32_bytes_and_dual_has_none():
    setting = tiny_setting(jvp="reference", resolution=256)
    heads, text, image = CONFIG["num_attention_heads"], 16, (256 // 16) ** 2
    scores = setting.train_batch_size * heads * (text + image) ** 2 * 4
    reference = run_step(CONFIG, setting).ledger.phases["jvp"]
    assert reference.largest_allocation == scores
    dual = run_step(CONFIG, tiny_setting(resolution=256)).ledger.phases["dual"]
    assert dual.largest_allocation < scores


def test_ddp_and_deepspeed_rules_and_steady_state_optimizer_states():
    result = run_step(CONFIG, tiny_setting())
    t = result.trainable_params
    single = apply_backend(result, PlanSetting(step=tiny_setting()))
    ddp = apply_backend(result, PlanSetting(step=tiny_setting(), backend="ddp", num_processes=4))
    deepspeed = apply_backend(result, PlanSetting(step=tiny_setting(), backend="deepspeed", num_processes=4))
    assert ddp["optimizer"]["ddp_buckets"] == 4 * t
    assert single["teacher"]["optimizer"] == result.optimizer_state_bytes == 8 * t  # AdamW's states, every phase
    assert deepspeed["teacher"]["optimizer"] == 8 * t // 4
    assert deepspeed["teacher"]["parameters"] == 2 * result.student_params + 4 * t // 4


@pytest.mark.parametrize("jvp", ["dual", "reference"])
def test_fsdp2_is_measured_through_the_engines_fully_shard(jvp):
    """FSDP2 runs for real over 4 fake ranks: parameters and gradients are this rank's fp32 shards, and every block
    is a unit of its own, the kernel-patched blocks too (no root-only note)."""
    setting = PlanSetting(step=tiny_setting(jvp=jvp), backend="fsdp2", num_processes=4)
    result = plan(CONFIG, setting, "tiny")
    p = result["parameters"]["student"]
    optimizer = result["phases"]["optimizer"]["breakdown"]
    assert abs(optimizer["parameters"] - 4 * p // 4) < 0.01 * p
    assert abs(optimizer["gradients"] - 4 * p // 4) < 0.01 * p
    assert optimizer["optimizer"] == 12 * p // 4
    assert result["notes"] == []


def test_fsdp2_sharding_the_root_only_is_measured_and_noted():
    """Were the blocks not matched (the engine matches class names, a subclass by its base's), the root would hold
    the whole student and every pass would all-gather all of it: the plan measures that and says so."""
    from unittest import mock

    from t2i_distill.training import engine

    setting = PlanSetting(step=tiny_setting(jvp="dual"), backend="fsdp2", num_processes=4)
    per_block = plan(CONFIG, setting, "tiny")
    with mock.patch.object(engine, "_is_block", lambda module, names: type(module).__name__ in names):
        root_only = plan(CONFIG, setting, "tiny")
    assert any("root only" in note for note in root_only["notes"])
    assert per_block["phases"]["dual"]["peak_bytes"] < 0.8 * root_only["phases"]["dual"]["peak_bytes"]


def test_lite_8b_plans_on_the_cpu():
    _, config = load_config("flux1-lite-8b")
    result = plan(config, PlanSetting(step=StepSetting(jvp="dual", resolution=512, max_sequence_length=256)))
    assert round(result["parameters"]["student"] / 1e9, 2) == 8.16
    teacher = result["peak_breakdown"]["teacher"]  # bf16, each tensor in 512-byte CUDA blocks
    assert 2 * result["parameters"]["teacher"] <= teacher < 1.001 * 2 * result["parameters"]["teacher"]


def test_plan_of_the_tiny_model_and_its_estimate_is_labelled():
    result = plan(CONFIG, PlanSetting(step=tiny_setting(cuda=True, mixed_precision="bf16")), "tiny")
    assert result["peak_bytes"] == sum(result["peak_breakdown"].values())
    assert result["flops_per_step"] > 0
    assert "not a measurement" in result["estimate"]["note"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "t2i_distill.cli", "plan", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    done = run_cli("--model", TINY, "--resolution", "128", "--max_sequence_length", "16", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "peak per GPU" in done.stdout and "ESTIMATE" in done.stdout
    result = json.loads(out.read_text())
    assert result["peak_phase"] in result["phases"]


def test_cli_fit_finds_a_setting_and_says_when_nothing_fits(tmp_path):
    out = tmp_path / "fit.json"
    done = run_cli("--model", TINY, "--resolution", "128", "--max_sequence_length", "16", "--fit", "0.1",
                   "--fit_modes", "dual", "reference", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["fits"] and result["peak_bytes"] <= result["fit"]["limit_bytes"]
    assert result["setting"]["jvp"] == "dual"  # fewer FLOPs than reference
    nothing = run_cli("--model", TINY, "--resolution", "128", "--fit", "0.0001", "--fit_modes", "dual")
    assert nothing.returncode == 1 and "nothing fits" in nothing.stdout


def test_cli_refuses_bad_settings_in_one_message():
    done = run_cli("--model", "no/such/folder", "--backend", "single", "--num_processes", "2", "--fit_margin", "2")
    assert done.returncode == 2
    for expected in ("--num_processes 2", "--fit_margin", "no/such/folder"):
        assert expected in done.stderr
