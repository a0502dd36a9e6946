"""Building the students and teachers from a diffusers FLUX folder (or hub id) plus the reference's rescaled checkpoint.

The reference initialises every model the same way (reference-spec §3.1–3.2; ``train_sCM.py:475-492``,
``train_meanflow.py:405-427``): ``from_pretrained`` of the FLUX ``transformer`` folder, then
``load_state_dict(torch.load(rescaled)["module"], strict=False)`` of a checkpoint fine-tuned to ×1 time inputs.
:func:`load_student` does the same through diffusers' real ``from_pretrained``, and fixes what the reference leaves
to chance:

* the checkpoint is read with ``weights_only=True`` (the reference unpickles arbitrary objects), in any format
  :func:`~t2i_distill.models.checkpoint_files.read_checkpoint` reads, with wrapper prefixes removed;
* it is taken strictly (:func:`check_load`, from configs and file headers before anything loads): a key missing
  beyond the kind's documented extras (:data:`EXTRAS`), an unexpected key, another shape, a checkpoint of another kind,
  or a time scale that disagrees with the weights' (:mod:`t2i_distill.models.time_scale`) is refused, naming the
  flags, with counts and example keys (the reference's ``strict=False`` loaded whatever matched, silently);
* parameters diffusers leaves on the ``meta`` device (keys absent from the folder: it says "newly initialized" but
  allocates nothing) are materialised, and filled from the checkpoint or by a documented rule; a parameter that no
  source fills and no rule covers is an error, never memory garbage;
* MeanFlow's ``timestep_embedder2`` is initialised as a *copy* of ``time_text_embed.timestep_embedder``. The reference
  uses ``load_state_dict(assign=True)``, which makes the two embedders share storage until DeepSpeed's cast happens
  to break the aliasing (the two must train independently). The reference also overwrites ``timestep_embedder2``
  unconditionally; here a checkpoint that has it (a MeanFlow student's) keeps it;
* checkpoint shapes are checked against the model before anything is copied, so a bad checkpoint raises with every
  mismatch listed and no model is returned half-loaded.

Kinds: ``"flow"`` is the ×1 :class:`FluxStudent` (the teacher of both methods, and the sCM base); ``"trigflow"`` is
:class:`TrigFlowStudent` (sCM student/teacher, + ``logvar_linear``); ``"meanflow"`` is ``FluxStudent(dual_timestep=
True)`` (+ ``timestep_embedder2``). The reference's checkpoints map onto them key for key: a rescaled FLUX checkpoint
has the FLUX keys, an sCM checkpoint adds ``logvar_linear.{weight,bias}``, a MeanFlow one adds
``timestep_embedder2.linear_{1,2}.{weight,bias}``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from t2i_distill.errors import ConfigurationError
from t2i_distill.models.checkpoint_files import (
    Checkpoint,
    describe_kind,
    load_state_dict_file,
    read_checkpoint,
)
from t2i_distill.models.flux import FluxStudent
from t2i_distill.models.time_scale import (
    RESCALED_TIME_SCALE,
    config_time_scale,
    format_scale,
    read_transformer_config,
    resolve_time_scale,
    weights_time_scale,
)
from t2i_distill.models.trigflow import TrigFlowStudent

__all__ = ["KINDS", "LoadCheck", "LoadReport", "check_load", "load_state_dict_file", "load_student"]

logger = logging.getLogger(__name__)

#: ``kind`` → (model class, config overrides besides ``time_scale``).
KINDS: dict[str, tuple[type[FluxStudent], dict[str, object]]] = {
    "flow": (FluxStudent, {"dual_timestep": False}),
    "trigflow": (TrigFlowStudent, {"dual_timestep": False}),
    "meanflow": (FluxStudent, {"dual_timestep": True}),
}

#: Model keys a source may lack, per kind: the documented extras, filled by :data:`_INIT_RULES`.
EXTRAS = {"flow": (), "trigflow": ("logvar_linear.",), "meanflow": ("timestep_embedder2.",)}


# -- the report -------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_student` loaded, and every key that did not match, by name.

    Attributes:
        missing: model keys the last weights source lacked: the rescaled checkpoint when one was given (those keys
            keep the pretrained folder's values, or were initialised by a rule if the folder lacked them too), else
            the pretrained weights.
        unexpected: keys of the pretrained weights or of the checkpoint that the model has no slot for (ignored).
        initialised_from: module name → where its values came from, for modules no source provided (e.g.
            ``{"timestep_embedder2": "time_text_embed.timestep_embedder"}``).
        pretrained: the folder or hub id (and subfolder) ``from_pretrained`` read.
        checkpoint: the rescaled checkpoint applied on top, if any.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    initialised_from: dict[str, str] = field(default_factory=dict)
    pretrained: str = ""
    checkpoint: str | None = None

    @property
    def unexplained_missing(self) -> list[str]:
        """Missing keys that no initialisation rule covered (they hold values from an earlier source)."""
        return [key for key in self.missing
                if not any(key.startswith(module + ".") for module in self.initialised_from)]

    @property
    def clean(self) -> bool:
        """True when every key came from a source or a documented rule and no source key was ignored."""
        return not self.unexplained_missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"loaded {self.pretrained}" + (f" + checkpoint {self.checkpoint}" if self.checkpoint else "")]
        lacking = f"checkpoint {self.checkpoint}" if self.checkpoint else "pretrained weights"
        lines.append(f"  missing from {lacking} ({len(self.missing)}): {', '.join(self.missing) or '-'}")
        lines.append(f"  unexpected, ignored ({len(self.unexpected)}): {', '.join(self.unexpected) or '-'}")
        initialised = ", ".join(f"{module} <- {source}" for module, source in self.initialised_from.items())
        lines.append(f"  initialised ({len(self.initialised_from)}): {initialised or '-'}")
        return "\n".join(lines)


# -- initialisation rules for keys no source provides -----------------------------------------------------------
def _copy_first_timestep_embedder(model: nn.Module, keys: list[str]) -> str:
    """MeanFlow: ``timestep_embedder2.*`` ← a copy (own storage) of ``time_text_embed.timestep_embedder.*``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            source = "time_text_embed.timestep_embedder." + key.removeprefix("timestep_embedder2.")
            params[key].copy_(params[source])
    return "time_text_embed.timestep_embedder"


def _reset_logvar(model: nn.Module, keys: list[str]) -> str:
    """sCM: the reference's init of the logvar head (Xavier-uniform weight, zero bias), for the keys given."""
    with torch.no_grad():
        if "logvar_linear.weight" in keys:
            nn.init.xavier_uniform_(model.logvar_linear.weight)
        if "logvar_linear.bias" in keys:
            nn.init.zeros_(model.logvar_linear.bias)
    return "xavier_uniform weight, zero bias (reference init)"


#: ``kind`` → {module name: rule}; a rule fills the given keys of that module and says where the values came from.
_INIT_RULES: dict[str, dict[str, Callable[[nn.Module, list[str]], str]]] = {
    "flow": {},
    "trigflow": {"logvar_linear": _reset_logvar},
    "meanflow": {"timestep_embedder2": _copy_first_timestep_embedder},
}


# -- checks before anything loads ----------------------------------------------------------------------------------
@dataclass
class LoadCheck:
    """What :func:`check_load` established from configs and file headers alone (no weights read)."""

    time_scale: float
    time_scale_why: str
    checkpoint: Checkpoint | None
    config: dict


def _examples(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_load(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    kind: str = "flow",
    subfolder: str | None = "transformer",
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    accepted_kinds: tuple[str, ...] | None = None,
    time_scale: float | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    flags: dict[str, str] | None = None,
) -> LoadCheck:
    """Every refusal :func:`load_student` would make, from the folder's config and the checkpoint's keys, shapes and
    metadata only (a ``meta``-device model, no weights read), gathered into one ``ValueError``.

    ``accepted_kinds``: checkpoint kinds this caller takes (default: a flow checkpoint or one of the model's own
    kind). ``flags`` names the flags in messages: keys ``pretrained``, ``checkpoint``, ``time_scale``, ``kind``
    (e.g. ``{"checkpoint": "--student_checkpoint", "kind": "--method scm"}``).
    """
    if kind not in KINDS:
        raise ValueError(f"`kind`: expected one of {sorted(KINDS)}, got {kind!r}")
    names = {"pretrained": "--pretrained_model_name_or_path", "checkpoint": "--rescaled_checkpoint_path",
             "time_scale": "--time_scale", "kind": f"a {kind} model", **(flags or {})}
    name = os.fspath(pretrained_model_name_or_path)
    config = read_transformer_config(name, subfolder, revision, cache_dir, flag=names["pretrained"])
    folder = config_time_scale(config, f"{names['pretrained']} {name!r}")
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint, tensors=False)
    problems = []
    accepted = accepted_kinds or tuple(dict.fromkeys(("flow", kind)))
    if checkpoint is not None and checkpoint.kind not in accepted:
        problems.append(
            f"{names['checkpoint']} {checkpoint.source!r} is {describe_kind(checkpoint.kind)}, but {names['kind']} "
            f"needs {' or '.join(describe_kind(k) for k in accepted)}"
        )
    weights = weights_time_scale(folder, checkpoint)
    try:
        scale = resolve_time_scale(time_scale, weights, flag=names["time_scale"], checkpoint_flag=names["checkpoint"])
    except ValueError as error:
        problems.append(str(error))
        scale = float(time_scale)
    why = weights[1]

    cls, overrides = KINDS[kind]
    model_config = {k: v for k, v in config.items() if not k.startswith("_")}
    model_config.update(overrides, time_scale=scale)
    with torch.device("meta"):
        model = cls.from_config(model_config)
    slots = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if checkpoint is None:  # the folder's weights are the source: check their keys the same way
        try:
            source = read_checkpoint(Path(name) / (subfolder or ""), tensors=False) if Path(name).is_dir() else None
        except (OSError, ValueError):
            source = None  # from_pretrained will say what is wrong with the folder's weights
        label = f"{names['pretrained']} {name!r}"
    else:
        source, label = checkpoint, f"{names['checkpoint']} {checkpoint.source!r}"
    if source is not None:
        keys = source.state_dict
        missing = sorted(k for k in slots if k not in keys and not k.startswith(EXTRAS[kind]))
        unexpected = sorted(k for k in keys if k not in slots)
        shapes = sorted(f"{k}: file {tuple(keys[k].shape)}, model {slots[k]}" for k in keys
                        if k in slots and tuple(keys[k].shape) != slots[k])
        if missing or unexpected or shapes:
            matched = len(set(keys) & set(slots))
            parts = [f"{label} does not fit {names['kind']} ({cls.__name__} of {name!r}): {matched} of {len(slots)} "
                     "model keys match"]
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {_examples(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})")
            if shapes:
                parts.append(f"{len(shapes)} with another shape ({_examples(shapes, 3)})")
            if any(".lora_A." in k for k in unexpected):  # an adapter export of a LoRA run, not a student
                parts.append("it is a LoRA adapter (adapter_<step>.safetensors): give the merged "
                             "transformer_<step>.safetensors written beside it, or put it onto a base student with "
                             "t2i_distill.training.lora.load_lora_adapter")
            extras = ", ".join(f"{e}*" for e in EXTRAS[kind]) or "none"
            problems.append("; ".join(parts) + f"; only the documented extras may be absent ({extras}), nothing may "
                            "be unexpected, and nothing was loaded")
    if problems:
        raise ConfigurationError("\n".join(problems) if len(problems) == 1 else
                         f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return LoadCheck(time_scale=scale, time_scale_why=why, checkpoint=checkpoint, config=config)


# -- loading ----------------------------------------------------------------------------------------------------
def load_student(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    kind: str = "flow",
    subfolder: str | None = "transformer",
    rescaled_checkpoint: str | os.PathLike | None = None,
    time_scale: float | None = None,
    time_embedding_fp32: bool | None = None,
    accepted_kinds: tuple[str, ...] | None = None,
    flags: dict[str, str] | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[FluxStudent, LoadReport]:
    """Build a student or teacher through diffusers' ``from_pretrained``, then apply the checkpoint, strictly.

    Args:
        pretrained_model_name_or_path: a diffusers FLUX folder (``<root>/<subfolder>/config.json`` + weights) or a hub
            id (resolved by huggingface_hub, honouring ``HF_HUB_OFFLINE`` and ``cache_dir``).
        kind: ``"flow"`` (:class:`FluxStudent`, the teacher of both methods), ``"trigflow"`` (:class:`TrigFlowStudent`,
            sCM) or ``"meanflow"`` (``FluxStudent(dual_timestep=True)``).
        subfolder: the transformer's folder inside the repository (``None``: the root).
        rescaled_checkpoint: weights loaded over the folder's, in any format
            :func:`~t2i_distill.models.checkpoint_files.read_checkpoint` reads.
        time_scale: ``None`` (the weights' own scale, :mod:`t2i_distill.models.time_scale`) or a value that must
            agree with it.
        time_embedding_fp32: time/guidance embeddings in float32 (``None``: on when the scale is not ×1).
        accepted_kinds, flags: see :func:`check_load`.
        torch_dtype: dtype of the parameters (``None``: diffusers' default); checkpoint values are cast to it.
        device: where the model ends up (``None``: CPU).
        revision, variant, cache_dir: passed to ``from_pretrained``.

    Returns:
        ``(model, report)``; the model is in eval mode, as ``from_pretrained`` returns it.

    Raises:
        ValueError: unknown ``kind``; a checkpoint of another kind, at another time scale than ``time_scale``, with a
            key missing (beyond the kind's documented extras), unexpected or of another shape; a parameter that no
            source provides and no rule initialises. Nothing is loaded half-way.
    """
    check = check_load(pretrained_model_name_or_path, kind=kind, subfolder=subfolder, checkpoint=rescaled_checkpoint,
                       accepted_kinds=accepted_kinds, time_scale=time_scale, revision=revision, cache_dir=cache_dir,
                       flags=flags)
    cls, overrides = KINDS[kind]
    checkpoint = None if rescaled_checkpoint is None else read_checkpoint(rescaled_checkpoint)
    fp32 = check.time_scale != RESCALED_TIME_SCALE if time_embedding_fp32 is None else bool(time_embedding_fp32)
    name = os.fspath(pretrained_model_name_or_path)
    model, info = cls.from_pretrained(
        name,
        subfolder=subfolder,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        dtype=torch_dtype,  # diffusers deprecates `torch_dtype=` (0.42 takes both)
        output_loading_info=True,
        time_scale=check.time_scale,
        time_embedding_fp32=fp32,
        **overrides,
    )
    pretrained_missing = sorted(info["missing_keys"])
    report = LoadReport(
        unexpected=sorted(info["unexpected_keys"]),
        pretrained=f"{cls.__name__} ({kind}, {format_scale(check.time_scale)}"
                   f"{', fp32 time embeddings' if fp32 else ''}) from {name!r}"
                   + (f" (subfolder {subfolder!r})" if subfolder else ""),
        checkpoint=None if rescaled_checkpoint is None else repr(os.fspath(rescaled_checkpoint)),
    )
    materialised = _materialise_meta(model)
    if checkpoint is None:
        report.missing = pretrained_missing
        unfilled = pretrained_missing
    else:
        _check_fits(model, checkpoint.state_dict, report.checkpoint)
        result = model.load_state_dict(checkpoint.state_dict, strict=False)
        report.missing = sorted(result.missing_keys)
        report.unexpected = sorted(set(report.unexpected) | set(result.unexpected_keys))
        unfilled = sorted(result.missing_keys)  # only documented extras pass check_load: their rule fills them
    _initialise_unfilled(model, kind, unfilled, report)
    _check_filled(model, materialised)
    if not report.clean:  # check_load saw the same files; a difference here is a bug, never a silent load
        raise ValueError(f"keys do not match\n{report}")
    logger.info("%s", report)
    if device is not None:
        model = model.to(device=device)
    return model, report


def _materialise_meta(model: nn.Module) -> list[str]:
    """Give every parameter/buffer diffusers left on ``meta`` real (NaN-filled) storage beside the loaded ones.

    NaN, not ``torch.empty``: a value that nothing fills later must be loud, never plausible. Returns their names.
    """
    real = next((t for t in (*model.parameters(), *model.buffers()) if not t.is_meta), None)
    device = torch.device("cpu") if real is None else real.device
    names = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for slots, is_param in ((module._parameters, True), (module._buffers, False)):
            for leaf, tensor in list(slots.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                data = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                if data.is_floating_point():
                    data.fill_(float("nan"))
                slots[leaf] = nn.Parameter(data, requires_grad=tensor.requires_grad) if is_param else data
                names.append(prefix + leaf)
    return names


def _check_fits(model: nn.Module, checkpoint: dict[str, torch.Tensor], where: str | None) -> None:
    """Raise one ``ValueError`` listing every checkpoint entry whose shape or kind does not fit the model's slot."""
    slots = model.state_dict()
    problems = []
    for key, value in sorted(checkpoint.items()):
        slot = slots.get(key)
        if slot is None:
            continue
        if tuple(value.shape) != tuple(slot.shape):
            problems.append(f"{key}: checkpoint shape {tuple(value.shape)}, model shape {tuple(slot.shape)}")
        elif value.is_floating_point() != slot.is_floating_point():
            problems.append(f"{key}: checkpoint dtype {value.dtype}, model dtype {slot.dtype}")
    if problems:
        raise ValueError(
            f"checkpoint {where} does not fit the model ({len(problems)} entries; nothing was loaded): "
            + "; ".join(problems)
        )


def _check_filled(model: nn.Module, names: list[str]) -> None:
    """Guard against a gap in the logic above: every materialised tensor must have been overwritten (no NaN left)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unfilled = [name for name in names if tensors[name].is_floating_point() and tensors[name].isnan().any()]
    if unfilled:
        raise RuntimeError(f"internal error: parameters left without values after loading: {', '.join(unfilled)}")


def _initialise_unfilled(model: nn.Module, kind: str, unfilled: list[str], report: LoadReport) -> None:
    """Fill the keys no source provided by the kind's rules; raise if any key has no rule."""
    rules = _INIT_RULES[kind]
    by_module: dict[str, list[str]] = {}
    orphans = []
    for key in unfilled:
        module = next((m for m in rules if key.startswith(m + ".")), None)
        if module is None:
            orphans.append(key)
        else:
            by_module.setdefault(module, []).append(key)
    if orphans:
        raise ValueError(
            f"no source provides {len(orphans)} parameter(s) of the {kind!r} model and no rule initialises them "
            f"(neither {report.pretrained} nor the checkpoint {report.checkpoint} has them): {', '.join(orphans)}"
        )
    for module, keys in by_module.items():
        report.initialised_from[module] = rules[module](model, keys)
