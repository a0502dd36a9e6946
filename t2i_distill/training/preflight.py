"""Everything the trainer can know before it loads a model or a dataset, checked at parse time and reported at once.

* **Which flags were given** (on the command line or in ``--config``), so that defaults can be *taken* from a
  DeepSpeed JSON instead of contradicting it (:func:`explicit_flags`).
* **The DeepSpeed JSON**: its ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
  ``gradient_clipping`` and ``bf16.enabled`` become ``--train_batch_size``, ``--gradient_accumulation_steps``,
  ``--max_grad_norm`` and ``--mixed_precision`` when those flags were not given; a flag that was given and differs is
  a problem naming both values (:func:`take_deepspeed_settings`).
* **Installed packages** for the chosen backend, optimizer and tracker, each naming its install extra
  (:func:`missing_packages`).
* **``--jvp auto``**: ``dual`` on CUDA (checkpointable like the others), ``reference`` on a CPU, where Triton's
  interpreter is a correctness tool, not a fast path (:func:`resolve_jvp`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

__all__ = ["explicit_flags", "missing_packages", "resolve_jvp", "take_deepspeed_settings"]

logger = logging.getLogger("t2i_distill.train")

#: JSON key → (flag dest, flag name, how the JSON value maps to the flag's value).
_DS_TAKEN = {
    "train_micro_batch_size_per_gpu": ("train_batch_size", "--train_batch_size", int),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "--gradient_accumulation_steps", int),
    "gradient_clipping": ("max_grad_norm", "--max_grad_norm", float),
}


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None, config_keys=()) -> set[str]:
    """The dests the user set: on the command line (a second parse with every default suppressed) or in the
    ``--config`` file."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return set(vars(given)) | set(config_keys)


def take_deepspeed_settings(args: argparse.Namespace, explicit: set[str], cuda: bool) -> tuple[list[str], list[str]]:
    """``(problems, notes)``; fills the flags the JSON decides (module docstring). Nothing to do without a JSON."""
    if not args.deepspeed_config:
        return [], []
    path = Path(args.deepspeed_config)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return [f"--deepspeed_config {str(path)!r} does not exist (or is not readable)"], []
    except ValueError as error:
        return [f"--deepspeed_config {str(path)!r} is not valid JSON: {error}"], []
    if not isinstance(config, dict):
        return [f"--deepspeed_config {str(path)!r} must hold a JSON object"], []
    problems, notes = [], []
    for key, (dest, flag, convert) in _DS_TAKEN.items():
        value = config.get(key, "auto")
        if value == "auto":
            continue
        try:
            value = convert(value)
        except (TypeError, ValueError):
            problems.append(f"--deepspeed_config {str(path)!r}: {key!r} must be a number or \"auto\", got {value!r}")
            continue
        current = getattr(args, dest)
        current = 0.0 if dest == "max_grad_norm" and current is None else current
        if dest not in explicit:
            if current != value:
                notes.append(f"{flag} {value:g} (from the DeepSpeed JSON's {key})")
            setattr(args, dest, value)
        elif current != value:
            problems.append(f"{flag} {current:g} disagrees with the DeepSpeed JSON's {key} {value:g} "
                            f"({str(path)!r}); drop the flag to take the JSON's value, or edit the JSON")
    bf16 = config.get("bf16", {})
    enabled = bf16.get("enabled", "auto") if isinstance(bf16, dict) else "auto"
    if enabled != "auto":
        wanted = "bf16" if enabled else "no"
        if args.mixed_precision is None:
            args.mixed_precision = wanted
            notes.append(f"--mixed_precision {wanted} (from the DeepSpeed JSON's bf16.enabled {enabled})")
        elif args.mixed_precision != wanted:
            problems.append(f"--mixed_precision {args.mixed_precision} disagrees with the DeepSpeed JSON's "
                            f"bf16.enabled {enabled} ({str(path)!r}); drop the flag to take the JSON's value")
        if wanted == "bf16" and not cuda:
            problems.append(f"the DeepSpeed JSON {str(path)!r} enables bf16, which this run cannot use without a GPU "
                            "(--cpu, or no CUDA device): set its bf16.enabled to false or \"auto\"")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = config.get("train_batch_size", "auto")
    if total != "auto" and not problems:
        product = args.train_batch_size * args.gradient_accumulation_steps * world
        if int(total) != product:
            problems.append(f"the DeepSpeed JSON's train_batch_size {total} is not micro-batch × accumulation × "
                            f"processes = {args.train_batch_size} × {args.gradient_accumulation_steps} × {world} "
                            f"(WORLD_SIZE) = {product}; set it to \"auto\" or make them agree")
    return problems, notes


def missing_packages(args: argparse.Namespace, backend: str) -> list[str]:
    """One problem per optional package the flags need that is not installed, with the command that installs it."""
    needs = []
    if backend == "deepspeed":
        needs.append(("deepspeed", "--backend deepspeed / --deepspeed_config", 'pip install "t2i-distill[deepspeed]"'))
    if args.optimizer == "prodigy":
        needs.append(("prodigyopt", "--optimizer prodigy", 'pip install "t2i-distill[prodigy]"'))
    if getattr(args, "lora_rank", 0):
        needs.append(("peft", f"--lora_rank {args.lora_rank}", 'pip install "t2i-distill[lora]"'))
    if args.report_to in ("wandb", "all"):
        needs.append(("wandb", f"--report_to {args.report_to}", 'pip install "t2i-distill[wandb]"'))
    if args.report_to in ("tensorboard", "all"):
        needs.append(("tensorboard", f"--report_to {args.report_to}", "pip install tensorboard (or --report_to none)"))
    return [f"{what} needs the {module} package, which is not installed: {command}"
            for module, what, command in needs if importlib.util.find_spec(module) is None]


def resolve_jvp(args: argparse.Namespace, cuda: bool) -> str | None:
    """Resolve ``--jvp auto`` in place; returns the one log line that says which mode and why (or a warning for an
    explicit kernel mode on a CPU), or ``None``."""
    if args.method == "rescale":  # no JVP: the choice is only whether the student runs on the Triton kernels
        if args.jvp == "auto":
            args.jvp = "dual" if cuda else "reference"
        return None
    if args.jvp == "auto":
        if not cuda:
            args.jvp = "reference"
            return ("--jvp auto: reference (no GPU: the Triton kernels would run in the CPU interpreter, a correctness "
                    "tool, far slower than math attention at real sizes)")
        args.jvp = "dual"
        return "--jvp auto: dual (CUDA: one fused primal + tangent pass)"
    if not cuda and args.jvp in ("dual", "func"):
        return (f"--jvp {args.jvp} on a CPU runs the Triton kernels in the interpreter: correct but far slower than "
                "--jvp reference at real sizes (use it for parity checks, not for training speed)")
    return None
