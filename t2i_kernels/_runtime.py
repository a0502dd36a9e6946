"""Where kernels run: Triton availability, compiled vs interpreted mode, and the errors that say what to do.

Triton decides at *decoration* time whether ``@triton.jit`` builds a compiled ``JITFunction`` or an
``InterpretedFunction`` (it reads ``TRITON_INTERPRET`` when each kernel module is imported). So the mode is a property
of the imported kernel object, and :func:`check_launchable` inspects that object instead of the environment variable,
which may have changed since.

Importing this module never fails: without Triton, ``triton``/``tl`` are stand-ins that let kernel files be imported
(so ``import t2i_kernels`` works everywhere, e.g. for the references) and that raise
:class:`KernelUnavailableError` with install advice the moment a kernel is launched.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "HAS_TRITON",
    "KernelUnavailableError",
    "check_launchable",
    "interpret_requested",
    "is_interpreted",
    "kernel_mode",
    "tl",
    "triton",
]

_INSTALL_TRITON = "install it with `pip install 'triton>=3.6'` (Linux; the CPU build of torch does not pull it in)"
_ENABLE_INTERPRETER = (
    "set TRITON_INTERPRET=1 in the environment *before* `kernels` or `triton` is imported "
    "(slow, fp32 only for tl.dot kernels), or move the tensors to a CUDA device"
)


class KernelUnavailableError(RuntimeError):
    """A Triton kernel cannot run in this process (no Triton, or CPU tensors without the interpreter)."""


class _MissingTritonObject:
    """Stand-in for anything reached through a missing ``triton`` module; fails loudly only when used."""

    def __init__(self, error: BaseException | None, name: str = "triton") -> None:
        self._error = error
        self._name = name

    def __getattr__(self, attr: str) -> "_MissingTritonObject":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingTritonObject(self._error, f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # `@triton.jit` and `@triton.jit(...)` must succeed at import time: return a kernel stand-in.
        if self._name.endswith(".constexpr"):  # module-level constants such as `LOG2E = tl.constexpr(...)`
            return args[0] if args else None
        if self._name.endswith(".jit"):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _MissingKernel(args[0].__name__, self._error)
            return lambda fn: _MissingKernel(fn.__name__, self._error)
        raise KernelUnavailableError(f"`{self._name}` needs Triton, which is not importable ({self._error}); "
                                     f"{_INSTALL_TRITON}.")

    def __getitem__(self, item: Any) -> "_MissingTritonObject":
        return self


class _MissingKernel:
    """What ``@triton.jit`` returns when Triton is missing: launching it raises with install advice."""

    def __init__(self, name: str, error: BaseException | None) -> None:
        self.__name__ = name
        self._error = error

    def __getitem__(self, grid: Any) -> Any:
        raise KernelUnavailableError(
            f"Triton kernel `{self.__name__}` cannot run: triton is not importable ({self._error}); {_INSTALL_TRITON}."
        )


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_ERROR: BaseException | None = None
except ImportError as exc:  # pragma: no cover - exercised by tests that hide triton in a subprocess
    HAS_TRITON = False
    _TRITON_ERROR = exc
    triton = _MissingTritonObject(exc)  # type: ignore[assignment]
    tl = _MissingTritonObject(exc, "triton.language")  # type: ignore[assignment]


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the interpreter (Triton's own parsing: 1/true/yes/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def is_interpreted(kernel: Any) -> bool:
    """Whether a ``@triton.jit`` object was built by the interpreter (decided when its module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def kernel_mode(kernel: Any) -> str:
    """``"compiled"``, ``"interpreted"`` or ``"unavailable"`` for one ``@triton.jit`` object."""
    if isinstance(kernel, _MissingKernel):
        return "unavailable"
    return "interpreted" if is_interpreted(kernel) else "compiled"


def check_launchable(op: str, kernel: Any, device: torch.device) -> None:
    """Raise :class:`KernelUnavailableError` with advice when ``kernel`` cannot run on tensors on ``device``.

    Called by every launcher before it allocates anything, so a wrong set-up never reaches Triton's own
    "0 active drivers" or pointer errors.
    """
    mode = kernel_mode(kernel)
    if mode == "unavailable":
        raise KernelUnavailableError(f"{op}: triton is not importable ({_TRITON_ERROR}); {_INSTALL_TRITON}.")
    if mode == "compiled" and device.type != "cuda":
        hint = (
            " TRITON_INTERPRET is set now but was not when the kernels were imported; set it before importing."
            if interpret_requested()
            else ""
        )
        raise KernelUnavailableError(
            f"{op}: the inputs are on `{device}` but the Triton kernels were compiled for GPUs; "
            f"{_ENABLE_INTERPRETER}.{hint}"
        )
