"""LoRA students (``--lora_rank``): a peft LoRA adapter on the student's attention and feed-forward linears, the base
weights frozen, and the heads that exist only in the student (sCM's ``logvar_linear``, MeanFlow's
``timestep_embedder2``) fully trained, because the teacher folder has no trained values for them to adapt.

* :func:`apply_lora` injects the adapter (peft's ``inject_adapter_in_model``, the function diffusers' ``add_adapter``
  calls) into a :class:`~t2i_distill.models.FluxStudent`. The trainer applies it before the kernels are patched and
  before the engine is built, so the optimizer, the EMA, the backends and the checkpoints see only the model with the
  adapter (checkpoints hold base + adapter, so resume restores the model as it was).
* Every ``--jvp`` mode gives the tangent through base + adapter: ``dual`` differentiates each LoRA layer with
  ``torch.func.jvp`` (``dual_linear``), ``func``/``reference`` run ``torch.func.jvp`` over the whole model, ``fd``
  runs plain forwards.
* Exports (:func:`merged_state_dict`, :func:`adapter_state_dict`): the usual ``transformer_<step>.safetensors`` holds
  the *merged* student (``W + (alpha/rank)·B·A`` folded into each base weight: a plain model with the usual keys,
  loaded strictly by :func:`~t2i_distill.models.load_student`), and ``adapter_<step>.safetensors`` the adapter alone:
  peft's keys without the adapter name (``<module>.lora_A.weight``, ``<module>.lora_B.weight``) plus the fully trained
  heads under their model keys, with the LoRA settings in its metadata (:data:`META_LORA`). :func:`load_lora_adapter`
  puts it back onto a base student.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

__all__ = ["ADAPTER_NAME", "DEFAULT_LORA_TARGETS", "FULLY_TRAINED_MODULES", "META_LORA", "adapter_state_dict",
           "apply_lora", "check_lora_targets", "is_lora", "load_lora_adapter", "lora_settings", "lora_target_problems",
           "merged_state_dict"]

#: The linears of both FLUX block kinds the usual FLUX LoRA recipes adapt: attention q/k/v/out of the image stream,
#: the text stream's projections, both feed-forwards, and the single blocks' MLP in and joint output projections.
#: Names are matched as peft does (the module's name, or its last dotted parts): ``proj_out`` also adapts the
#: model's final output projection.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                        "proj_out")
#: Student-only heads, trained in full: the teacher folder holds no trained values for them.
FULLY_TRAINED_MODULES = ("logvar_linear", "timestep_embedder2")
ADAPTER_NAME = "default"  # peft's, so diffusers' adapter methods (disable_adapters, set_adapter) find it
#: safetensors metadata key of an adapter export: JSON of :func:`lora_settings`.
META_LORA = "t2i_distill.lora"
INSTALL = 'pip install "t2i-distill[lora]"'


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the full module name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def _short(name: str) -> str:
    """The shortest peft target naming a layer of this kind: its last part (the last two for ``to_out.0``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def lora_target_problems(student: nn.Module, targets: Sequence[str], flag: str = "--lora_target_modules") -> list[str]:
    """Why ``targets`` cannot be adapted on ``student`` (empty when they can): a target that matches no module, one
    that matches a module that is not a linear layer, or one inside a fully trained head."""
    modules = dict(student.named_modules())
    linears = sorted(name for name, module in modules.items()
                     if type(module) is nn.Linear and not name.startswith(FULLY_TRAINED_MODULES))
    problems = []
    for target in targets:
        hits = [name for name in modules if _matches(name, target)]
        if not hits:
            problems.append(f"{flag}: {target!r} matches no module of the student; expected the name (or last dotted "
                            f"parts) of its linear layers, e.g. {', '.join(sorted({_short(n) for n in linears}))}")
            continue
        wrong = [name for name in hits if type(modules[name]) is not nn.Linear]
        heads = [name for name in hits if name.startswith(FULLY_TRAINED_MODULES)]
        if wrong:
            problems.append(f"{flag}: {target!r} matches {wrong[0]} ({type(modules[wrong[0]]).__name__}); LoRA "
                            f"adapts linear layers only (nn.Linear), got {len(wrong)} other module(s)")
        elif heads:
            problems.append(f"{flag}: {target!r} matches {heads[0]}, a head that is trained in full "
                            f"({', '.join(FULLY_TRAINED_MODULES)}); drop it")
    return problems


def check_lora_targets(args) -> list[str]:
    """``--lora_target_modules`` against the student the flags describe, built from its config on the ``meta``
    device (nothing loads, peft not needed); a folder that cannot be read is left to the model checks."""
    from t2i_distill.errors import ConfigurationError
    from t2i_distill.models.loading import KINDS
    from t2i_distill.models.time_scale import read_transformer_config
    from t2i_distill.training.model_check import MODEL_KINDS

    try:
        config = read_transformer_config(args.pretrained_model_name_or_path, revision=args.revision,
                                         cache_dir=args.cache_dir)
    except ConfigurationError:
        return []  # named by check_models
    cls, overrides = KINDS[MODEL_KINDS[args.method][0]]
    with torch.device("meta"):
        student = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}, **overrides)
    return lora_target_problems(student, args.lora_target_modules or DEFAULT_LORA_TARGETS)


def _check_arguments(rank, alpha, targets, dropout) -> list[str]:
    problems = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"rank (--lora_rank): expected an integer >= 1, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        problems.append(f"alpha (--lora_alpha): expected a finite number > 0 or None (= rank), got {alpha!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        problems.append(f"target_modules (--lora_target_modules): expected a non-empty list of module names, got "
                        f"{targets!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"dropout (--lora_dropout): expected a number in [0, 1), got {dropout!r}")
    return problems


def _abstract_context(param: torch.Tensor):
    """Where an empty parameter like ``param`` is made: its fake mode (a FakeTensor), else plain (meta)."""
    return getattr(param, "fake_mode", None) or nullcontext()


def apply_lora(student: nn.Module, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
               dropout: float = 0.0) -> list[str]:
    """Inject a LoRA adapter of ``rank`` into ``student`` in place, freeze the rest, keep the heads trainable.

    Args:
        student: a FLUX student (:class:`~t2i_distill.models.FluxStudent` or a subclass) without an adapter; its
            parameters may be real, on the ``meta`` device, or FakeTensors.
        rank: the adapter's rank r (>= 1).
        alpha: the adapter's output is scaled by ``alpha / rank`` (peft's ``lora_alpha``); ``None``: ``rank`` (×1).
        target_modules: module names matched as peft does (:data:`DEFAULT_LORA_TARGETS` when ``None``).
        dropout: peft's ``lora_dropout`` on the adapter's input (0: none).

    Returns:
        The names of the fully trained modules present (``logvar_linear`` for sCM, ``timestep_embedder2`` for
        MeanFlow, none for a plain flow model). Afterwards exactly the LoRA weights and those modules require grad.

    Initialisation: on real parameters, peft's default (A Kaiming-uniform from torch's global RNG, B zero, so the
    student starts equal to its base). On ``meta``/fake parameters nothing is initialised and no data is read: the
    adapter's weights are empty tensors of the base layer's device and dtype, in the same (meta or fake) mode.

    Raises:
        ValueError: a bad argument or target (named by its trainer flag), or a student that already has an adapter.
        ImportError: peft is not installed (names ``pip install "t2i-distill[lora]"``).
    """
    targets = DEFAULT_LORA_TARGETS if target_modules is None else target_modules
    problems = _check_arguments(rank, alpha, targets, dropout)
    targets = list(targets)
    if not isinstance(student, nn.Module):
        problems.append(f"student: expected a torch.nn.Module, got {type(student).__name__}")
    elif is_lora(student):
        problems.append("student: already has a LoRA adapter (apply_lora was called twice)")
    elif not problems:
        problems += lora_target_problems(student, targets)
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else "; ".join(problems))
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError as error:
        raise ImportError(f"--lora_rank needs the peft package, which is not installed: {INSTALL}") from error

    from torch.utils._python_dispatch import _disable_current_modes

    params = list(student.parameters())
    abstract = any(p.device.type == "meta" or hasattr(p, "fake_mode") for p in params)
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), lora_dropout=float(dropout),
                        target_modules=targets, init_lora_weights=True)
    # low_cpu_mem_usage: peft makes the adapter on the meta device and skips its (data-writing) initialisation and
    # the device move, which fails on FakeTensors; the weights are then made empty like the base layer's below.
    # A fake mode the caller has entered is set aside meanwhile: under it peft's meta-device context makes fake CPU
    # tensors instead of meta ones, and the move fails.
    with _disable_current_modes() if abstract else nullcontext():
        inject_adapter_in_model(config, student, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=abstract)
        if abstract:
            for module in student.modules():
                if isinstance(module, LoraLayer):
                    base = module.get_base_layer().weight
                    with _abstract_context(base):
                        for linear in (module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]):
                            linear.weight = nn.Parameter(torch.empty(linear.weight.shape, dtype=base.dtype,
                                                                     device=base.device))
    student._hf_peft_config_loaded = True  # diffusers' adapter methods check this flag
    student.requires_grad_(False)
    for name, param in student.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.requires_grad_(True)
    heads = [name for name in FULLY_TRAINED_MODULES if isinstance(getattr(student, name, None), nn.Module)]
    for name in heads:
        getattr(student, name).requires_grad_(True)
    return heads


def is_lora(model: nn.Module) -> bool:
    return ADAPTER_NAME in (getattr(model, "peft_config", None) or {})


def lora_settings(model: nn.Module) -> dict:
    """The adapter's settings, as recorded in an adapter export: rank, alpha, dropout, targets, fully trained heads."""
    config = model.peft_config[ADAPTER_NAME]
    return {"r": int(config.r), "lora_alpha": float(config.lora_alpha), "lora_dropout": float(config.lora_dropout),
            "target_modules": sorted(config.target_modules),
            "fully_trained": [name for name in FULLY_TRAINED_MODULES if hasattr(model, name)]}


def _lora_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    marker = f".lora_A.{ADAPTER_NAME}.weight"
    return sorted(key[: -len(marker)] for key in state if key.endswith(marker))


def merged_state_dict(state: dict[str, torch.Tensor], settings: dict) -> dict[str, torch.Tensor]:
    """A LoRA student's state dict (base + adapter keys) → the plain student's: each adapted layer's weight becomes
    ``W + (alpha/rank)·(B @ A)`` (computed in float32, stored in W's dtype; peft's ``merge`` in the same order), its
    ``base_layer`` keys lose that part, and the adapter's keys go. Without adapter keys the state comes back as is."""
    prefixes = _lora_prefixes(state)
    if not prefixes:
        return dict(state)
    scaling = settings["lora_alpha"] / settings["r"]
    renamed = {f"{prefix}.base_layer.": f"{prefix}." for prefix in prefixes}
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        head = key.rsplit(".", 1)[0] + "."
        merged[renamed[head] + key.rsplit(".", 1)[1] if head in renamed else key] = value
    for prefix in prefixes:
        a = state[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"].float()
        b = state[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"].float()
        weight = merged[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (weight.float() + (b @ a) * scaling).to(weight.dtype)
    return merged


def adapter_state_dict(state: dict[str, torch.Tensor], settings: dict) -> dict[str, torch.Tensor]:
    """The adapter alone from a LoRA student's state dict: ``<module>.lora_{A,B}.weight`` (peft's saved keys, without
    the adapter name) and every parameter of the fully trained heads under its model key."""
    tag = f".{ADAPTER_NAME}."
    adapter = {key.replace(tag, "."): value for key, value in state.items() if ".lora_A." in key or ".lora_B." in key}
    heads = tuple(f"{name}." for name in settings["fully_trained"])
    adapter.update({key: value for key, value in state.items() if key.startswith(heads)})
    return adapter


def load_lora_adapter(student: nn.Module, path: str | Path) -> list[str]:
    """Put an ``adapter_<step>.safetensors`` export back onto ``student`` (the base it was trained on, e.g. from
    :func:`~t2i_distill.models.load_student` with the same folder and checkpoint flags as the training run):
    :func:`apply_lora` with the recorded settings, then the adapter and head weights, strictly. Returns the fully
    trained modules. The result computes what the LoRA student computed when the adapter was exported."""
    from safetensors import safe_open

    from t2i_distill.models.checkpoint_files import META_KIND

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if META_LORA not in metadata:
        raise ValueError(f"{str(path)!r} is not a LoRA adapter export (its metadata has no {META_LORA!r}); a "
                         "transformer_<step>.safetensors export is the merged student: load it with load_student")
    settings = json.loads(metadata[META_LORA])
    kind = "trigflow" if hasattr(student, "logvar_linear") else "meanflow" if hasattr(student, "timestep_embedder2") \
        else "flow"
    if metadata.get(META_KIND, kind) != kind:
        raise ValueError(f"{str(path)!r} is the adapter of a {metadata[META_KIND]} student; got a {kind} student")
    heads = apply_lora(student, settings["r"], settings["lora_alpha"], settings["target_modules"],
                       settings.get("lora_dropout", 0.0))
    wanted = adapter_state_dict(student.state_dict(), {**settings, "fully_trained": heads})
    missing, unexpected = sorted(wanted.keys() - state.keys()), sorted(state.keys() - wanted.keys())
    shapes = [f"{key}: {tuple(state[key].shape)} vs {tuple(wanted[key].shape)}" for key in wanted.keys() & state.keys()
              if state[key].shape != wanted[key].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{str(path)!r} does not fit this student: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}), shapes (file vs model) {shapes[:5]}")
    tag = f".{ADAPTER_NAME}."
    model_keys = {key.replace(tag, "."): key for key in student.state_dict()}
    with torch.no_grad():
        student.load_state_dict({model_keys[key]: value for key, value in state.items()}, strict=False)
    return heads
