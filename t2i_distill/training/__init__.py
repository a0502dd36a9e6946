"""Distributed training engine, checkpoints and export for the sCM / MeanFlow trainers.

* :func:`build_engine` / :class:`EngineConfig` / :class:`Engine`: one interface over ``single``, ``ddp``, ``fsdp2``
  and ``deepspeed`` (ZeRO 0–2) with bf16 mixed precision, gradient accumulation and clipping that takes effect
  under every backend (:mod:`t2i_distill.training.engine`).
* :class:`CheckpointManager`, :func:`check_writable`, :func:`export_student`: atomic ``checkpoint-<step>`` folders,
  exact resume, and the student alone as ``transformer_<step>.safetensors`` / ``.pt``
  (:mod:`t2i_distill.training.checkpoint`).
* :class:`EMA`: an fp32 moving average of the student (:mod:`t2i_distill.training.ema`).
* :func:`optimizer_factory`, :func:`lr_scheduler_factory` (:mod:`t2i_distill.training.optim`).
"""

from t2i_distill.training.checkpoint import CheckpointManager, OutputDirError, check_writable, export_student
from t2i_distill.training.deepspeed_config import resolve_deepspeed_config
from t2i_distill.training.ema import EMA
from t2i_distill.training.engine import BACKENDS, Engine, EngineConfig, StepReport, build_engine
from t2i_distill.training.optim import lr_scheduler_factory, optimizer_factory

__all__ = [
    "BACKENDS",
    "EMA",
    "CheckpointManager",
    "Engine",
    "EngineConfig",
    "OutputDirError",
    "StepReport",
    "build_engine",
    "check_writable",
    "export_student",
    "lr_scheduler_factory",
    "optimizer_factory",
    "resolve_deepspeed_config",
]
