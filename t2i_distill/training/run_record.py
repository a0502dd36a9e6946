"""A run folder tells what produced it: ``output_dir/args.json`` (every resolved flag, the package versions, the git
commit, the machine) written at the start of each run, and an output folder that already holds a run's checkpoints
is never trained into from step 0 by accident.

``args.json`` is rewritten by each run into the folder; each run also appends its record to ``runs.jsonl``, so a
resumed run's history (which flags changed between attempts) stays readable.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["existing_run_outputs", "run_record", "write_run_record"]

_PACKAGES = ("t2i-distill", "torch", "triton", "diffusers", "transformers", "accelerate", "deepspeed", "peft",
             "safetensors", "datasets", "kernels")
_OUTPUT_PATTERNS = (r"checkpoint-\d+", r"transformer_\d+(_ema)?\.(safetensors|pt)", r"adapter_\d+(_ema)?\.safetensors",
                    r"rescale_gap\.json", r"rescaled_transformer\.pt", r"rescaled", r"ckpts")


def _git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_record(args, **resolved) -> dict:
    """Every flag's value (after defaults, ``--config`` and the DeepSpeed JSON were applied), ``resolved`` settings
    (backend, world size, …), versions, git commit, machine and start time."""
    flags = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and k != "preflight_notes"}
    return {"command": f"t2i-distill {'rescale' if args.method == 'rescale' else 'train ' + args.method}",
            "flags": flags, "resolved": resolved, "notes": list(getattr(args, "preflight_notes", [])),
            "versions": _versions(), "git": _git_commit(),
            "machine": {"host": platform.node(), "python": platform.python_version(), "platform": platform.platform()},
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_run_record(output_dir: str | os.PathLike, record: dict) -> Path:
    """``args.json`` (atomic rewrite) and one line appended to ``runs.jsonl``; returns the ``args.json`` path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    tmp = out / ".args.json.tmp"
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, out / "args.json")
    with open(out / "runs.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
    return out / "args.json"


def existing_run_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in ``output_dir`` that a new run from step 0 would overwrite or mix with."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if any(re.fullmatch(pattern, p.name) for pattern in _OUTPUT_PATTERNS))


def remove_run_outputs(paths: list[Path]) -> None:
    """``--overwrite_output_dir``: remove an earlier run's checkpoints and exports (never anything else)."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
