"""Checkpoints: complete or absent (a failing write mid-save), latest/resolve, pruning, writability, export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from t2i_distill.models import load_state_dict_file
from t2i_distill.training import (
    CheckpointManager,
    EngineConfig,
    OutputDirError,
    build_engine,
    check_writable,
    export_student,
)
from t2i_distill.training import checkpoint as checkpoint_module


def _engine(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return build_engine(EngineConfig(cpu=True, **overrides), model=model,
                        optimizer_factory=lambda p: torch.optim.AdamW(p, lr=1e-2),
                        lr_scheduler_factory=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))


def _train(engine, updates: int = 1) -> None:
    for _ in range(updates * engine.config.gradient_accumulation_steps):
        engine.backward(engine.module(torch.randn(3, 4)).pow(2).mean())
        engine.step()


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.unwrapped.parameters()]


def test_save_writes_a_complete_folder_and_load_restores_everything(tmp_path):
    engine = _engine()
    _train(engine, 2)
    manager = CheckpointManager(tmp_path)
    path = manager.save(2, engine, extra={"sampler": {"epoch": 1, "index": 6}})
    assert path == tmp_path / "checkpoint-2" and manager.latest() == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["backend"] == "single" and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"engine.json", "extra.pt", "extra_rank0.pt", "model.safetensors",
                                      "optimizer.pt", "rng_state_0.pt", "scheduler.pt"}
    saved_weights, saved_rng = _weights(engine), torch.get_rng_state()
    saved_lr = engine.optimizer.param_groups[0]["lr"]

    other = _engine(seed=5)
    torch.manual_seed(99)
    extra = manager.load(path, other)
    assert extra == {"sampler": {"epoch": 1, "index": 6}}
    assert all(torch.equal(a, b) for a, b in zip(_weights(other), saved_weights))
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert other.completed_steps == 2 and other.optimizer.param_groups[0]["lr"] == saved_lr == 1e-2 * 0.25
    assert other.optimizer.state_dict()["state"][0]["step"] == engine.optimizer.state_dict()["state"][0]["step"]


def test_a_write_failing_mid_save_leaves_the_previous_checkpoint_and_no_half_folder(tmp_path, monkeypatch):
    engine = _engine()
    _train(engine)
    manager = CheckpointManager(tmp_path)
    good = manager.save(1, engine)
    good_weights = _weights(engine)
    _train(engine)

    real_save = checkpoint_module._torch_save

    def failing_save(obj, path):
        if path.name == "optimizer.pt":  # the model file is already written: a genuinely half-written checkpoint
            path.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint_module, "_torch_save", failing_save)
    with pytest.raises(RuntimeError, match="checkpoint-2.*was not saved.*No space left"):
        manager.save(2, engine)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert manager.latest() == good
    fresh = _engine(seed=3)
    manager.load("latest", fresh)
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), good_weights))


def test_a_crash_leftover_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    engine = _engine()
    manager = CheckpointManager(tmp_path)
    leftover = tmp_path / ".tmp-checkpoint-7"  # what a killed process leaves: files, no manifest
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"torn")
    fake = tmp_path / "checkpoint-9"  # a folder with the final name but no manifest is not a checkpoint either
    fake.mkdir()
    assert manager.latest() is None
    with pytest.raises(ValueError, match="no manifest.json"):
        manager.resolve(fake)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.resolve("latest")
    _train(engine)
    manager.save(1, engine)
    assert not leftover.exists() and manager.latest() == tmp_path / "checkpoint-1"


def test_total_limit_prunes_the_oldest_after_the_new_one_is_complete(tmp_path):
    engine = _engine()
    manager = CheckpointManager(tmp_path, total_limit=2)
    for step in (1, 2, 3, 4):
        _train(engine)
        manager.save(step, engine)
    assert [step for step, _ in manager.checkpoints()] == [3, 4]
    _train(engine)
    manager.save(4, engine)  # re-saving a step replaces it in place
    assert [step for step, _ in manager.checkpoints()] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_load_refuses_a_checkpoint_of_another_setup(tmp_path):
    engine = _engine()
    _train(engine)
    path = CheckpointManager(tmp_path).save(1, engine)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1.*has gradient_accumulation_steps=2"):
        CheckpointManager(tmp_path).load(path, _engine(gradient_accumulation_steps=2))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "world_size": 8}))
    with pytest.raises(ValueError, match="world_size=8.*world_size=1"):
        CheckpointManager(tmp_path).load(path, _engine())


def test_save_refuses_mid_accumulation_and_bad_arguments(tmp_path):
    engine = _engine(gradient_accumulation_steps=2)
    engine.backward(engine.module(torch.randn(3, 4)).sum())
    engine.step()
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="micro_step is 1 of 2"):
        manager.save(0, engine)
    engine.backward(engine.module(torch.randn(3, 4)).sum())
    engine.step()
    with pytest.raises(ValueError, match="step: expected an int >= 0, got -1"):
        manager.save(-1, engine)
    with pytest.raises(ValueError, match="keys \\['ema'\\]"):
        manager.save(1, engine, extra={"ema": 1}, per_rank_extra={"ema": 2})
    with pytest.raises(ValueError, match="total_limit"):
        CheckpointManager(tmp_path, total_limit=0)


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="a_file/out.*not writable"):
        check_writable(blocker / "out")
    with pytest.raises(OutputDirError, match="GiB free, but at least"):
        check_writable(tmp_path, min_free_bytes=2**62)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputDirError, match="not writable"):
            check_writable(locked)


def test_export_round_trips_through_the_pipelines_loader(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "b.bias": torch.arange(4, dtype=torch.bfloat16), "view": torch.ones(4)[::2]}
    paths = export_student(state, tmp_path / "ckpts", step=1000, formats=("safetensors", "pt"))
    assert [p.name for p in paths] == ["transformer_1000.safetensors", "transformer_1000.pt"]
    for path in paths:
        loaded = load_state_dict_file(path)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)
    assert torch.load(paths[1], weights_only=True).keys() == {"module"}  # the reference's layout
    recorded = export_student(state, tmp_path / "meta", step=2, formats=("safetensors", "pt"),
                              metadata={"t2i_distill.kind": "trigflow", "t2i_distill.time_scale": "1000.0"})
    from t2i_distill.models import read_checkpoint

    assert [(read_checkpoint(p).recorded_kind, read_checkpoint(p).time_scale) for p in recorded] == [
        ("trigflow", 1000.0), ("trigflow", 1000.0)]
    (named,) = export_student(state, tmp_path / "ema_student.safetensors", step=3)
    assert named == tmp_path / "ema_student.safetensors" and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("args, error, match", [
    (({}, 1), ValueError, "non-empty dict"),
    (({"a": 1.0}, 1), TypeError, "not tensors: \\['a'\\]"),
    (({"a": torch.ones(1)}, -2), ValueError, "step"),
])
def test_export_rejects_bad_input(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        export_student(args[0], tmp_path, args[1])


def test_export_rejects_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="formats: expected distinct entries"):
        export_student({"a": torch.ones(1)}, tmp_path, 1, formats=("ckpt",))
