"""What this process can run: package versions, the GPU, and whether kernels run compiled or interpreted."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

#: Distributions reported by ``t2i-distill env`` (import name differs from the distribution for none of these).
#: ``kernels`` is Hugging Face's hub-kernels loader (transformers requires it), not ours: ours is ``t2i_kernels``.
REPORTED_PACKAGES = (
    "torch", "triton", "diffusers", "transformers", "accelerate", "datasets", "safetensors", "deepspeed", "flash-attn",
    "pytest-benchmark", "kernels",
)


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_name() -> str:
    """The first CUDA device's name, or ``"none"``."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def kernel_execution() -> tuple[str, str]:
    """``(mode, explanation)`` for the Triton kernels as imported in this process.

    The mode is read off an imported kernel object, because Triton fixes compiled-vs-interpreted when a kernel module
    is imported (``TRITON_INTERPRET`` at that moment), not when it runs.
    """
    from t2i_kernels import _runtime
    from t2i_kernels.gated_residual import _gated_residual_fwd_kernel

    mode = _runtime.kernel_mode(_gated_residual_fwd_kernel)
    if mode == "unavailable":
        return "unavailable", "triton is not importable: pip install 'triton>=3.6' (Linux)"
    if mode == "interpreted":
        return "interpreted", ("no GPU: the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1), "
                               "as every t2i-distill command does here: correct in fp32, slow (--jvp auto picks "
                               "reference for training)")
    if torch.cuda.is_available():
        return "compiled", f"Triton compiles the kernels for {gpu_name()}"
    return "unavailable", "compiled mode but no GPU: set TRITON_INTERPRET=1 before importing to run on the CPU"


def enable_interpreter_without_gpu() -> bool:
    """Turn on Triton's interpreter when there is no GPU, before any kernel module is imported.

    Returns True when this call switched it on. Triton fixes the mode of a kernel when it is decorated, and anything
    importing Triton first (diffusers does) would leave helpers compiled-mode, so :func:`t2i_distill.cli.main` calls
    this before it imports anything else, for every command that launches kernels.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET"):
        return False
    if "t2i_kernels.gated_residual" in sys.modules or "triton" in sys.modules:
        raise RuntimeError("Triton was imported before the interpreter could be enabled; set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def collect() -> dict[str, object]:
    """Everything ``t2i-distill env`` prints, as a dict (also embedded in every report's JSON)."""
    mode, explanation = kernel_execution()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in REPORTED_PACKAGES},
        "cuda": torch.version.cuda or "none",
        "gpu": gpu_name(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "kernel_mode": mode,
        "kernel_mode_detail": explanation,
        "t2i_kernels_path": _package_dir("t2i_kernels"),
    }


def _package_dir(name: str) -> str:
    """Where ``import name`` resolves in this process (a bug report shows which copy ran)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    return str(Path(spec.origin).parent) if spec and spec.origin else "not importable"


def format_env(info: dict[str, object]) -> str:
    lines = [f"python       {info['python']} ({info['platform']})"]
    for name, version in info["packages"].items():  # type: ignore[union-attr]
        label = "kernels (HF)" if name == "kernels" else name
        lines.append(f"{label:<12} {version}")
    lines.append(f"cuda         {info['cuda']}")
    lines.append(f"gpu          {info['gpu']}" + (f" (x{info['gpu_count']})" if info["gpu_count"] else ""))
    lines.append(f"t2i_kernels  {info['kernel_mode']}: {info['kernel_mode_detail']}")
    lines.append(f"             from {info['t2i_kernels_path']}")
    return "\n".join(lines)
