"""A model's time scale is part of the model: which scale a set of weights was trained at, and refusals when a
flag would feed them times on another one.

FLUX multiplies its time and guidance inputs by ``time_scale`` before the sinusoids: stock diffusers FLUX by 1000,
the reference's rescaled ("X1") models by 1. Weights trained at one scale produce garbage at the other, silently.
The rule, applied by the trainer, ``rescale`` and the pipelines before any model loads:

1. a checkpoint that records its scale (this project's exports, ``rescale``'s outputs, a folder's ``config.json``)
   is at that scale;
2. a checkpoint that records nothing (the reference's ``{"module": state_dict}`` ``.pt``) is ×1: that is the
   reference's convention for everything it loads with ``--rescaled_checkpoint_path`` and for its released students;
3. without a checkpoint, the folder decides: a ``time_scale`` in the transformer's ``config.json`` (this project's
   folders), else ×1000 (a stock diffusers FLUX folder, whose config has no such key).

An explicit ``--time_scale`` that differs from what the weights were trained at is refused, naming the flags.
"""

from __future__ import annotations

import os
from pathlib import Path

from t2i_distill.errors import ConfigurationError

__all__ = ["RESCALED_TIME_SCALE", "STOCK_TIME_SCALE", "TimeScaleError", "config_time_scale", "folder_time_scale",
           "format_scale",
           "resolve_time_scale", "weights_time_scale"]

STOCK_TIME_SCALE = 1000.0
RESCALED_TIME_SCALE = 1.0


class TimeScaleError(ConfigurationError):
    """Weights and flags disagree on the time scale."""


def format_scale(scale: float) -> str:
    return f"×{float(scale):g}"


def folder_time_scale(pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = "transformer",
                      revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                      flag: str = "--pretrained_model_name_or_path") -> tuple[float, str]:
    """``(scale, why)`` of the transformer in a diffusers FLUX folder or hub id, from its ``config.json`` alone."""
    config = read_transformer_config(pretrained_model_name_or_path, subfolder, revision, cache_dir, flag)
    return config_time_scale(config, f"{flag} {os.fspath(pretrained_model_name_or_path)!r}")


def config_time_scale(config: dict, where: str) -> tuple[float, str]:
    """``(scale, why)`` of a transformer ``config`` already read (``where`` names it in the explanation)."""
    if "time_scale" in config:
        return float(config["time_scale"]), f"{where}: its transformer config records time_scale {config['time_scale']}"
    return STOCK_TIME_SCALE, f"{where} is a stock diffusers FLUX transformer (its config has no time_scale): ×1000"


def read_transformer_config(pretrained_model_name_or_path, subfolder="transformer", revision=None, cache_dir=None,
                            flag: str = "--pretrained_model_name_or_path") -> dict:
    """The transformer's ``config.json`` as a dict, with a clear error for a folder that does not exist (instead of
    huggingface_hub's "Repo id must be in the form ..." for anything that looks like a path)."""
    from diffusers import FluxTransformer2DModel

    name = os.fspath(pretrained_model_name_or_path)
    local = Path(name)
    looks_local = local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        config_file = local / (subfolder or "") / "config.json"
        if not config_file.is_file():
            raise ConfigurationError(
                f"{flag} {name!r}: expected a diffusers FLUX folder with {os.path.join(subfolder or '', 'config.json')}"
                f" (or a hub id such as Freepik/flux.1-lite-8B); "
                + ("the folder does not exist" if not local.exists() else f"{config_file} does not exist")
            )
    try:
        return dict(FluxTransformer2DModel.load_config(name, subfolder=subfolder, revision=revision,
                                                       cache_dir=cache_dir))
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"{flag} {name!r}: could not read the transformer config: {error}") from error


def weights_time_scale(folder: tuple[float, str], checkpoint=None) -> tuple[float, str]:
    """``(scale, why)`` of the weights a model will hold: the checkpoint's (rules 1–2) when one is given, else the
    folder's (rule 3). ``checkpoint`` is a :class:`~t2i_distill.models.checkpoint_files.Checkpoint`."""
    if checkpoint is None:
        return folder
    if checkpoint.time_scale is not None:
        return checkpoint.time_scale, f"checkpoint {checkpoint.source!r} records {format_scale(checkpoint.time_scale)}"
    return RESCALED_TIME_SCALE, (f"checkpoint {checkpoint.source!r} records no time scale; the reference's checkpoints "
                                 "are ×1 (its X1 models)")


def resolve_time_scale(requested: float | None, weights: tuple[float, str], *, flag: str = "--time_scale",
                       checkpoint_flag: str = "--rescaled_checkpoint_path") -> float:
    """The scale to build the model at: the weights' own; ``requested`` (a flag's value) must agree when given."""
    scale, why = weights
    if requested is None or float(requested) == float(scale):
        return float(scale)
    if float(scale) == STOCK_TIME_SCALE and float(requested) == RESCALED_TIME_SCALE:
        fix = (f"drop {flag} to train on the stock weights at ×1000 (time embeddings in float32), give "
               f"{checkpoint_flag} a ×1 checkpoint, or make a ×1 teacher with `t2i-distill rescale` and pass its "
               "folder")
    else:
        fix = f"drop {flag} (the weights' own scale is used), or give weights trained at {format_scale(requested)}"
    raise TimeScaleError(f"{flag} {float(requested):g}: the weights were trained at {format_scale(scale)} ({why}); "
                         f"feeding them times at {format_scale(requested)} gives wrong outputs silently. Fix: {fix}")
