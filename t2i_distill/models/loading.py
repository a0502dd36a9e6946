"""Building the students and teachers from a diffusers FLUX folder (or hub id) plus the reference's rescaled checkpoint.

The reference initialises every model the same way (reference-spec §3.1–3.2; ``train_sCM.py:475-492``,
``train_meanflow.py:405-427``): ``from_pretrained`` of the FLUX ``transformer`` folder, then
``load_state_dict(torch.load(rescaled)["module"], strict=False)`` of a checkpoint fine-tuned to ×1 time inputs.
:func:`load_student` does the same through diffusers' real ``from_pretrained``, and fixes what the reference leaves
to chance:

* the checkpoint is read with ``weights_only=True`` (the reference unpickles arbitrary objects);
* missing and unexpected keys are reported by name (:class:`LoadReport`), logged at WARNING, and fatal with
  ``strict=True``;
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
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from t2i_distill.models.flux import FluxStudent
from t2i_distill.models.trigflow import TrigFlowStudent

__all__ = ["KINDS", "LoadReport", "load_state_dict_file", "load_student"]

logger = logging.getLogger(__name__)

#: ``kind`` → (model class, config overrides besides ``time_scale``).
KINDS: dict[str, tuple[type[FluxStudent], dict[str, object]]] = {
    "flow": (FluxStudent, {"dual_timestep": False}),
    "trigflow": (TrigFlowStudent, {"dual_timestep": False}),
    "meanflow": (FluxStudent, {"dual_timestep": True}),
}

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SAFETENSORS_SUFFIXES = (".safetensors",)


# -- checkpoint files -------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict (name → CPU tensor) stored in ``path``.

    ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(map_location="cpu", weights_only=True)`` of either the reference's
    ``{"module": state_dict}`` (other top-level entries, e.g. DeepSpeed's, are ignored) or a plain state dict.
    ``.safetensors``: read with safetensors. Raises ``FileNotFoundError`` for a missing file and ``ValueError``
    (naming the path, what was expected and what was found) for anything else that is not a state dict of tensors,
    including pickles that ``weights_only`` refuses because they contain arbitrary Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except SafetensorError as error:
            raise ValueError(f"checkpoint {str(path)!r} is not a valid safetensors file: {error}") from error
    elif suffix in _TORCH_SUFFIXES:
        obj = _torch_load_weights_only(path)
    else:
        raise ValueError(
            f"checkpoint {str(path)!r}: unsupported file suffix {path.suffix!r}; expected one of "
            f"{', '.join(_TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES)}"
        )
    return _as_state_dict(obj, path)


def _torch_load_weights_only(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long and suggests weights_only=False; keep only what names the problem.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise ValueError(
                f"checkpoint {str(path)!r} is not a plain weights file: torch.load(weights_only=True) refused it for "
                f"safety because it contains a Python object other than tensors and containers ({refused.group(1)}). "
                "Re-save it as {'module': state_dict} of tensors (or as .safetensors) from a trusted environment."
            ) from error
        detail = re.search(r"Unsupported[^\n]*", str(error))
        raise ValueError(
            f"checkpoint {str(path)!r} is not a plain weights file: torch.load(weights_only=True) could not unpickle "
            f"it ({detail.group(0) if detail else type(error).__name__}); it is corrupt, not a torch checkpoint, or "
            "holds data the weights-only unpickler refuses for safety."
        ) from error
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError... for files that are not checkpoints
        raise ValueError(
            f"checkpoint {str(path)!r} could not be read by torch.load: {type(error).__name__}: {error}"
        ) from error


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    where = f"checkpoint {str(path)!r}"
    if isinstance(obj, dict) and "module" in obj:
        obj, where = obj["module"], f"checkpoint {str(path)!r}, entry 'module'"
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a state dict (str → Tensor) or {{'module': state dict}}, "
                         f"found {type(obj).__name__}")
    if not obj:
        raise ValueError(f"{where}: the state dict is empty")
    bad = [(key, type(value).__name__) for key, value in obj.items()
           if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{key!r}: {kind}" for key, kind in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        hint = "" if any(isinstance(value, torch.Tensor) for value in obj.values()) else (
            "; it holds no tensors at all, so it is not a state dict (the reference format is {'module': state dict})"
        )
        raise ValueError(
            f"{where}: expected a state dict mapping str keys to tensors; found {len(bad)} entries that are not: "
            f"{shown}{more}{hint}"
        )
    return dict(obj)


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


# -- loading ----------------------------------------------------------------------------------------------------
def load_student(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    kind: str = "flow",
    subfolder: str | None = "transformer",
    rescaled_checkpoint: str | os.PathLike | None = None,
    time_scale: float = 1.0,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
) -> tuple[FluxStudent, LoadReport]:
    """Build a student or teacher through diffusers' ``from_pretrained``, then apply the rescaled checkpoint.

    Args:
        pretrained_model_name_or_path: a diffusers FLUX folder (``<root>/<subfolder>/config.json`` + weights) or a hub
            id (resolved by huggingface_hub, honouring ``HF_HUB_OFFLINE`` and ``cache_dir``).
        kind: ``"flow"`` (:class:`FluxStudent`, the teacher of both methods), ``"trigflow"`` (:class:`TrigFlowStudent`,
            sCM) or ``"meanflow"`` (``FluxStudent(dual_timestep=True)``).
        subfolder: the transformer's folder inside the repository (``None``: the root).
        rescaled_checkpoint: ``.pt``/``.pth``/``.bin`` (``{"module": sd}`` or a plain state dict) or
            ``.safetensors`` loaded on top with ``load_state_dict(strict=False)`` semantics.
        time_scale: the model's time scale, overriding the folder's config (1.0: the reference's ×1 models;
            1000.0: stock FLUX).
        torch_dtype: dtype of the parameters (``None``: diffusers' default); checkpoint values are cast to it.
        device: where the model ends up (``None``: CPU).
        revision, variant, cache_dir: passed to ``from_pretrained``.
        strict: raise ``ValueError`` when :attr:`LoadReport.clean` is False (a key missing that no rule covers, or an
            unexpected key) instead of logging a warning.

    Returns:
        ``(model, report)``; the model is in eval mode, as ``from_pretrained`` returns it.

    Raises:
        ValueError: unknown ``kind``; a checkpoint that is not a state dict or whose shapes do not fit; a parameter
            that no source provides and no rule initialises; ``strict`` and an unclean report.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind`: expected one of {sorted(KINDS)}, got {kind!r}")
    cls, overrides = KINDS[kind]
    checkpoint = None if rescaled_checkpoint is None else load_state_dict_file(rescaled_checkpoint)  # fail fast
    name = os.fspath(pretrained_model_name_or_path)
    model, info = cls.from_pretrained(
        name,
        subfolder=subfolder,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        dtype=torch_dtype,  # diffusers deprecates `torch_dtype=` (0.42 takes both)
        output_loading_info=True,
        time_scale=float(time_scale),
        **overrides,
    )
    pretrained_missing = sorted(info["missing_keys"])
    report = LoadReport(
        unexpected=sorted(info["unexpected_keys"]),
        pretrained=f"{cls.__name__} ({kind}) from {name!r}" + (f" (subfolder {subfolder!r})" if subfolder else ""),
        checkpoint=None if rescaled_checkpoint is None else repr(os.fspath(rescaled_checkpoint)),
    )
    materialised = _materialise_meta(model)
    if checkpoint is None:
        report.missing = pretrained_missing
        unfilled = pretrained_missing
    else:
        _check_fits(model, checkpoint, report.checkpoint)
        result = model.load_state_dict(checkpoint, strict=False)
        report.missing = sorted(result.missing_keys)
        report.unexpected = sorted(set(report.unexpected) | set(result.unexpected_keys))
        unfilled = sorted(set(pretrained_missing) & set(result.missing_keys))
    _initialise_unfilled(model, kind, unfilled, report)
    _check_filled(model, materialised)

    if not report.clean:
        if strict:
            raise ValueError(f"load_student(strict=True): keys do not match\n{report}")
        logger.warning("%s", report)
    else:
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
