"""One refusal, with the op's name, for every kind of double differentiation through the kernels.

sCM and MeanFlow differentiate once: a tangent (forward mode) that is then detached, and a gradient (reverse mode) of
the primal. Nothing differentiates a tangent or a gradient again, so the kernels have no second-order rules. Without
this module PyTorch's answer is generic ("no autograd formula was registered", "must override the setup_context
staticmethod"); with it every case raises :class:`DoubleDifferentiationError` naming the op and saying why:

* backward of a tangent (``tangent.sum().backward()`` after ``torch.func.jvp`` or ``forward_ad``) and double backward
  (``create_graph=True`` then backward of a gradient): every ``t2i_kernels`` custom op gets an autograd formula
  (``register_autograd``) whose backward raises. Ordinary passes never record these nodes, because autograd
  Functions run their forward under no-grad and their backward under no-grad unless ``create_graph=True``.
* forward-mode AD over a backward (``torch.func.jvp`` of ``torch.func.grad``, dual tensors into ``backward``): each
  kernel Function's ``backward`` first checks its incoming gradients for tangents and an active jvp transform.

:func:`install` does both, by op and class name, without touching the kernels; ``t2i_kernels/__init__.py`` calls it.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.autograd.forward_ad as fwAD

from t2i_kernels._custom_ops import LIBRARY

__all__ = ["DoubleDifferentiationError", "install"]


class DoubleDifferentiationError(RuntimeError):
    """Differentiating a kernel's tangent or gradient again (not needed by sCM/MeanFlow, so not implemented)."""


def _message(op: str, what: str) -> str:
    return (f"{op}: {what} is not supported. The kernels differentiate once (a tangent, or a gradient of the "
            "primal), which is all sCM and MeanFlow need: they detach the tangent and never differentiate a "
            "gradient. Detach the tangent (`.detach()`), or differentiate t2i_kernels.reference instead.")


def _refusing_backward(qualname: str):
    def backward(ctx, *grads):
        raise DoubleDifferentiationError(_message(
            qualname, "backward through this op (a backward of a tangent, or a double backward)"))

    return backward


def _no_context(ctx, inputs, output) -> None:
    return None


def _jvp_transform_active() -> bool:
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def _carries_tangent(t: object) -> bool:
    return isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None


def _refuse_forward_over_reverse(function_cls: type) -> None:
    backward = function_cls.backward
    if getattr(backward, "_refuses_forward_over_reverse", False):
        return

    @functools.wraps(backward)
    def checked_backward(ctx, *grads):
        if any(_carries_tangent(g) for g in grads) or _jvp_transform_active():
            raise DoubleDifferentiationError(_message(
                f"{function_cls.__name__}.backward", "forward-mode AD over a backward (forward-over-reverse)"))
        return backward(ctx, *grads)

    checked_backward._refuses_forward_over_reverse = True  # type: ignore[attr-defined]
    function_cls.backward = staticmethod(checked_backward)


def install() -> None:
    """Register the refusals for every ``t2i_kernels`` custom op and kernel Function loaded so far (idempotent)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("t2i_kernels.") or module is None:
            continue
        for obj in list(vars(module).values()):
            if isinstance(obj, torch.library.CustomOpDef) and obj._namespace == LIBRARY:
                qualname = f"{LIBRARY}::{obj._name}"
                obj.register_autograd(_refusing_backward(qualname), setup_context=_no_context)
            elif (isinstance(obj, type) and issubclass(obj, torch.autograd.Function) and obj.__module__ == name
                  and "backward" in vars(obj)):
                _refuse_forward_over_reverse(obj)
