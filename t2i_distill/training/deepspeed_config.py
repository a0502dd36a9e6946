"""Turning a DeepSpeed JSON (``parallel_config/*.json``) into the config the engine hands to ``deepspeed.initialize``.

The reference passes its JSON through accelerate, which fills ``"auto"`` values and lets the JSON's
``"gradient_clipping"`` silently override ``--max_grad_norm`` (reference-spec §5 B5). Here the trainer's values are
the single source of truth and the JSON may only agree with them:

* ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size`` (= micro × accumulation
  × world size) and ``gradient_clipping`` (= ``max_grad_norm``, 0.0 meaning no clipping) are filled in when absent
  or ``"auto"``, and an explicit value that differs is a ``ValueError`` naming both values. DeepSpeed then clips
  inside its own ``step()``, with exactly the trainer's threshold, and reports the pre-clip norm.
* ``bf16.enabled`` must agree with ``mixed_precision``; fp16 is not offered (it needs loss scaling the losses do not
  plan for).
* ``optimizer`` / ``scheduler`` sections are rejected: the engine's ``optimizer_factory`` and
  ``lr_scheduler_factory`` build them, and a JSON section would silently replace them (the same trap as B5).
* ZeRO stages 0–2 are accepted; stage 3 partitions the weights themselves, which export and EMA do not handle.
* ``zero_allow_untested_optimizer`` is set: the client optimizer is a torch optimizer (e.g. ``torch.optim.AdamW``),
  which needs no JIT-built DeepSpeed op, so the same path runs on a CPU (CI) and on GPUs.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

__all__ = ["resolve_deepspeed_config"]

_SUPPORTED_ZERO_STAGES = (0, 1, 2)


def _load(source: str | os.PathLike | dict) -> dict:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"deepspeed_config: expected a path to a JSON file or a dict, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed_config: {str(path)!r} does not exist (or is not a file)")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"deepspeed_config: {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"deepspeed_config: {str(path)!r} must hold a JSON object, found {type(loaded).__name__}")
    return loaded


def _agree(config: dict, key: str, trainer_value: object, trainer_name: str, where: str) -> None:
    """Fill ``config[key]`` from the trainer when absent/"auto"; raise when an explicit value differs."""
    value = config.get(key, "auto")
    if value == "auto":
        config[key] = trainer_value
        return
    if isinstance(trainer_value, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        same = float(value) == trainer_value
    else:
        same = value == trainer_value
    if not same:
        raise ValueError(
            f"deepspeed_config {where}: {key!r} is {value!r} but the trainer's {trainer_name} is {trainer_value!r}; "
            f"make them equal, or set {key!r} to \"auto\" (or remove it) so the trainer's value is used"
        )


def _find_auto(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [hit for key, value in node.items() for hit in _find_auto(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [hit for i, value in enumerate(node) for hit in _find_auto(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def resolve_deepspeed_config(
    source: str | os.PathLike | dict,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float | None,
    mixed_precision: str,
    world_size: int,
) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize``: ``source`` checked against and completed from the
    trainer's settings (see the module docstring). ``source`` is not modified. Raises ``ValueError`` naming the key,
    the JSON's value and the trainer's value on any disagreement."""
    config = _load(source)
    where = repr(str(source)) if not isinstance(source, dict) else "(dict)"

    _agree(config, "train_micro_batch_size_per_gpu", micro_batch_size, "micro_batch_size", where)
    _agree(config, "gradient_accumulation_steps", gradient_accumulation_steps, "gradient_accumulation_steps", where)
    _agree(config, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world_size,
           f"micro_batch_size × gradient_accumulation_steps × world_size ({micro_batch_size} × "
           f"{gradient_accumulation_steps} × {world_size})", where)
    # 0.0 is DeepSpeed's "no clipping"; None/0 is the trainer's.
    _agree(config, "gradient_clipping", float(max_grad_norm or 0.0), "max_grad_norm", where)

    bf16 = config.setdefault("bf16", {})
    if not isinstance(bf16, dict):
        raise ValueError(f"deepspeed_config {where}: 'bf16' must be an object like {{\"enabled\": true}}, got {bf16!r}")
    want_bf16 = mixed_precision == "bf16"
    enabled = bf16.get("enabled", "auto")
    if enabled == "auto":
        bf16["enabled"] = want_bf16
    elif bool(enabled) != want_bf16:
        raise ValueError(
            f"deepspeed_config {where}: 'bf16.enabled' is {enabled!r} but the trainer's mixed_precision is "
            f"{mixed_precision!r}; use mixed_precision='bf16' with bf16 enabled, or 'no' with it disabled"
        )
    fp16 = config.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise ValueError(f"deepspeed_config {where}: 'fp16.enabled' is {fp16.get('enabled')!r}; only bf16 or fp32 "
                         "training is supported (mixed_precision 'bf16' or 'no')")
    config.pop("fp16", None)

    for section, builder in (("optimizer", "optimizer_factory"), ("scheduler", "lr_scheduler_factory")):
        if section in config:
            raise ValueError(
                f"deepspeed_config {where}: has an {section!r} section ({config[section]!r}); the engine builds the "
                f"{section} with {builder}, and DeepSpeed would silently replace it. Remove the section."
            )

    stage = config.setdefault("zero_optimization", {}).get("stage", 0)
    if stage not in _SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"deepspeed_config {where}: 'zero_optimization.stage' is {stage!r}; supported stages are "
            f"{_SUPPORTED_ZERO_STAGES} (stage 3 shards the weights, which export and EMA do not gather)"
        )
    config["zero_allow_untested_optimizer"] = True

    left = _find_auto(config)
    if left:
        raise ValueError(f"deepspeed_config {where}: 'auto' values the engine cannot resolve: {', '.join(left)}; "
                         "give them explicit values (DeepSpeed itself cannot resolve 'auto')")
    return config
