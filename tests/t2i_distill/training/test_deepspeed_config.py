"""The DeepSpeed JSON may only agree with the trainer (B5: its gradient_clipping must never silently win)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i_distill.training import resolve_deepspeed_config

CONFIG_DIR = Path(__file__).resolve().parents[3] / "parallel_config"
TRAINER = dict(micro_batch_size=8, gradient_accumulation_steps=1, max_grad_norm=1.0, mixed_precision="bf16",
               world_size=8)


def test_shipped_json_resolves_unchanged_but_for_the_clip_and_the_untested_optimizer_flag():
    path = CONFIG_DIR / "deepspeed_bf16_batch8.json"
    resolved = resolve_deepspeed_config(path, **TRAINER)
    raw = json.loads(path.read_text())
    assert resolved == {**raw, "gradient_clipping": 1.0, "train_batch_size": 64, "zero_allow_untested_optimizer": True}


def test_the_reference_scripts_max_grad_norm_takes_effect():
    # train_*.sh pass --max_grad_norm=0.1 with "auto" JSONs, which accelerate filled with 1.0 (B5): here 0.1 is used
    resolved = resolve_deepspeed_config(CONFIG_DIR / "deepspeed_bf16_batch8.json", **{**TRAINER, "max_grad_norm": 0.1})
    assert resolved["gradient_clipping"] == 0.1


def test_an_explicit_json_clip_that_contradicts_the_flag_is_an_error():
    source = {**json.loads((CONFIG_DIR / "deepspeed_bf16_batch8.json").read_text()), "gradient_clipping": 1.0}
    with pytest.raises(ValueError) as caught:
        resolve_deepspeed_config(source, **{**TRAINER, "max_grad_norm": 0.1})
    message = str(caught.value)
    assert "'gradient_clipping' is 1.0" in message and "max_grad_norm is 0.1" in message


@pytest.mark.parametrize("override, words", [
    ({"micro_batch_size": 4}, ["'train_micro_batch_size_per_gpu' is 8", "micro_batch_size is 4"]),
    ({"gradient_accumulation_steps": 2}, ["'gradient_accumulation_steps' is 1", "gradient_accumulation_steps is 2"]),
    ({"mixed_precision": "no"}, ["'bf16.enabled' is True", "'no'"]),
])
def test_json_values_that_disagree_with_the_trainer_name_both_values(override, words):
    with pytest.raises(ValueError) as caught:
        resolve_deepspeed_config(CONFIG_DIR / "deepspeed_bf16_batch8.json", **{**TRAINER, **override})
    for word in words:
        assert word in str(caught.value)


def test_missing_and_auto_values_come_from_the_trainer():
    source = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}
    resolved = resolve_deepspeed_config(source, micro_batch_size=2, gradient_accumulation_steps=3,
                                        max_grad_norm=None, mixed_precision="no", world_size=2)
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["gradient_accumulation_steps"] == 3
    assert resolved["train_batch_size"] == 12
    assert resolved["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    assert resolved["bf16"] == {"enabled": False}
    assert source["gradient_clipping"] == "auto"  # the caller's dict is not modified


@pytest.mark.parametrize("source, words", [
    ({"optimizer": {"type": "Adam"}}, ["'optimizer' section", "optimizer_factory"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler' section", "lr_scheduler_factory"]),
    ({"zero_optimization": {"stage": 3}}, ["stage' is 3", "(0, 1, 2)"]),
    ({"fp16": {"enabled": True}}, ["fp16.enabled", "bf16"]),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, ["zero_optimization.reduce_bucket_size"]),
    ({"train_batch_size": 5}, ["'train_batch_size' is 5", "(2 × 1 × 1)"]),
])
def test_json_sections_the_engine_cannot_honour_are_rejected(source, words):
    with pytest.raises(ValueError) as caught:
        resolve_deepspeed_config(source, micro_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0,
                                 mixed_precision="bf16", world_size=1)
    for word in words:
        assert word in str(caught.value)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_deepspeed_config(tmp_path / "missing.json", **TRAINER)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_deepspeed_config(broken, **TRAINER)
    with pytest.raises(TypeError, match="deepspeed_config"):
        resolve_deepspeed_config(42, **TRAINER)
