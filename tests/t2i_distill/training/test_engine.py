"""The engine trains for real under every backend: exact resume, clipping, accumulation and a tiny FLUX in bf16.

``single`` runs the scenarios in-process; ``ddp``, ``fsdp2`` and ``deepspeed`` run them as 2 gloo processes through
``torchrun`` (``engine_scenarios.py``). Measured on the 2-core CPU machine (no GPU, shared with other jobs):
single ≈ 40 s, ddp ≈ 60–70 s, fsdp2 ≈ 75–100 s, deepspeed ≈ 85–95 s wall (most of it importing torch, diffusers
and DeepSpeed in two processes on two busy cores); the distributed ones are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from t2i_distill.training import EngineConfig, build_engine
from t2i_distill.training.engine import BACKENDS

from . import engine_scenarios

SCENARIOS = Path(engine_scenarios.__file__)
REPO = Path(__file__).resolve().parents[3]
DISTRIBUTED_TIMEOUT_S = 400


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_distributed(backend: str, tmp_path: Path) -> dict:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(SCENARIOS), backend, str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DISTRIBUTED_TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun {backend} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


def _check_results(results: dict, world_size: int) -> None:
    assert results["world_size"] == world_size
    resume = results["resume"]
    assert resume["checkpoint_name"] == "checkpoint-2"
    assert resume["completed_steps"] == 4
    assert resume["extra_round_trip"] and resume["ema_equal"]
    # N straight == N/2 + save + fresh model/RNG + load + N/2, bit for bit, with the same batches
    assert resume["weights_equal"] and resume["optimizer_equal"] and resume["lr_equal"] and resume["batches_equal"]
    assert resume["ranks_agree"] and resume["weights_changed"]

    failed = results["failed_save"]
    assert failed["raised_everywhere"] and failed["folders"] == ["checkpoint-1"] and failed["previous_loads"]

    clip = results["clip"]
    for row in clip["clipped"]:
        assert row["grad_norm"] > 0.05 and row["clipped"]
        # SGD(lr=1): the update is the clipped gradient, so its norm is the threshold (within fp32 rounding)
        assert row["update_norm"] <= 0.05 * (1 + 1e-5)
        assert row["update_norm"] == pytest.approx(0.05, rel=1e-4)
    for row in clip["unclipped"]:
        assert not row["clipped"]
        # and the reported pre-clip norm is the true gradient norm
        assert row["update_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)

    accumulation = results["accumulation"]
    assert accumulation["syncs"] == [False, True]
    assert accumulation["changed"] and accumulation["max_abs_diff"] <= 1e-6

    flux = results["flux"]
    assert len(flux["losses"]) == 4 and all(torch.isfinite(torch.tensor(flux["losses"])))
    assert all(torch.isfinite(torch.tensor(flux["grad_norms"])))
    assert flux["ranks_agree"] and flux["export_ok"]


def test_single_backend_trains_resumes_clips_and_accumulates(tmp_path):
    results = engine_scenarios.run_all("single", tmp_path)
    _check_results(results, world_size=1)
    assert results["flux"]["param_dtype"] == "torch.float32"  # autocast: fp32 masters


def test_the_resume_check_catches_a_missed_rng_restore(tmp_path, monkeypatch):
    from t2i_distill.training import checkpoint

    monkeypatch.setattr(checkpoint, "_set_rng_state", lambda state: None)
    resume = engine_scenarios.scenario_resume("single", tmp_path)
    assert not resume["batches_equal"] and not resume["weights_equal"]
    assert resume["extra_round_trip"]  # everything else still loads


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "deepspeed"])
def test_two_process_backends_train_resume_clip_and_accumulate(backend, tmp_path):
    results = _run_distributed(backend, tmp_path)
    _check_results(results, world_size=2)
    # fp32 masters in the module except under DeepSpeed's bf16 section, whose module holds bf16 weights
    assert results["flux"]["param_dtype"] == ("torch.bfloat16" if backend == "deepspeed" else "torch.float32")


# -- configuration errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, words", [
    ({"backend": "horovod"}, ValueError, ["backend", "horovod", "single"]),
    ({"mixed_precision": "fp16"}, ValueError, ["mixed_precision", "fp16", "bf16"]),
    ({"gradient_accumulation_steps": 0}, ValueError, ["gradient_accumulation_steps", ">= 1", "0"]),
    ({"gradient_accumulation_steps": 1.5}, TypeError, ["gradient_accumulation_steps", "float"]),
    ({"max_grad_norm": -1.0}, ValueError, ["max_grad_norm", "-1.0"]),
    ({"max_grad_norm": "1"}, TypeError, ["max_grad_norm", "str"]),
    ({"seed": -3}, ValueError, ["seed", "-3"]),
    ({"backend": "deepspeed", "micro_batch_size": 2}, ValueError, ["deepspeed_config", "None"]),
    ({"backend": "deepspeed", "deepspeed_config": {}}, ValueError, ["micro_batch_size", "None"]),
    ({"backend": "ddp", "deepspeed_config": {}}, ValueError, ["deepspeed_config", "ddp"]),
])
def test_engine_config_rejects_bad_values(kwargs, error, words):
    with pytest.raises(error) as caught:
        EngineConfig(**kwargs)
    for word in words:
        assert word in str(caught.value)


def test_zero_max_grad_norm_means_no_clipping():
    assert EngineConfig(max_grad_norm=0).max_grad_norm is None
    assert EngineConfig(max_grad_norm=2).max_grad_norm == 2.0


def test_build_engine_rejects_bf16_weights_and_wrong_arguments():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32"):
        build_engine(EngineConfig(cpu=True), model=model, optimizer_factory=lambda p: torch.optim.SGD(p, lr=1))
    with pytest.raises(TypeError, match="optimizer_factory"):
        build_engine(EngineConfig(cpu=True), model=nn.Linear(2, 2), optimizer_factory=lambda p: "adam")
    with pytest.raises(TypeError, match="config"):
        build_engine({"backend": "single"}, model=nn.Linear(2, 2), optimizer_factory=torch.optim.SGD)


def test_single_backend_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is 2"):
        build_engine(EngineConfig(cpu=True), model=nn.Linear(2, 2),
                     optimizer_factory=lambda p: torch.optim.SGD(p, lr=1))


def test_step_returns_none_until_the_final_micro_step_and_leaves_weights_alone():
    model = nn.Linear(3, 1)
    engine = build_engine(EngineConfig(cpu=True, gradient_accumulation_steps=3), model=model,
                          optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    before = model.weight.detach().clone()
    reports = []
    for _ in range(3):
        engine.backward(model(torch.randn(4, 3)).pow(2).mean())
        reports.append(engine.step())
        if reports[-1] is None:
            assert torch.equal(model.weight, before)
    assert reports[:2] == [None, None] and reports[2].step == 1 and engine.completed_steps == 1
    assert not torch.equal(model.weight, before) and model.weight.grad is None


def test_non_finite_gradients_skip_the_update():
    model = nn.Linear(3, 1)
    engine = build_engine(EngineConfig(cpu=True), model=model, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    before = model.weight.detach().clone()
    engine.backward(model(torch.full((2, 3), float("inf"))).sum())
    report = engine.step()
    assert report.skipped and not report.clipped and engine.completed_steps == 0
    assert torch.equal(model.weight, before)


def test_backward_rejects_a_non_scalar_loss():
    model = nn.Linear(3, 2)
    engine = build_engine(EngineConfig(cpu=True), model=model, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match=r"scalar tensor, got Tensor\(4, 2\)"):
        engine.backward(model(torch.randn(4, 3)))


def test_ddp_in_a_lone_process_makes_its_own_one_member_group():
    model = nn.Linear(3, 1)
    engine = build_engine(EngineConfig(backend="ddp", cpu=True), model=model,
                          optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    try:
        assert (engine.rank, engine.world_size, engine.is_main) == (0, 1, True)
        assert isinstance(engine.module, torch.nn.parallel.DistributedDataParallel) and engine.unwrapped is model
        x = torch.randn(4, 3)
        expected = model.weight.detach() - 0.1 * torch.autograd.grad(model(x).pow(2).mean(), model.weight)[0]
        engine.backward(engine.module(x).pow(2).mean())
        engine.step()
        torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-7)
        assert float(engine.all_reduce_mean(torch.tensor(3.0))) == 3.0 and engine.broadcast_object({"a": 1}) == {"a": 1}
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()


def test_checkpoint_size_estimate_counts_fp32_weights_and_adam_states():
    model = nn.Linear(10, 10)  # 110 parameters
    model.bias.requires_grad_(False)
    engine = build_engine(EngineConfig(cpu=True), model=model, optimizer_factory=lambda p: torch.optim.AdamW(p))
    assert engine.checkpoint_bytes_estimate() == 4 * (110 + 2 * 100)


def test_bf16_on_single_is_autocast_over_fp32_masters_and_inputs_stay_fp32():
    model = nn.Linear(3, 2)
    engine = build_engine(EngineConfig(cpu=True, mixed_precision="bf16"), model=model,
                          optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    tree = {"x": torch.randn(2, 3, dtype=torch.float64), "ids": [torch.arange(3), "text"], "n": 4}
    cast = engine.cast_inputs(tree)
    assert cast["x"].dtype == torch.float32 and cast["ids"][0].dtype == torch.int64 and cast["ids"][1] == "text"
    with engine.autocast():
        out = engine.module(cast["x"])
    assert out.dtype == torch.bfloat16 and model.weight.dtype == torch.float32
    engine.backward(out.float().sum())
    assert model.weight.grad.dtype == torch.float32


def test_backends_constant_lists_what_the_tests_cover():
    assert BACKENDS == ("single", "ddp", "fsdp2", "deepspeed")
