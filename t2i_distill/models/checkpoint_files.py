"""Reading transformer weights in every format users bring, with the keys normalised and the kind and time scale
the weights were trained at.

Formats (:func:`read_checkpoint`): a diffusers transformer folder (``config.json`` + ``diffusion_pytorch_model*
.safetensors``, sharded with an ``*.index.json`` or not; ``<root>/transformer`` is looked into), an index file
(``*.safetensors.index.json``), one ``.safetensors`` file, and the reference's ``.pt``/``.pth``/``.bin``
(``{"module": state_dict}``, the format T2I-Distill's ``test_sCM.py``/``test_meanflow.py`` load, or a plain state
dict). Keys lose the prefixes that training wrappers add (``module.``: DDP/DeepSpeed; ``_orig_mod.``:
``torch.compile``; ``student.``: a teacher-student pair such as the trainers').

Kinds (:func:`checkpoint_kind`) follow the keys: a MeanFlow student has ``timestep_embedder2.*``, an sCM student has
``logvar_linear.*``, anything else is a plain ×1/×1000 flow model (a teacher or a rescaled teacher).

Time scale (:attr:`Checkpoint.time_scale`): what the file records (``config.json``'s ``time_scale``; the
``t2i_distill.time_scale`` entry of safetensors metadata, of an index's ``metadata`` or of a ``.pt``'s
``"t2i_distill"`` dict, all written by this project), else ``None`` (unknown: the caller applies its rule, see
:mod:`t2i_distill.models.time_scale`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Checkpoint", "WRAPPER_PREFIXES", "checkpoint_kind", "describe_kind", "load_state_dict_file",
           "metadata_for", "read_checkpoint"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SAFETENSORS_SUFFIXES = (".safetensors",)
#: Prefixes training wrappers put in front of the model's keys, stripped (repeatedly, in any order).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "student.")
#: Metadata keys this project writes beside the weights.
META_TIME_SCALE, META_KIND = "t2i_distill.time_scale", "t2i_distill.kind"

_KIND_MARKERS = {"meanflow": "timestep_embedder2.", "trigflow": "logvar_linear."}
_KIND_NAMES = {"flow": "a flow model (a FLUX teacher or the ×1 rescaled teacher: no logvar_linear, no "
                       "timestep_embedder2)",
               "trigflow": "an sCM student (it has logvar_linear.*)",
               "meanflow": "a MeanFlow student (it has timestep_embedder2.*)"}


@dataclass
class Checkpoint:
    """A state dict (normalised keys → CPU tensors) and what its files say about it."""

    state_dict: dict[str, torch.Tensor]
    source: str
    time_scale: float | None = None
    recorded_kind: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return checkpoint_kind(self.state_dict)


def checkpoint_kind(keys) -> str:
    """``"meanflow"``, ``"trigflow"`` (sCM) or ``"flow"``, from the keys (see the module docstring)."""
    keys = list(keys)
    for kind, marker in _KIND_MARKERS.items():
        if any(key.startswith(marker) for key in keys):
            return kind
    return "flow"


def describe_kind(kind: str) -> str:
    return _KIND_NAMES.get(kind, kind)


def metadata_for(kind: str, time_scale: float) -> dict[str, str]:
    """The metadata entries exports carry (strings, as safetensors requires)."""
    return {META_KIND: kind, META_TIME_SCALE: repr(float(time_scale))}


def _normalise(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name[len(next(p for p in WRAPPER_PREFIXES if name.startswith(p))):]
        if name in out:
            raise ValueError(f"{where}: keys {key!r} and another one both map to {name!r} once the wrapper prefixes "
                             f"{', '.join(WRAPPER_PREFIXES)} are removed")
        out[name] = value
    return out


def _scale_of(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_checkpoint(path: str | os.PathLike, *, tensors: bool = True) -> Checkpoint:
    """Read ``path`` in any supported format (module docstring); raise ``FileNotFoundError``/``ValueError`` naming the
    path and what was expected otherwise.

    ``tensors=False`` reads only what the checks need, cheaply: safetensors values become ``meta`` tensors of the
    stored shape and dtype, ``.pt`` files are memory-mapped (read on first use).
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, tensors)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.name.endswith(".index.json"):
        return _read_index(path, tensors)
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        state, meta = _read_safetensors(path, tensors)
        return Checkpoint(_normalise(state, repr(str(path))), str(path), _scale_of(meta.get(META_TIME_SCALE)),
                          meta.get(META_KIND), [str(path)])
    if suffix in _TORCH_SUFFIXES:
        obj = _torch_load_weights_only(path, mmap=not tensors)
        extra = obj.get("t2i_distill") if isinstance(obj, dict) and isinstance(obj.get("t2i_distill"), dict) else {}
        state = _as_state_dict(obj, path)
        return Checkpoint(_normalise(state, repr(str(path))), str(path), _scale_of(extra.get("time_scale")),
                          extra.get("kind"), [str(path)])
    raise ValueError(
        f"checkpoint {str(path)!r}: unsupported file {path.name!r}; expected a diffusers transformer folder, a "
        f"*.safetensors.index.json, or a file ending in {', '.join(_SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES)}"
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The normalised state dict of ``path`` (any format :func:`read_checkpoint` reads)."""
    return read_checkpoint(path).state_dict


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    def placeholder(handle, key):
        piece = handle.get_slice(key)
        return torch.empty(piece.get_shape(), dtype=_ST_DTYPES.get(piece.get_dtype(), torch.float32), device="meta")

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) if tensors else placeholder(handle, key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"checkpoint {str(path)!r} is not a valid safetensors file: {error}") from error
    if not state:
        raise ValueError(f"checkpoint {str(path)!r}: the safetensors file holds no tensors")
    return state, meta


def _read_index(path: Path, tensors: bool = True) -> Checkpoint:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint index {str(path)!r}: expected JSON with a 'weight_map' "
                         f"(diffusers/transformers sharded format): {type(error).__name__}: {error}") from error
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (path.parent / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint index {str(path)!r} names {len(missing)} shard(s) that do not exist: "
                                f"{', '.join(missing[:5])}")
    state, meta = {}, dict(index.get("metadata") or {})
    for name in shards:
        part, part_meta = _read_safetensors(path.parent / name, tensors) if name.endswith(".safetensors") else (
            _as_state_dict(_torch_load_weights_only(path.parent / name, mmap=not tensors), path.parent / name), {})
        state.update(part)
        meta = {**part_meta, **meta}
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ValueError(f"checkpoint index {str(path)!r}: {len(absent)} key(s) of its weight_map are in no shard, "
                         f"e.g. {', '.join(absent[:5])}")
    return Checkpoint(_normalise(state, repr(str(path))), str(path), _scale_of(meta.get(META_TIME_SCALE)),
                      meta.get(META_KIND), [str(path.parent / name) for name in shards])


def _read_folder(path: Path, tensors: bool = True) -> Checkpoint:
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    config_file = path / "config.json"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    weights = sorted(path.glob("*.safetensors"))
    if indexes:
        checkpoint = _read_index(indexes[0], tensors)
    elif len(weights) == 1:
        checkpoint = read_checkpoint(weights[0], tensors=tensors)
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise ValueError(f"checkpoint folder {str(path)!r}: expected a diffusers transformer folder (config.json and "
                         f"one *.safetensors file or a *.safetensors.index.json); found {found}")
    checkpoint.source = str(path)
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"checkpoint folder {str(path)!r}: config.json is not valid JSON: {error}") from error
        # A diffusers config without `time_scale` is stock FLUX (×1000); this project's folders record theirs.
        checkpoint.time_scale = _scale_of(config.get("time_scale", 1000.0))
    return checkpoint


def _torch_load_weights_only(path: Path, mmap: bool = False) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:  # mmap needs the zip format; old pickles are read whole
            if not mmap or "mmap" not in str(error):
                raise
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
