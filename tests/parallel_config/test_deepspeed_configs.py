"""Every DeepSpeed JSON parses with DeepSpeed's own config classes (on the CPU) and says what we claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

deepspeed_config = pytest.importorskip("deepspeed.runtime.config", reason="install the `deepspeed` extra")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "parallel_config"
MICRO_BATCHES = (1, 4, 8, 16)


def _config_path(micro_batch: int) -> Path:
    return CONFIG_DIR / f"deepspeed_bf16_batch{micro_batch}.json"


def _has_auto(node: object) -> bool:
    if isinstance(node, dict):
        return any(_has_auto(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_auto(v) for v in node)
    return node == "auto"


class _DataParallelGroup:
    """The `mpu` interface DeepSpeedConfig asks for its data-parallel world size."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def test_exactly_the_reference_micro_batches_ship():
    assert sorted(p.name for p in CONFIG_DIR.glob("deepspeed_*.json")) == sorted(
        _config_path(mb).name for mb in MICRO_BATCHES
    )


@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
def test_only_the_clip_is_auto_as_in_the_reference(micro_batch):
    """``gradient_clipping: "auto"`` as the reference's JSONs: the trainer fills it from --max_grad_norm (which
    therefore takes effect, B5); everything else is explicit."""
    raw = json.loads(_config_path(micro_batch).read_text())
    assert raw["gradient_clipping"] == "auto"
    assert not _has_auto({k: v for k, v in raw.items() if k != "gradient_clipping"})


def _resolved(micro_batch: int, world_size: int, tmp_path: Path, max_grad_norm: float = 1.0) -> Path:
    """What DeepSpeed receives: the file completed by the trainer's resolver."""
    from t2i_distill.training import resolve_deepspeed_config

    config = resolve_deepspeed_config(_config_path(micro_batch), micro_batch_size=micro_batch,
                                      gradient_accumulation_steps=1, max_grad_norm=max_grad_norm,
                                      mixed_precision="bf16", world_size=world_size)
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("world_size", [1, 8])
@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
def test_parses_with_deepspeed(monkeypatch, tmp_path, micro_batch, world_size):
    # DeepSpeedConfig reads the rank from torch.distributed; without a process group it would fall back to a
    # world of 1 and ignore `mpu`. Rank 0 of a `world_size` data-parallel group is what a launcher would give it.
    monkeypatch.setattr(deepspeed_config.dist, "get_rank", lambda *a, **k: 0)
    cfg = deepspeed_config.DeepSpeedConfig(str(_resolved(micro_batch, world_size, tmp_path)),
                                           mpu=_DataParallelGroup(world_size))

    assert cfg.train_micro_batch_size_per_gpu == micro_batch
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.train_batch_size == micro_batch * world_size
    assert cfg.gradient_clipping == 1.0  # --max_grad_norm's default: the clip the reference effectively trained with
    assert cfg.bfloat16_config.enabled and not cfg.float16_config.enabled
    zero = cfg.zero_config
    assert zero.stage == 2
    assert zero.overlap_comm and zero.reduce_scatter and zero.contiguous_gradients and zero.allgather_partitions
    assert zero.allgather_bucket_size == 200_000_000
    assert zero.reduce_bucket_size == 500_000_000
    assert cfg.steps_per_print == 2000
    assert not cfg.wall_clock_breakdown
